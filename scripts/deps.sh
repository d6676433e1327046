#!/usr/bin/env bash
# Installs the tools the tests and benchmarks need, when they are missing.
set -euo pipefail
need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v vhdimount >/dev/null || need+=(libvhdi-utils)
command -v fio >/dev/null || need+=(fio)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common) # the bench's FUSE export rows
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs) # the bench's merge on XFS (reflink)
command -v losetup >/dev/null || need+=(mount)
command -v sfdisk >/dev/null || need+=(fdisk) # resize: partition tables written into disk.raw
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -e /dev/fuse ] || { echo "deps: /dev/fuse is missing: FUSE mounts cannot work here" >&2; exit 1; }
