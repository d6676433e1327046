#!/usr/bin/env bash
# make deb: scripts/deb.sh ROOT OUTDIR VERSION packs ROOT, what `make install
# DESTDIR=ROOT PREFIX=/usr` put there, into OUTDIR/vhdfs_VERSION_ARCH.deb with dpkg-deb.
# VERSION is git describe's; it is made a valid Debian version: v1.2-3-gabc1234-dirty
# becomes 1.2+3.gabc1234.dirty, and a bare revision (no tag yet) 0~gitN.abc1234, N
# counting the commits, so that later builds sort higher and any release higher still.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$1 out=$2 raw=$3

case $raw in
[vV][0-9]* | [0-9]*)
  v=${raw#[vV]}
  v=${v/-/+}
  v=${v//-/.}
  ;;
*)
  n=$(git rev-list --count HEAD 2>/dev/null || echo 0)
  v=0~git$n.${raw//-/.}
  ;;
esac
v=${v//[^A-Za-z0-9.+~]/.}
dpkg --validate-version "$v" || { echo "deb: cannot make a Debian version of $raw ($v)" >&2; exit 1; }

arch=${DEB_ARCH:-$(dpkg --print-architecture)}
# The binary links the C library when cgo is on (os/user): depend on the newest glibc
# symbol version it names.
depends=fuse3
glibc=$(grep -ao 'GLIBC_2\.[0-9.]*' "$root/usr/bin/vhdfs" | sed 's/GLIBC_//' | sort -uV | tail -1 || true)
if [ -n "$glibc" ]; then depends="$depends, libc6 (>= $glibc)"; fi

# Debian installs man pages compressed.
gzip -9nf "$root"/usr/share/man/man1/*.1
mkdir -p "$root/DEBIAN"
cat >"$root/DEBIAN/control" <<EOT
Package: vhdfs
Version: $v
Architecture: $arch
Maintainer: vhdfs developers <vhdfs@users.noreply.github.com>
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $depends
Section: admin
Priority: optional
Homepage: https://github.com/vhdfs/vhdfs
Description: mount a chain of VHD or VHDX images as one raw disk (FUSE)
 vhdfs mounts a chain of Microsoft virtual disks, VHD or VHDX (a base and its
 differencing disks, snapshots, Hyper-V checkpoints), as one raw disk image
 that dd, qemu-img, losetup or a forensic tool can read and write, merges
 snapshots into their parents, and creates, checks, converts, compacts,
 resizes and exports such chains offline.
EOT
deb=$out/vhdfs_${v}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
rm -rf "$root"
echo "$deb"
