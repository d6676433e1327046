#!/usr/bin/env bash
# make deb: scripts/deb.sh ROOT OUTDIR VERSION packs ROOT, what `make install
# DESTDIR=ROOT PREFIX=/usr` put there, into OUTDIR/vhdfs_VERSION_ARCH.deb with dpkg-deb.
# The package's version comes from git describe --tags --long --always --dirty, made a
# valid Debian version (debversion): a tag alone, v1.2-0-gabc1234, is 1.2; commits
# after it, v1.2-3-gabc1234(-dirty), are 1.2+3.gabc1234(.dirty); no tag, a bare
# revision abc1234(-dirty), is 0~gitN.abc1234(.dirty), N counting the commits, so that
# later builds sort higher and any release higher still. Only a tag is taken for a
# version: a bare revision that starts with a digit is no version. Outside a git
# repository VERSION (make's, dev there) gives 0~VERSION.
#
# scripts/deb.sh --debian-version DESCRIBE COUNT prints the version of that git
# describe output and commit count, and nothing else (for the tests).
set -euo pipefail

# debversion DESCRIBE COUNT
debversion() {
  local d=$1 n=$2 dirty='' v
  case $d in *-dirty) dirty=.dirty d=${d%-dirty} ;; esac
  if [[ $d =~ ^[vV]?([0-9][A-Za-z0-9.+~-]*)-([0-9]+)-g([0-9a-f]+)$ ]]; then
    v=${BASH_REMATCH[1]//-/\~} # v1.2-rc1 is 1.2~rc1, before 1.2
    if [ "${BASH_REMATCH[2]}" != 0 ] || [ -n "$dirty" ]; then
      v=$v+${BASH_REMATCH[2]}.g${BASH_REMATCH[3]}$dirty
    fi
  else
    # No tag, or one that is no version: --long gives TAG-N-gHASH, else HASH alone.
    [[ $d =~ -g([0-9a-f]+)$ ]] && d=${BASH_REMATCH[1]}
    v=0~git$n.$d$dirty
  fi
  echo "${v//[^A-Za-z0-9.+~]/.}"
}

if [ "${1-}" = --debian-version ]; then
  debversion "$2" "$3"
  exit
fi

cd "$(dirname "$0")/.."
root=$1 out=$2 raw=$3

if d=$(git describe --tags --long --always --dirty 2>/dev/null); then
  v=$(debversion "$d" "$(git rev-list --count HEAD)")
else
  v=0~${raw//[^A-Za-z0-9.+~]/.}
fi
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
