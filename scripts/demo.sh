#!/usr/bin/env bash
# make demo: builds a small chain (a dynamic base with an ext4 filesystem, two
# snapshots with changes), shows it, mounts it and waits for Ctrl-C. Without a
# terminal on stdin (or with CI set) it does not wait: it unmounts and ends.
# On its way out it detaches the loop devices attached from the mount (as it
# suggests trying) and unmounts; what it cannot end, it names, with the command
# that ends it.
set -euo pipefail
cd "$(dirname "$0")/.."
vhdfs=$PWD/bin/vhdfs
dir=$(mktemp -d /tmp/vhdfs-demo.XXXXXX)
mnt=$dir/mnt
mkdir -p "$mnt"
interactive=
if [ -t 0 ] && [ -z "${CI:-}" ]; then interactive=1; fi
sleeper=
cleanup() {
  [ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null
  if grep -q " $mnt fuse" /proc/mounts; then
    local dev
    for dev in $(losetup -n -O NAME -j "$mnt/disk.raw" 2>/dev/null); do
      if losetup -d "$dev" 2>/dev/null && ! losetup -n -O NAME -j "$mnt/disk.raw" | grep -qx "$dev"; then
        echo "detached $dev (attached from $mnt/disk.raw)"
      else
        echo "left $dev attached to $mnt/disk.raw: in use (findmnt $dev; fuser -v $dev); it detaches once that ends"
      fi
    done
    if "$vhdfs" umount "$mnt"; then
      echo "unmounted $mnt"
    else
      echo "left $mnt mounted (in use: fuser -vm $mnt shows by what); end it with: $vhdfs umount $mnt"
    fi
  fi
  echo "demo files left in $dir (rm -r $dir removes them)"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

echo "== creating a 256 MiB dynamic base with recognisable data"
"$vhdfs" create --size 256M "$dir/base.vhd"
"$vhdfs" mount "$dir/base.vhd" "$mnt"
if command -v mkfs.ext4 >/dev/null; then
  mkfs.ext4 -q -F -L vhdfs-demo "$mnt/disk.raw"
  echo "   base: ext4 filesystem (debugfs can read it without mounting)"
fi
printf 'written into the base\n' | dd of="$mnt/disk.raw" bs=512 seek=400000 conv=notrunc status=none
"$vhdfs" umount "$mnt"

echo "== snapshot 1 (mid.vhd) and a change in it"
"$vhdfs" create --parent "$dir/base.vhd" "$dir/mid.vhd"
"$vhdfs" mount "$dir/mid.vhd" "$mnt"
printf 'written into the middle snapshot\n' | dd of="$mnt/disk.raw" bs=512 seek=400008 conv=notrunc status=none
"$vhdfs" umount "$mnt"

echo "== snapshot 2 (top.vhd) and a change in it"
"$vhdfs" create --parent "$dir/mid.vhd" "$dir/top.vhd"
"$vhdfs" mount "$dir/top.vhd" "$mnt"
printf 'written into the top snapshot\n' | dd of="$mnt/disk.raw" bs=512 seek=400016 conv=notrunc status=none
"$vhdfs" umount "$mnt"

echo
"$vhdfs" info "$dir/top.vhd"

echo
echo "== the same in VHDX, as Hyper-V makes it: base.vhdx and a checkpoint, base_ckpt.avhdx"
"$vhdfs" create --size 256M "$dir/base.vhdx"
"$vhdfs" mount "$dir/base.vhdx" "$mnt"
printf 'written into the VHDX base\n' | dd of="$mnt/disk.raw" bs=512 seek=400000 conv=notrunc status=none
"$vhdfs" umount "$mnt"
"$vhdfs" create --parent "$dir/base.vhdx" "$dir/base_ckpt.avhdx"
"$vhdfs" mount "$dir/base_ckpt.avhdx" "$mnt"
printf 'written into the VHDX checkpoint\n' | dd of="$mnt/disk.raw" bs=512 seek=400008 conv=notrunc status=none
"$vhdfs" umount "$mnt"
"$vhdfs" info "$dir/base_ckpt.avhdx"
echo "the two messages, read back through the exported chain:"
"$vhdfs" export "$dir/base_ckpt.avhdx" "$dir/ckpt.raw"
dd if="$dir/ckpt.raw" bs=512 skip=400000 count=16 status=none | strings
"$vhdfs" check "$dir/base_ckpt.avhdx"

echo
"$vhdfs" mount "$dir/top.vhd" "$mnt"
echo "== mounted at $mnt:"
ls -l "$mnt" "$mnt/layers"
echo
echo "the three messages, each from its own layer:"
dd if="$mnt/disk.raw" bs=512 skip=400000 count=24 status=none | strings
echo
if [ -z "$interactive" ]; then
  if [ -n "${CI:-}" ]; then why="CI is set"; else why="stdin is not a terminal"; fi
  echo "not interactive ($why): not waiting; unmounting $mnt and stopping (run make demo in a terminal to try the mount)"
  exit 0
fi
cat <<EOT
Try, in another terminal:
  dd if=$mnt/disk.raw bs=1M count=4 | md5sum
  cmp $mnt/layers/1-mid.raw $mnt/layers/2-base.raw | head -1
  cat $mnt/control
  echo 'merge depth=1' > $mnt/control     # fold top.vhd into mid.vhd
  losetup --find --show --read-only $mnt/disk.raw   # detached again when the demo ends

Press Ctrl-C to detach those loop devices, unmount and stop.
EOT
# wait returns at once on a signal (a foreground sleep would hold off the trap).
sleep infinity &
sleeper=$!
wait "$sleeper"
