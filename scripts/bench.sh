#!/usr/bin/env bash
# make bench: builds its own VHD chain, runs each workload against vhdfs and an
# alternative (libvhdi's vhdimount, cat, cp, a plain file, qemu-img), alternating them,
# and prints a markdown table of medians and ratios to stdout and to $BENCH_OUT.
#
#   BENCH_SIZE         virtual size of the chain (default 2G; 64M for a quick run)
#   BENCH_RUNS         runs per workload (default 5; 3 below 1 GiB)
#   BENCH_FIO_RUNTIME  seconds per fio run (default 10; 3 below 1 GiB)
#   BENCH_VHDI_READ    how much of vhdimount's disk a timed sequential read reads
#                      (default 512M; it runs at 15-100 MiB/s, and all of a 2G disk
#                      five times over would take most of the time budget)
#   BENCH_OUT          where the table goes as well (default bench-results.md)
#   BENCH_DIR          parent of the fixture directory (default $TMPDIR or /tmp)
#   BENCH_KEEP=1       keep the fixtures (everything is still unmounted)
#   BENCH_BASELINE     another vhdfs binary: its fresh-mount sequential read joins
#                      the rotation, for an A/B within one run
#
# Progress goes to stderr, the table to stdout. Every mount is undone on exit, even on
# failure or Ctrl-C, and the fixtures are removed.
set -euo pipefail

invoked_from=$PWD
cd "$(dirname "$0")/.."
repo=$PWD
vhdfs=${VHDFS:-$repo/bin/vhdfs}

die() { echo "bench: $*" >&2; exit 1; }

# --- configuration ---------------------------------------------------------------

to_bytes() { # NAME VALUE: 64M, 2G, 512K, 1T or bytes -> bytes (binary units)
  local s=$2 n u
  [[ $s =~ ^([0-9]+)([KkMmGgTt]?)$ ]] || die "$1=$s: want a size like 64M, 2G or bytes"
  n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]^^}
  case $u in
    K) n=$((n << 10)) ;; M) n=$((n << 20)) ;; G) n=$((n << 30)) ;; T) n=$((n << 40)) ;;
  esac
  echo "$n"
}

size_arg=${BENCH_SIZE:-2G}
size_req=$(to_bytes BENCH_SIZE "$size_arg")
((size_req >= 16 << 20)) || die "BENCH_SIZE=$size_arg: at least 16M, please"
big=$((size_req >= 1 << 30))
runs=${BENCH_RUNS:-$((big ? 5 : 3))}
fio_runtime=${BENCH_FIO_RUNTIME:-$((big ? 10 : 3))}
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS=$runs: want a positive number"
[[ $fio_runtime =~ ^[1-9][0-9]*$ ]] || die "BENCH_FIO_RUNTIME=$fio_runtime: want a positive number of seconds"
out=${BENCH_OUT:-bench-results.md}
[[ $out = /* ]] || out=$invoked_from/$out
# The overlay written by the write and merge workloads: half the disk, whole MiB.
half=$((size_req / 2 / 1048576 * 1048576))
vhdi_cap=$(to_bytes BENCH_VHDI_READ "${BENCH_VHDI_READ:-512M}")

for t in python3 fio vhdimount qemu-img fusermount3 dd cmp md5sum; do
  command -v "$t" >/dev/null || die "$t is missing: run 'make deps'"
done
[ -x "$vhdfs" ] || die "$vhdfs is missing: run 'make build'"

parent=${BENCH_DIR:-${TMPDIR:-/tmp}}
mkdir -p "$parent"
avail=$(($(df -Pk "$parent" | awk 'NR == 2 { print $4 }') * 1024))
need=$((size_req * 17 / 2 + (768 << 20))) # 450 MiB of it for the chains of 64 (section 6b)
((avail >= need)) || die "$parent has $((avail >> 20)) MiB free; BENCH_SIZE=$size_arg needs about $((need >> 20)) MiB"
dir=$(mktemp -d "$parent/vhdfs-bench.XXXXXX")
mnt=$dir/mnt   # vhdfs mounts
vmnt=$dir/vmnt # vhdimount mounts
mkdir -p "$mnt" "$vmnt"
samples=$dir/samples.tsv
: >"$samples"

# --- cleanup: unmount everything under $dir, then remove it ------------------------

mounts_under() { # mount points below $dir, deepest first, with their fs type
  awk -v d="$dir/" 'index($2, d) == 1 { print $2, $3 }' /proc/mounts | sort -r
}

cleanup() {
  local rc=$? mp type
  set +e
  trap - INT TERM
  case $rc in
    0 | 130 | 143) ;;
    *) echo "bench: failed (exit $rc); cleaning up" >&2 ;;
  esac
  if [ -s "$dir/qsd.pid" ] && grep -q qemu-storage "/proc/$(cat "$dir/qsd.pid")/comm" 2>/dev/null; then
    kill "$(cat "$dir/qsd.pid")"
    sleep 0.5
  fi
  while read -r mp type; do
    [ -n "$mp" ] || continue
    echo "bench: unmounting $mp" >&2
    if [ "$type" = fuse.vhdfs ]; then
      "$vhdfs" umount "$mp" || fusermount3 -u -z "$mp"
    elif [ "$type" = xfs ]; then
      umount "$mp" || umount -l "$mp"
    else
      fusermount3 -u "$mp" || fusermount3 -u -z "$mp"
    fi
  done < <(mounts_under)
  if [ -n "$(mounts_under)" ]; then
    echo "bench: something is still mounted under $dir; leaving it there" >&2
  elif [ "${BENCH_KEEP:-}" = 1 ]; then
    echo "bench: fixtures kept in $dir" >&2
  else
    rm -rf --one-file-system "$dir"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers -----------------------------------------------------------------------

t_begin=$(date +%s)
log() { printf '[bench %4ds] %s\n' $(($(date +%s) - t_begin)) "$*" >&2; }
now() { date +%s%N; }
mibps() { awk -v b="$1" -v ns="$2" 'BEGIN { printf "%.1f", b / 1048576 / (ns / 1e9) }'; }
ms() { awk -v ns="$1" 'BEGIN { printf "%.1f", ns / 1e6 }'; }
# Each sample's 1-minute load average goes beside it into $samples.load, for the table.
record() {
  printf '%s\t%s\n' "$1" "$2" >>"$samples"
  printf '%s\t%s\n' "$1" "$(cut -d' ' -f1 /proc/loadavg)" >>"$samples.load"
}
note() { printf '%s\n' "$*" >>"$dir/notes"; log "NOTE: $*"; }

# gen SEED BYTES: pseudo-random, non-zero-looking bytes on stdout, fast (AES-CTR of
# zeros); /dev/urandom where openssl is missing.
gen() {
  if command -v openssl >/dev/null; then
    head -c "$2" /dev/zero | openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:vhdfs-bench-$1"
  else
    head -c "$2" /dev/urandom
  fi
}

# scatter FILE COUNT SEED: COUNT random 4 KiB writes at distinct 4 KiB-aligned offsets.
scatter() {
  python3 - "$@" <<'PY'
import os, random, sys
path, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
fd = os.open(path, os.O_WRONLY)
slots = os.fstat(fd).st_size // 4096
for s in r.sample(range(slots), min(count, slots)):
    data = r.randbytes(4096)
    while not any(data):
        data = r.randbytes(4096)
    os.pwrite(fd, data, s * 4096)
os.fsync(fd)
os.close(fd)
PY
}

json_field() { # FILE EXPR: evaluate a Python expression over the JSON document d
  python3 -c '
import json, sys
t = open(sys.argv[1]).read()
d = json.loads(t[t.index("{"):])
print(eval(sys.argv[2]))' "$1" "$2"
}

# Commands' stdout goes to a file, not /dev/null: vhdfs draws progress bars while
# stdout is a character device, and /dev/null is one.
vmount() { "$vhdfs" mount "$@" >>"$dir/cmd.log"; }
vumount() { "$vhdfs" umount "$1"; }
md5() { dd if="$1" bs=1M status=none | md5sum | cut -d' ' -f1; }

# --- fixtures ----------------------------------------------------------------------

log "fixtures in $dir: BENCH_SIZE=$size_arg, $runs runs, fio ${fio_runtime}s, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

"$vhdfs" create --size "$size_arg" "$dir/base.vhd" >>"$dir/cmd.log"
vmount "$dir/base.vhd" "$mnt"
disk=$(stat -c %s "$mnt/disk.raw")
log "base.vhd: dynamic, $disk bytes, writing every block"
t0=$(now)
gen base "$disk" | dd of="$mnt/disk.raw" bs=1M iflag=fullblock conv=notrunc,fsync status=none
log "  base filled through the mount at $(mibps "$disk" $(($(now) - t0))) MiB/s"
vumount "$mnt"

slots=$((disk / 4096))
n_mid=$((slots / 4 < 3000 ? slots / 4 : 3000))
n_top=$((slots / 8 < 1000 ? slots / 8 : 1000))
"$vhdfs" create --parent "$dir/base.vhd" "$dir/mid.vhd" >>"$dir/cmd.log"
vmount "$dir/mid.vhd" "$mnt"
scatter "$mnt/disk.raw" "$n_mid" 1
vumount "$mnt"
"$vhdfs" create --parent "$dir/mid.vhd" "$dir/top.vhd" >>"$dir/cmd.log"
vmount "$dir/top.vhd" "$mnt"
scatter "$mnt/disk.raw" "$n_top" 2
vumount "$mnt"
log "mid.vhd: $n_mid scattered 4 KiB writes; top.vhd: $n_top more"

"$vhdfs" export "$dir/top.vhd" "$dir/chain.raw" >>"$dir/cmd.log"
gen src "$half" >"$dir/src.raw"
log "chain.raw: the chain exported; src.raw: $((half >> 20)) MiB to write"

# --- 1. sequential read, warm cache ------------------------------------------------

vmount -r "$dir/top.vhd" "$mnt"
vhdimount "$dir/top.vhd" "$vmnt" >>"$dir/cmd.log"
# libvhdi numbers the chain from the base: vhdi1 is the base, vhdiN the whole chain.
vfile=$vmnt/$(ls "$vmnt" | sort -V | tail -n 1)
log "seq read: warming the page cache (and comparing what each one reads)"
# vhdimount's timed reads read all of its disk, or its first BENCH_VHDI_READ bytes.
if ((vhdi_cap + vhdi_cap / 8 < disk)); then # not for the few KiB of CHS rounding
  vhdi_count=(count=$((vhdi_cap >> 20))) vhdi_bytes=$((vhdi_cap >> 20 << 20))
else
  vhdi_count=() vhdi_bytes=$disk
fi
head_md5() { dd if="$1" bs=1M "${vhdi_count[@]}" status=none | md5sum | cut -d' ' -f1; }
sum_vhdfs=$(md5 "$mnt/disk.raw")
sum_raw=$(md5 "$dir/chain.raw")
sum_vhdi=$(head_md5 "$vfile")
sum_raw_head=$(head_md5 "$dir/chain.raw")
[ "$sum_vhdfs" = "$sum_raw" ] || note "disk.raw and the exported chain.raw differ ($sum_vhdfs vs $sum_raw)"
[ "$sum_vhdi" = "$sum_raw_head" ] || note "vhdimount's $(basename "$vfile") and vhdfs's chain.raw differ (in the first $vhdi_bytes bytes)"

seqread() { # KEY FILE
  local t0
  if [ "$1" = vhdfs_fuse ]; then
    # Informational: drop disk.raw's own pages (the layers' stay cached), so that
    # every byte goes through FUSE and vhdfs.
    dd if="$2" iflag=nocache count=0 status=none
  fi
  t0=$(now)
  case $1 in
    cat) cat "$2" >/dev/null ;;
    vhdimount) dd if="$2" of=/dev/null bs=1M "${vhdi_count[@]}" status=none ;;
    *) dd if="$2" of=/dev/null bs=1M status=none ;;
  esac
  record "seqread_$1" "$(mibps "$([ "$1" = vhdimount ] && echo "$vhdi_bytes" || echo "$disk")" $(($(now) - t0)))"
}
for ((i = 1; i <= runs; i++)); do
  # Rotate the order so none of them always goes first.
  case $((i % 3)) in
    1) order="vhdfs vhdimount cat" ;; 2) order="vhdimount cat vhdfs" ;; 0) order="cat vhdfs vhdimount" ;;
  esac
  for w in $order vhdfs_fuse; do
    case $w in
      vhdfs*) seqread "$w" "$mnt/disk.raw" ;;
      vhdimount) seqread vhdimount "$vfile" ;;
      cat) seqread cat "$dir/chain.raw" ;;
    esac
  done
  # The warm read again, so the next run starts with disk.raw cached.
  dd if="$mnt/disk.raw" of=/dev/null bs=1M status=none
  log "seq read $i/$runs: $(tail -n 4 "$samples" | awk '{ printf "%s %s MiB/s  ", substr($1, 9), $2 }')"
done

# --- 1b. sequential read, fresh mount: what vhdfs itself does -----------------------

# The primary read rows: a fresh mount for every sample, so disk.raw starts cold and
# every byte goes through FUSE and vhdfs (the image files stay in the page cache, as
# chain.raw does for cat). The others, each fresh for every sample too: go-fuse's own
# loopback serving chain.raw (the FUSE ceiling without passthrough),
# qemu-storage-daemon's FUSE export of base.vhd (qemu reads no differencing VHD; the
# base is as large and fully written) and vhdimount. CPU is the reader's (rusage) plus
# the server's (/proc/PID/stat), per GiB read.
lodir=$dir/lo lmnt=$dir/lmnt qfile=$dir/qsd.raw vmnt2=$dir/vmnt2
mkdir -p "$lodir" "$lmnt" "$vmnt2"
ln "$dir/chain.raw" "$lodir/chain.raw"
: >"$qfile"
loopback=""
# go-fuse's example loopback hands each file to the kernel (FUSE passthrough) when it
# runs as root; internal/benchloopback is the same file system without it.
if (cd "$repo" && ${GO:-go} build -o "$dir/loopback" ./internal/benchloopback) 2>>"$dir/cmd.log"; then
  loopback=$dir/loopback
else
  note "no go-fuse loopback rows: could not build internal/benchloopback (see cmd.log)"
fi
qsd=$(command -v qemu-storage-daemon || true)
[ -n "$qsd" ] || note "no qemu-storage-daemon rows: it is missing (qemu-system-common; make deps)"
tck=$(getconf CLK_TCK)
proc_cpu() { # PID: CPU seconds used so far by the process
  awk -v t="$tck" '{ printf "%.3f", ($14 + $15) / t }' "/proc/$1/stat"
}
# timed_read KEY BYTES SERVER_PID CMD...: runs CMD, records MiB/s and CPU s/GiB.
timed_read() {
  local key=$1 bytes=$2 spid=$3 s0=0 s1=0 ns c
  shift 3
  [ -z "$spid" ] || s0=$(proc_cpu "$spid")
  # Timed inside python, which starts before and reports after: ns and CPU seconds.
  read -r ns c < <(python3 -c '
import resource, subprocess, sys, time
t = time.monotonic_ns()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
t = time.monotonic_ns() - t
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(t, r.ru_utime + r.ru_stime)' "$@")
  [ -z "$spid" ] || s1=$(proc_cpu "$spid")
  record "coldread_$key" "$(mibps "$bytes" "$ns")"
  record "coldcpu_$key" "$(awk -v c="$c" -v a="$s0" -v b="$s1" -v n="$bytes" 'BEGIN { printf "%.3f", (c + b - a) / (n / 1073741824) }')"
}
stop_qsd() { # PID: qemu-storage-daemon stays up when its export is unmounted
  kill "$1" 2>/dev/null || true
  wait_gone "$1"
  if mountpoint -q "$qfile"; then fusermount3 -u "$qfile" || true; fi
}
wait_mounted() { # DIR
  local i
  for ((i = 0; i < 500; i++)); do
    mountpoint -q "$1" && return 0
    sleep 0.01
  done
  die "$1: not mounted after 5 s"
}
wait_gone() { # PID
  local i
  for ((i = 0; i < 500; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.01
  done
}
ddr() { echo dd "if=$1" of=/dev/null bs=1M "${@:2}" status=none; }
coldread() { # KEY
  local pid
  case $1 in
    cat) timed_read cat "$disk" "" cat "$dir/chain.raw" ;;
    vhdfs | direct_vhdfs)
      vumount "$mnt"
      vmount -r "$dir/top.vhd" "$mnt"
      pid=$(json_field "$mnt/control" 'd["pid"]')
      if [ "$1" = vhdfs ]; then
        timed_read vhdfs "$disk" "$pid" $(ddr "$mnt/disk.raw")
      else
        timed_read direct_vhdfs "$disk" "$pid" $(ddr "$mnt/disk.raw" iflag=direct)
      fi
      ;;
    baseline) # BENCH_BASELINE: another vhdfs binary, for an A/B in one run
      vumount "$mnt"
      "$BENCH_BASELINE" mount -r "$dir/top.vhd" "$mnt" >>"$dir/cmd.log"
      pid=$(json_field "$mnt/control" 'd["pid"]')
      timed_read baseline "$disk" "$pid" $(ddr "$mnt/disk.raw")
      "$BENCH_BASELINE" umount "$mnt"
      vmount -r "$dir/top.vhd" "$mnt"
      ;;
    loopback | loopback_ra) # loopback_ra: with vhdfs's 1 MiB read-ahead
      "$loopback" "$lmnt" "$lodir" $([ "$1" = loopback_ra ] && echo 1048576) >>"$dir/cmd.log" 2>&1 &
      pid=$!
      wait_mounted "$lmnt"
      timed_read "$1" "$disk" "$pid" $(ddr "$lmnt/chain.raw")
      fusermount3 -u "$lmnt"
      wait_gone "$pid"
      ;;
    qsd)
      "$qsd" --blockdev "driver=file,node-name=f,filename=$dir/base.vhd,read-only=on" \
        --blockdev driver=vpc,node-name=d,file=f,read-only=on \
        --export "type=fuse,id=e,node-name=d,mountpoint=$qfile,writable=off" \
        --pidfile "$dir/qsd.pid" --daemonize >>"$dir/cmd.log" 2>&1
      pid=$(cat "$dir/qsd.pid")
      timed_read qsd "$(stat -c %s "$qfile")" "$pid" $(ddr "$qfile")
      stop_qsd "$pid"
      ;;
    vhdimount) vhdimount_read vhdimount "$dir/top.vhd" "$(basename "$vfile")" ;;
  esac
}
# vhdimount_read KEY IMAGE FILE: a fresh vhdimount of IMAGE, FILE (the whole chain's)
# read as far as BENCH_VHDI_READ says, recorded as KEY.
vhdimount_read() {
  local pid
  vhdimount "$2" "$vmnt2" >>"$dir/cmd.log"
  pid=$(pgrep -n -f -- "vhdimount $2 $vmnt2")
  timed_read "$1" "$vhdi_bytes" "$pid" $(ddr "$vmnt2/$3" "${vhdi_count[@]}")
  fusermount3 -u "$vmnt2"
  wait_gone "$pid"
}
# These rows swing most from sample to sample: they get 2 * runs - 1 rounds, the slow
# vhdimount only the first runs.
cold_runs=$((2 * runs - 1))
cold_tools="vhdfs direct_vhdfs cat${loopback:+ loopback loopback_ra}${qsd:+ qsd}${BENCH_BASELINE:+ baseline}"
for ((i = 1; i <= cold_runs; i++)); do
  # Rotate the order so none of them always goes first.
  set -- $cold_tools
  ((i > runs)) || set -- "$@" vhdimount
  for ((k = 0; k < (i - 1) % $#; k++)); do set -- "${@:2}" "$1"; done
  for w in "$@"; do coldread "$w"; done
  log "cold read $i/$cold_runs: $(tail -n $((2 * $#)) "$samples" | awk '$1 ~ /^coldread/ { printf "%s %s MiB/s  ", substr($1, 10), $2 }')"
done
vumount "$mnt"
vmount -r "$dir/top.vhd" "$mnt"

# --- 1c. -o direct_io: what a re-read costs without the page cache ------------------

# The warm re-read of disk.raw mounted with -o direct_io (every read goes through vhdfs
# again) against the default mount's warm re-read (the page cache).
dmnt=$dir/dmnt
mkdir -p "$dmnt"
vmount -r -o direct_io "$dir/top.vhd" "$dmnt"
dd if="$mnt/disk.raw" of=/dev/null bs=1M status=none
dd if="$dmnt/disk.raw" of=/dev/null bs=1M status=none
for ((i = 1; i <= runs; i++)); do
  for w in directio cached; do
    t0=$(now)
    dd if="$([ $w = directio ] && echo "$dmnt" || echo "$mnt")/disk.raw" of=/dev/null bs=1M status=none
    record "reread_$w" "$(mibps "$disk" $(($(now) - t0)))"
  done
  log "re-read $i/$runs: $(tail -n 2 "$samples" | awk '{ printf "%s %s MiB/s  ", substr($1, 8), $2 }')"
done
vumount "$dmnt"

# --- 2. random 4 KiB reads, fio ----------------------------------------------------

# The issue's fio command. fio drops the file's cached pages when it opens it, but
# disk.raw is opened with FOPEN_KEEP_CACHE, so pages read during the run stay cached;
# the O_DIRECT runs (informational) show the FUSE path alone.
fio_run() { # KEY FILE [--direct=1]
  fio --name=randread --filename="${2//:/\\:}" --readonly --rw=randread --bs=4k --numjobs=4 \
    --ioengine=psync --time_based --runtime="$fio_runtime" --group_reporting \
    --output-format=json --output="$dir/fio.json" ${3:+"$3"} >/dev/null
  record "fio_$1" "$(json_field "$dir/fio.json" 'round(d["jobs"][0]["read"]["iops"])')"
}
# O_DIRECT against go-fuse's loopback of chain.raw and qemu-storage-daemon's export of
# base.vhd too, each served for the whole loop.
direct_alts=()
if [ -n "$loopback" ]; then
  "$loopback" "$lmnt" "$lodir" >>"$dir/cmd.log" 2>&1 &
  lpid=$!
  wait_mounted "$lmnt"
  direct_alts+=(loopback)
fi
if [ -n "$qsd" ]; then
  "$qsd" --blockdev "driver=file,node-name=f,filename=$dir/base.vhd,read-only=on" \
    --blockdev driver=vpc,node-name=d,file=f,read-only=on \
    --export "type=fuse,id=e,node-name=d,mountpoint=$qfile,writable=off" \
    --pidfile "$dir/qsd.pid" --daemonize >>"$dir/cmd.log" 2>&1
  direct_alts+=(qsd)
fi
fio_direct_alt() {
  case $1 in
    loopback) fio_run direct_loopback "$lmnt/chain.raw" --direct=1; fio_qd32 qd32_loopback "$lmnt/chain.raw"; fio_qd32 qd1_loopback "$lmnt/chain.raw" 1 ;;
    qsd) fio_run direct_qsd "$qfile" --direct=1; fio_qd32 qd32_qsd "$qfile"; fio_qd32 qd1_qsd "$qfile" 1 ;;
  esac
}
# One program with 32 O_DIRECT reads in flight (libaio), as a VM's disk queue reads:
# what ASYNC_DIO is for.
fio_qd32() { # KEY FILE [DEPTH, default 32]
  fio --name=qd32 --filename="${2//:/\\:}" --readonly --rw=randread --bs=4k --numjobs=1 --iodepth="${3:-32}" \
    --ioengine=libaio --direct=1 --time_based --runtime="$fio_runtime" \
    --output-format=json --output="$dir/fio.json" >/dev/null
  record "fio_$1" "$(json_field "$dir/fio.json" 'round(d["jobs"][0]["read"]["iops"])')"
}
for ((i = 1; i <= runs; i++)); do
  if ((i % 2)); then
    fio_run vhdfs "$mnt/disk.raw"; fio_run vhdimount "$vfile"
    fio_run direct_vhdfs "$mnt/disk.raw" --direct=1; fio_qd32 qd32_vhdfs "$mnt/disk.raw"; fio_qd32 qd1_vhdfs "$mnt/disk.raw" 1; fio_run direct_vhdimount "$vfile" --direct=1
    for a in "${direct_alts[@]}"; do fio_direct_alt "$a"; done
  else
    fio_run vhdimount "$vfile"; fio_run vhdfs "$mnt/disk.raw"
    for a in "${direct_alts[@]}"; do fio_direct_alt "$a"; done
    fio_run direct_vhdimount "$vfile" --direct=1; fio_qd32 qd1_vhdfs "$mnt/disk.raw" 1; fio_qd32 qd32_vhdfs "$mnt/disk.raw"; fio_run direct_vhdfs "$mnt/disk.raw" --direct=1
  fi
  log "random read $i/$runs: $(tail -n $((6 + 3 * ${#direct_alts[@]})) "$samples" | awk '{ printf "%s %s IOPS  ", substr($1, 5), $2 }')"
done
fusermount3 -u "$vmnt"
vumount "$mnt"
if [ -n "$loopback" ]; then
  fusermount3 -u "$lmnt"
  wait_gone "$lpid"
fi
if [ -n "$qsd" ]; then
  stop_qsd "$(cat "$dir/qsd.pid")"
fi

# --- 3. sequential write into a fresh top ------------------------------------------

cat "$dir/src.raw" >/dev/null
write_vhdfs() {
  local t0
  "$vhdfs" create --parent "$dir/top.vhd" "$dir/wtop.vhd" >>"$dir/cmd.log"
  vmount "$dir/wtop.vhd" "$mnt"
  t0=$(now)
  dd if="$dir/src.raw" of="$mnt/disk.raw" bs=1M conv=notrunc,fsync status=none
  record write_vhdfs "$(mibps "$half" $(($(now) - t0)))"
  vumount "$mnt"
  rm -f "$dir/wtop.vhd"
}
write_plain() {
  local t0
  rm -f "$dir/plain.raw"
  t0=$(now)
  dd if="$dir/src.raw" of="$dir/plain.raw" bs=1M conv=notrunc,fsync status=none
  record write_plain "$(mibps "$half" $(($(now) - t0)))"
  rm -f "$dir/plain.raw"
}
for ((i = 1; i <= runs; i++)); do
  if ((i % 2)); then write_vhdfs; write_plain; else write_plain; write_vhdfs; fi
  log "seq write $i/$runs: $(tail -n 2 "$samples" | awk '{ printf "%s %s MiB/s  ", substr($1, 7), $2 }')"
done

# --- 4. merge depth=1 of an overlay of half the disk --------------------------------

# m0/: base.vhd (a link: a depth=1 merge never writes it) <- mid.vhd <- over.vhd, which
# holds src.raw. Each run merges over.vhd into a fresh copy of mid.vhd.
mkdir "$dir/m0"
ln "$dir/base.vhd" "$dir/m0/base.vhd" 2>/dev/null || ln -s "$dir/base.vhd" "$dir/m0/base.vhd"
cp --sparse=always "$dir/mid.vhd" "$dir/m0/mid.vhd"
"$vhdfs" create --parent "$dir/m0/mid.vhd" "$dir/m0/over.vhd" >>"$dir/cmd.log"
vmount "$dir/m0/over.vhd" "$mnt"
dd if="$dir/src.raw" of="$mnt/disk.raw" bs=1M conv=notrunc,fsync status=none
vumount "$mnt"
log "merge: over.vhd holds $((half >> 20)) MiB"

# merge_run KEY DIR BASE MID OVER: merges OVER (made in DIR on MID, on BASE) into a fresh
# copy of MID through a mount's control file, and records KEY's MiB/s and ms.
merge_run() {
  local key=$1 src=$2 base=$3 mid=$4 over=$5 r=$dir/mrun t0
  rm -rf "$r"
  mkdir "$r"
  ln "$src/$base" "$r/$base" 2>/dev/null || ln -s "$(readlink -f "$src/$base")" "$r/$base"
  cp --sparse=always "$src/$mid" "$src/$over" "$r/"
  sync "$r/$mid" "$r/$over" # no writeback of the copy during the merge
  vmount "$r/$over" "$mnt"
  t0=$(now)
  echo 'merge depth=1' >"$mnt/control"
  local t=$(($(now) - t0))
  record "$key" "$(mibps "$half" "$t")"
  record "${key}_ms" "$(ms "$t")"
  if [ "$(json_field "$mnt/control" 'd["last"]["errno"]')" != 0 ]; then
    note "merge ($key): control reports $(json_field "$mnt/control" 'd["last"]')"
  fi
  vumount "$mnt"
  rm -rf "$r"
}
merge_vhdfs() { merge_run merge_vhdfs "$dir/m0" base.vhd mid.vhd over.vhd; }
cp_run() { # KEY: cp + sync of the overlay's bytes, recorded as KEY's MiB/s and ms
  local t0
  rm -f "$dir/cp.raw"
  t0=$(now)
  cp "$dir/src.raw" "$dir/cp.raw"
  sync "$dir/cp.raw"
  local t=$(($(now) - t0))
  record "$1" "$(mibps "$half" "$t")"
  record "$1_ms" "$(ms "$t")"
  rm -f "$dir/cp.raw"
}
merge_cp() { cp_run merge_cp; }
# The same shape as qcow2 for qemu-img commit: base <- mid (the same scattered writes
# as mid.vhd) <- over (the same data as over.vhd); each run commits over into a fresh
# copy of mid.
mkdir "$dir/q0"
qemu-img create -q -f qcow2 "$dir/q0/base.qcow2" "$disk"
cp --sparse=always "$dir/src.raw" "$dir/q0/over.raw"
truncate -s "$disk" "$dir/q0/over.raw"
"$vhdfs" export "$dir/m0/mid.vhd" "$dir/q0/mid.raw" >>"$dir/cmd.log"
qemu-img convert -q -f raw -O qcow2 -B base.qcow2 -F qcow2 "$dir/q0/mid.raw" "$dir/q0/mid.qcow2"
qemu-img convert -q -f raw -O qcow2 -B mid.qcow2 -F qcow2 "$dir/q0/over.raw" "$dir/q0/over.qcow2"
rm -f "$dir/q0/over.raw" "$dir/q0/mid.raw"
merge_qemu() {
  local r=$dir/qrun t0
  rm -rf "$r"
  mkdir "$r"
  cp --sparse=always "$dir/q0/base.qcow2" "$dir/q0/mid.qcow2" "$dir/q0/over.qcow2" "$r/"
  sync "$r/mid.qcow2" "$r/over.qcow2"
  t0=$(now)
  qemu-img commit -q -d "$r/over.qcow2"
  sync "$r/mid.qcow2"
  local t=$(($(now) - t0))
  record merge_qemu "$(mibps "$half" "$t")"
  record merge_qemu_ms "$(ms "$t")"
  rm -rf "$r"
}
for ((i = 1; i <= runs; i++)); do
  case $((i % 3)) in
    1) merge_vhdfs; merge_cp; merge_qemu ;;
    2) merge_cp; merge_qemu; merge_vhdfs ;;
    0) merge_qemu; merge_vhdfs; merge_cp ;;
  esac
  log "merge $i/$runs: vhdfs $(grep '^merge_vhdfs_ms' "$samples" | tail -n 1 | cut -f2) ms, cp+sync $(grep '^merge_cp_ms' "$samples" | tail -n 1 | cut -f2) ms, qemu-img commit $(grep '^merge_qemu_ms' "$samples" | tail -n 1 | cut -f2) ms"
done

# export_run is used by the export rows, on XFS (4b) and on the fixtures' file system (5).
export_run() { # KEY TOOL IMAGE QEMU_FORMAT [OUT_DIR]: records KEY_TOOL's MiB/s and ms
  local o=${5:-$dir}/out-$2.raw t0
  rm -f "$o"
  t0=$(now)
  if [ "$2" = vhdfs ]; then
    "$vhdfs" export "$3" "$o" >>"$dir/cmd.log"
  else
    qemu-img convert -f "$4" -O raw "$3" "$o"
  fi
  sync "$o"
  local t=$(($(now) - t0))
  record "$1_$2" "$(mibps "$disk" "$t")"
  record "$1_$2_ms" "$(ms "$t")"
}

# --- 4b. the same merge on XFS, where copy_file_range shares blocks (reflink) ---------

# An XFS loop file system holds mid.vhd and over.vhd (base.vhd, never written by a
# depth=1 merge, stays outside through a symbolic link). The alternative is cp of the
# same bytes without reflink, plus sync.
xfs=$dir/xfs
if [ "$(id -u)" != 0 ] || ! command -v mkfs.xfs >/dev/null; then
  note "no XFS merge row: it needs root and mkfs.xfs (xfsprogs; make deps)"
elif ! { truncate -s $((half * 6 + (512 << 20))) "$dir/xfs.img" && mkfs.xfs -q -m reflink=1 "$dir/xfs.img" &&
  mkdir -p "$xfs" && mount -o loop "$dir/xfs.img" "$xfs"; } >>"$dir/cmd.log" 2>&1; then
  note "no XFS merge row: could not make or mount an XFS loop file system (see cmd.log)"
else
  mkdir "$xfs/x0"
  ln -s "$dir/base.vhd" "$xfs/x0/base.vhd"
  cp --reflink=never --sparse=always "$dir/m0/mid.vhd" "$dir/m0/over.vhd" "$xfs/x0/"
  cp --reflink=never "$dir/src.raw" "$xfs/src.raw"
  merge_xfs_vhdfs() {
    local r=$xfs/xrun t0
    rm -rf "$r"
    mkdir "$r"
    ln -s "$dir/base.vhd" "$r/base.vhd"
    cp --reflink=never --sparse=always "$xfs/x0/mid.vhd" "$xfs/x0/over.vhd" "$r/"
    sync "$r/mid.vhd" "$r/over.vhd"
    vmount "$r/over.vhd" "$mnt"
    t0=$(now)
    echo 'merge depth=1' >"$mnt/control"
    local t=$(($(now) - t0))
    record merge_xfs_vhdfs "$(mibps "$half" "$t")"
    record merge_xfs_vhdfs_ms "$(ms "$t")"
    if [ "$(json_field "$mnt/control" 'd["last"]["errno"]')" != 0 ]; then
      note "XFS merge: control reports $(json_field "$mnt/control" 'd["last"]')"
    fi
    vumount "$mnt"
    rm -rf "$r"
  }
  merge_xfs_cp() {
    local t0
    rm -f "$xfs/cp.raw"
    t0=$(now)
    cp --reflink=never "$xfs/src.raw" "$xfs/cp.raw"
    sync "$xfs/cp.raw"
    local t=$(($(now) - t0))
    record merge_xfs_cp "$(mibps "$half" "$t")"
    record merge_xfs_cp_ms "$(ms "$t")"
    rm -f "$xfs/cp.raw"
  }
  for ((i = 1; i <= runs; i++)); do
    if ((i % 2)); then merge_xfs_vhdfs; merge_xfs_cp; else merge_xfs_cp; merge_xfs_vhdfs; fi
    log "XFS merge $i/$runs: vhdfs $(grep '^merge_xfs_vhdfs_ms' "$samples" | tail -n 1 | cut -f2) ms, cp+sync $(grep '^merge_xfs_cp_ms' "$samples" | tail -n 1 | cut -f2) ms"
  done
  # Export of the dynamic base, copied onto the XFS file system, to a file there:
  # vhdfs shares the base's blocks (reflink), qemu-img convert writes them.
  rm -f "$xfs/src.raw"
  cp --reflink=never --sparse=always "$dir/base.vhd" "$xfs/base.vhd"
  export_xfs() { export_run export_xfs "$1" "$xfs/base.vhd" vpc "$xfs"; }
  for ((i = 1; i <= runs; i++)); do
    if ((i % 2)); then
      export_xfs vhdfs; export_xfs qemu
    else
      export_xfs qemu; export_xfs vhdfs
    fi
  done
  rm -f "$xfs/base.vhd"
  umount "$xfs"
  rm -f "$dir/xfs.img"
fi
rm -rf "$dir/m0" "$dir/q0"

# --- 5. export of a single dynamic layer -------------------------------------------

export_one() { export_run export "$1" "$dir/base.vhd" vpc; }
for ((i = 1; i <= runs; i++)); do
  if ((i % 2)); then export_one vhdfs; export_one qemu; else export_one qemu; export_one vhdfs; fi
  if ((i == 1)) && ! cmp -s "$dir/out-vhdfs.raw" "$dir/out-qemu.raw"; then
    note "export: vhdfs and qemu-img produce different raw images of base.vhd"
  fi
  rm -f "$dir/out-vhdfs.raw" "$dir/out-qemu.raw"
  log "export $i/$runs: vhdfs $(grep '^export_vhdfs_ms' "$samples" | tail -n 1 | cut -f2) ms, qemu-img $(grep '^export_qemu_ms' "$samples" | tail -n 1 | cut -f2) ms"
done

# --- 5b. convert of the chain into one dynamic VHDX ---------------------------------

# vhdfs converts the 3-deep VHD chain; qemu-img, which reads no differencing VHD,
# converts one dynamic VHD of the same bytes (flat.vhd, made from chain.raw and not
# timed). Both write a dynamic VHDX with 32 MiB blocks and are timed to a synced file.
# The disk space: section 4's copies are gone, and flat.vhd and the two outputs take
# less than they did.
qemu-img convert -q -f raw -O vpc -o subformat=dynamic,force_size=on "$dir/chain.raw" "$dir/flat.vhd"
convert_run() { # TOOL: records convert_TOOL's MiB/s and ms
  local o=$dir/conv-$1.vhdx t0
  rm -f "$o"
  t0=$(now)
  if [ "$1" = vhdfs ]; then
    "$vhdfs" convert -q "$dir/top.vhd" "$o" >>"$dir/cmd.log"
  else
    qemu-img convert -f vpc -O vhdx -o subformat=dynamic,block_size=32M "$dir/flat.vhd" "$o"
  fi
  sync "$o"
  local t=$(($(now) - t0))
  record "convert_$1" "$(mibps "$disk" "$t")"
  record "convert_$1_ms" "$(ms "$t")"
}
for ((i = 1; i <= runs; i++)); do
  if ((i % 2)); then convert_run vhdfs; convert_run qemu; else convert_run qemu; convert_run vhdfs; fi
  if ((i == 1)) && ! qemu-img compare -q -f vhdx -F vhdx "$dir/conv-vhdfs.vhdx" "$dir/conv-qemu.vhdx"; then
    note "convert: the VHDX of vhdfs and of qemu-img hold different disks"
  fi
  if ((i == 1)); then
    log "convert: vhdfs's VHDX takes $(($(stat -c %b "$dir/conv-vhdfs.vhdx") * 512 >> 20)) MiB, qemu-img's $(($(stat -c %b "$dir/conv-qemu.vhdx") * 512 >> 20)) MiB"
  fi
  rm -f "$dir/conv-vhdfs.vhdx" "$dir/conv-qemu.vhdx"
  log "convert $i/$runs: vhdfs $(grep '^convert_vhdfs_ms' "$samples" | tail -n 1 | cut -f2) ms, qemu-img $(grep '^convert_qemu_ms' "$samples" | tail -n 1 | cut -f2) ms"
done
rm -f "$dir/flat.vhd"

# The whole chain into a pipe (`vhdfs export top.vhd - | ...`), against cat of the
# exported raw into a pipe; the reader is cat into /dev/null, which copies once.
pipe_run() { # KEY
  local t0
  t0=$(now)
  if [ "$1" = vhdfs ]; then
    "$vhdfs" export "$dir/top.vhd" - | cat >/dev/null
  else
    cat "$dir/chain.raw" | cat >/dev/null
  fi
  record "pipe_$1" "$(mibps "$disk" $(($(now) - t0)))"
}
for ((i = 1; i <= runs; i++)); do
  if ((i % 2)); then pipe_run vhdfs; pipe_run cat; else pipe_run cat; pipe_run vhdfs; fi
done
log "export into a pipe: $(grep -E '^pipe_' "$samples" | awk '{ printf "%s %s  ", $1, $2 }')"

# --- 6. mount of a 16-deep chain of 2 TiB sparse images ----------------------------

deep=$dir/deep
mkdir "$deep"
"$vhdfs" create --size 2040G "$deep/d00.vhd" >>"$dir/cmd.log" # the largest a VHD can be
vmount "$deep/d00.vhd" "$mnt"
gen deep0 $((4 << 20)) | dd of="$mnt/disk.raw" bs=1M conv=notrunc status=none
gen deep1 $((4 << 20)) | dd of="$mnt/disk.raw" bs=1M seek=$((1 << 20)) conv=notrunc status=none
vumount "$mnt"
for ((i = 1; i < 16; i++)); do
  "$vhdfs" create --parent "$deep/d$(printf %02d $((i - 1))).vhd" "$deep/d$(printf %02d $i).vhd" >>"$dir/cmd.log"
done
vmount "$deep/d15.vhd" "$mnt"
gen deep15 $((1 << 20)) | dd of="$mnt/disk.raw" bs=1M seek=2 conv=notrunc status=none
vumount "$mnt"
log "mount: 16-deep chain of 2040 GiB (the largest a VHD can be) sparse images"

for ((i = 1; i <= runs; i++)); do
  t0=$(now)
  vmount "$deep/d15.vhd" "$mnt"
  t=$(($(now) - t0))
  record mount_ms "$(ms "$t")"
  dd if="$mnt/disk.raw" of=/dev/null bs=1M count=4 status=none
  dd if="$mnt/disk.raw" of=/dev/null bs=1M count=4 skip=$((1 << 20)) status=none
  dd if="$mnt/disk.raw" of=/dev/null bs=1M count=4 skip=$(((2040 << 10) - 8)) status=none
  pid=$(json_field "$mnt/control" 'd["pid"]')
  rss=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")
  record mount_rss "$rss"
  vumount "$mnt"
  log "mount $i/$runs: $(ms "$t") ms, RSS $rss MiB"
done

# --- 6b. mount time and RSS against depth and virtual size ------------------------

# One chain of 64 sparse images per size, made with vhdfs create: a dynamic VHD of
# BENCH_SIZE, one of 2040 GiB (the largest a VHD can be) and a 64 TiB VHDX with 1 MiB
# blocks (a 512 MiB block table per layer, paged). Depth 1, 16 and 64 are mounts of
# its layers 0, 15 and 63; each reads 1 MiB at the start, the middle and the end of
# the disk (through every layer, down to the base), then the RSS is read.
scale=$dir/scale
scale_specs="vhd_small:vhd:$size_arg vhd_2t:vhd:2040G vhdx_64t:vhdx:64T"
scale_depths="1 16 64"
t0=$(now)
for spec in $scale_specs; do
  IFS=: read -r key fmt sz <<<"$spec"
  mkdir -p "$scale/$key"
  opts=() child=vhd
  [ "$fmt" = vhdx ] && opts=(--block-size 1M) child=avhdx
  prev=$scale/$key/l00.$fmt
  "$vhdfs" create --size "$sz" "${opts[@]}" "$prev" >>"$dir/cmd.log"
  for ((i = 1; i < 64; i++)); do
    next=$scale/$key/l$(printf %02d $i).$child
    "$vhdfs" create "${opts[@]}" --parent "$prev" "$next" >>"$dir/cmd.log"
    prev=$next
  done
done
log "mount against depth: 3 chains of 64 made in $(ms $(($(now) - t0))) ms, $(du -sm "$scale" | cut -f1) MiB on disk"
scale_top() { # KEY DEPTH: the top image of that depth
  local f
  f=$(ls "$scale/$1" | sort | sed -n "$2p")
  echo "$scale/$1/$f"
}
for ((i = 1; i <= runs; i++)); do
  for spec in $scale_specs; do
    key=${spec%%:*}
    for depth in $scale_depths; do
      t0=$(now)
      vmount -r "$(scale_top "$key" "$depth")" "$mnt"
      t=$(($(now) - t0))
      mib=$(($(stat -c %s "$mnt/disk.raw") >> 20))
      for skip in 0 $((mib / 2)) $((mib - 1)); do
        dd if="$mnt/disk.raw" of=/dev/null bs=1M count=1 skip="$skip" status=none
      done
      pid=$(json_field "$mnt/control" 'd["pid"]')
      rss=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")
      vumount "$mnt"
      record "scale_${key}_${depth}_ms" "$(ms "$t")"
      record "scale_${key}_${depth}_rss" "$rss"
    done
  done
  log "mount against depth $i/$runs: $(grep '^scale_' "$samples" | tail -n 18 | awk '{ printf "%s %s  ", substr($1, 7), $2 }')"
done
rm -rf "$scale"

# --- 7. VHDX: the same chain as base.vhdx <- mid.avhdx <- top.avhdx ------------------

# The same bytes as the VHD chain (the same generator and seeds), made by vhdfs with
# Hyper-V's defaults: 32 MiB blocks in the base, 2 MiB in the checkpoints.
vx=$dir/vx
mkdir "$vx"
"$vhdfs" create --size "$disk" "$vx/base.vhdx" >>"$dir/cmd.log"
vmount "$vx/base.vhdx" "$mnt"
gen base "$disk" | dd of="$mnt/disk.raw" bs=1M iflag=fullblock conv=notrunc,fsync status=none
vumount "$mnt"
"$vhdfs" create --parent "$vx/base.vhdx" "$vx/mid.avhdx" >>"$dir/cmd.log"
vmount "$vx/mid.avhdx" "$mnt"
scatter "$mnt/disk.raw" "$n_mid" 1
vumount "$mnt"
"$vhdfs" create --parent "$vx/mid.avhdx" "$vx/top.avhdx" >>"$dir/cmd.log"
vmount "$vx/top.avhdx" "$mnt"
scatter "$mnt/disk.raw" "$n_top" 2
[ "$(md5 "$mnt/disk.raw")" = "$sum_raw" ] || note "VHDX: the chain differs from the VHD chain's chain.raw"
vumount "$mnt"
vhdimount "$vx/top.avhdx" "$vmnt" >>"$dir/cmd.log"
vxfile=$vmnt/$(ls "$vmnt" | sort -V | tail -n 1)
[ "$(head_md5 "$vxfile")" = "$sum_raw_head" ] || note "VHDX: vhdimount's $(basename "$vxfile") and chain.raw differ (in the first $vhdi_bytes bytes)"
fusermount3 -u "$vmnt"
log "VHDX: the same chain, 3 deep"

vx_coldread() { # KEY
  local pid
  case $1 in
    vhdfs)
      vmount -r "$vx/top.avhdx" "$mnt"
      pid=$(json_field "$mnt/control" 'd["pid"]')
      timed_read vx_vhdfs "$disk" "$pid" $(ddr "$mnt/disk.raw")
      vumount "$mnt"
      ;;
    vhd) # the VHD chain of the same bytes, in the same rotation
      vmount -r "$dir/top.vhd" "$mnt"
      pid=$(json_field "$mnt/control" 'd["pid"]')
      timed_read vx_vhd "$disk" "$pid" $(ddr "$mnt/disk.raw")
      vumount "$mnt"
      ;;
    vhdimount) vhdimount_read vx_vhdimount "$vx/top.avhdx" "$(basename "$vxfile")" ;;
  esac
}
for ((i = 1; i <= runs; i++)); do
  case $((i % 3)) in
    1) vx_coldread vhdfs; vx_coldread vhd; vx_coldread vhdimount ;;
    2) vx_coldread vhd; vx_coldread vhdimount; vx_coldread vhdfs ;;
    0) vx_coldread vhdimount; vx_coldread vhdfs; vx_coldread vhd ;;
  esac
done
vmount -r "$vx/top.avhdx" "$mnt"
vhdimount "$vx/top.avhdx" "$vmnt" >>"$dir/cmd.log"
vmnt_vhd=$dir/mnt-vhd
mkdir -p "$vmnt_vhd"
vmount -r "$dir/top.vhd" "$vmnt_vhd"
for ((i = 1; i <= runs; i++)); do
  case $((i % 3)) in
    1) fio_run vx_vhdfs "$mnt/disk.raw"; fio_run vx_vhd "$vmnt_vhd/disk.raw"; fio_run vx_vhdimount "$vxfile" ;;
    2) fio_run vx_vhd "$vmnt_vhd/disk.raw"; fio_run vx_vhdimount "$vxfile"; fio_run vx_vhdfs "$mnt/disk.raw" ;;
    0) fio_run vx_vhdimount "$vxfile"; fio_run vx_vhdfs "$mnt/disk.raw"; fio_run vx_vhd "$vmnt_vhd/disk.raw" ;;
  esac
done
vumount "$vmnt_vhd"
fusermount3 -u "$vmnt"
vumount "$mnt"
log "VHDX reads: $(grep -E '^(coldread|fio)_vx_' "$samples" | awk '{ printf "%s %s  ", $1, $2 }')"

# Export of the dynamic base, against qemu-img convert (qemu reads dynamic VHDX).
vx_export() { export_run export_vx "$1" "$vx/base.vhdx" vhdx; }
for ((i = 1; i <= runs; i++)); do
  if ((i % 2)); then vx_export vhdfs; vx_export qemu; else vx_export qemu; vx_export vhdfs; fi
  if ((i == 1)) && ! cmp -s "$dir/out-vhdfs.raw" "$dir/out-qemu.raw"; then
    note "VHDX export: vhdfs and qemu-img produce different raw images of base.vhdx"
  fi
  rm -f "$dir/out-vhdfs.raw" "$dir/out-qemu.raw"
done

# Merge depth=1 of an overlay of half the disk into a fresh copy of mid.avhdx, against
# cp + sync of the same bytes.
mkdir "$vx/m0"
ln "$vx/base.vhdx" "$vx/m0/base.vhdx"
cp --sparse=always "$vx/mid.avhdx" "$vx/m0/mid.avhdx"
"$vhdfs" create --parent "$vx/m0/mid.avhdx" "$vx/m0/over.avhdx" >>"$dir/cmd.log"
vmount "$vx/m0/over.avhdx" "$mnt"
dd if="$dir/src.raw" of="$mnt/disk.raw" bs=1M conv=notrunc,fsync status=none
vumount "$mnt"
vx_merge() { merge_run merge_vx_vhdfs "$vx/m0" base.vhdx mid.avhdx over.avhdx; }
merge_vx_cp() { cp_run merge_vx_cp; }
for ((i = 1; i <= runs; i++)); do
  if ((i % 2)); then vx_merge; merge_vx_cp; else merge_vx_cp; vx_merge; fi
  log "VHDX merge $i/$runs: vhdfs $(grep '^merge_vx_vhdfs_ms' "$samples" | tail -n 1 | cut -f2) ms, cp+sync $(grep '^merge_vx_cp_ms' "$samples" | tail -n 1 | cut -f2) ms"
done
rm -rf "$vx"

# --- 8. compact of a dynamic image half of whose blocks were zeroed ---------------------

# c0/half.vhd: base.vhd (every block written) with zeros written over every other
# 2 MiB block through a mount. Each run compacts a fresh copy in place, against
# qemu-img convert of the same copy to a new sparse VHD (which skips zero blocks),
# each with a sync of its output.
mkdir "$dir/c0"
cp --sparse=always "$dir/base.vhd" "$dir/c0/half.vhd"
vmount "$dir/c0/half.vhd" "$mnt"
python3 - "$mnt/disk.raw" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
size, bs = os.fstat(fd).st_size, 2 << 20
z = bytes(bs)
for off in range(bs, size - size % bs, 2 * bs):
    os.pwrite(fd, z, off)
os.fsync(fd)
os.close(fd)
PY
sum_half=$(md5 "$mnt/disk.raw")
vumount "$mnt"
half_size=$(stat -c %s "$dir/c0/half.vhd")
log "compact: half.vhd ($((half_size >> 20)) MiB), every other block zeroed"
compact_run() { # TOOL
  local r=$dir/crun t0 t res
  rm -rf "$r"
  mkdir "$r"
  cp --sparse=always "$dir/c0/half.vhd" "$r/x.vhd"
  sync "$r/x.vhd"
  t0=$(now)
  if [ "$1" = vhdfs ]; then
    "$vhdfs" compact "$r/x.vhd" >>"$dir/cmd.log"
    sync "$r/x.vhd"
    res=$r/x.vhd
  else
    qemu-img convert -f vpc -O vpc "$r/x.vhd" "$r/y.vhd"
    sync "$r/y.vhd"
    res=$r/y.vhd
  fi
  t=$(($(now) - t0))
  record "compact_$1" "$(mibps "$half_size" "$t")"
  record "compact_$1_ms" "$(ms "$t")"
  record "compact_$1_mib" "$(awk -v b="$(stat -c %s "$res")" 'BEGIN { printf "%.1f", b / 1048576 }')"
  if [ "$1" = vhdfs ] && [ ! -e "$dir/c0/checked" ]; then
    [ "$("$vhdfs" export "$res" - | md5sum | cut -d' ' -f1)" = "$sum_half" ] || note "compact: the compacted image reads other data than before"
    "$vhdfs" check "$res" >>"$dir/cmd.log" 2>&1 || note "compact: check of the compacted image found errors"
    touch "$dir/c0/checked"
  fi
  rm -rf "$r"
}
for ((i = 1; i <= runs; i++)); do
  if ((i % 2)); then compact_run vhdfs; compact_run qemu; else compact_run qemu; compact_run vhdfs; fi
  log "compact $i/$runs: vhdfs $(grep '^compact_vhdfs_ms' "$samples" | tail -n 1 | cut -f2) ms, qemu-img convert $(grep '^compact_qemu_ms' "$samples" | tail -n 1 | cut -f2) ms"
done
rm -rf "$dir/c0"

# --- the table ---------------------------------------------------------------------

log "done in $(($(date +%s) - t_begin)) s"
version=$("$vhdfs" version 2>/dev/null | head -n 1 | sed 's/^vhdfs //' || echo unknown)
python3 - "$samples" "$dir/notes" "$samples.load" >"$dir/table.md" <<PY
import statistics, sys
samples, loads = {}, {}
for line in open(sys.argv[1]):
    k, v = line.split()
    samples.setdefault(k, []).append(float(v))
for line in open(sys.argv[3]):
    k, v = line.split()
    loads.setdefault(k, []).append(float(v))
try:
    notes = [l.strip() for l in open(sys.argv[2]) if l.strip()]
except FileNotFoundError:
    notes = []
med = lambda k: statistics.median(samples[k])
def num(x):
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}"
rows = []
# ratio gives vhdfs / alternative as the median of the per-round ratios (the samples
# of a and b are taken in the same rounds, one after the other), with their range and
# the median load average while they were taken; the ratio of the medians where the
# rounds do not pair up.
def ratio(a, b):
    xa, xb = samples[a], samples[b]
    ld = loads.get(a, []) + loads.get(b, [])
    tail = f"; load {statistics.median(ld):.1f}" if ld else ""
    if len(xa) == len(xb) and len(xa) > 1 and all(xb):
        rs = [x / y for x, y in zip(xa, xb)]
        r = statistics.median(rs)
        return r, f"{r:.2f}× ({min(rs):.2f}–{max(rs):.2f}{tail})"
    r = med(a) / med(b)
    return r, f"{r:.2f}×" + (f" ({tail[2:]})" if tail else "")
def compare(name, a, b, unit, alt_name, target, extra=None):
    va, vb = med(a), med(b)
    r, cell = ratio(a, b)
    cells = [f"{num(va)} {unit}", f"{alt_name}: {num(vb)} {unit}", cell, f"≥ {target:g}×", "yes" if r >= target else "**no**"]
    if extra:
        cells[0] += f" ({num(med(extra[0]))} ms)"
        cells[1] += f" ({num(med(extra[1]))} ms)"
    rows.append([name] + cells)
compare("sequential read, dd bs=1M, fresh mount (disk.raw cold, images cached)", "coldread_vhdfs", "coldread_cat", "MiB/s", "cat of the exported raw", 0.35)
if "coldread_loopback" in samples:
    compare("sequential read, dd bs=1M, fresh mount", "coldread_vhdfs", "coldread_loopback", "MiB/s", "go-fuse's loopback of the exported raw, no passthrough", 1.6)
def info(name, a, b, unit, alt_name):
    if a in samples and b in samples:
        va, vb = med(a), med(b)
        rows.append([name, f"{num(va)} {unit}", f"{alt_name}: {num(vb)} {unit}", ratio(a, b)[1], "—", "—"])
info("sequential read, dd bs=1M, fresh mount: the lead without read-ahead's part (informational)", "coldread_vhdfs", "coldread_loopback_ra", "MiB/s", "that loopback with vhdfs's 1 MiB read-ahead")
if "coldread_baseline" in samples:
    info("sequential read, dd bs=1M, fresh mount, against BENCH_BASELINE", "coldread_vhdfs", "coldread_baseline", "MiB/s", "$(basename "${BENCH_BASELINE:-none}")")
    rows[-1][2] += f" (CPU {med('coldcpu_baseline'):.2f} s/GiB)"
info("sequential read, dd bs=1M, fresh mount (informational)", "coldread_vhdfs", "coldread_qsd", "MiB/s", "qemu-storage-daemon's FUSE export of base.vhd")
info("sequential read, dd bs=1M, fresh mount (informational)", "coldread_vhdfs", "coldread_vhdimount", "MiB/s", "vhdimount, fresh")
compare("sequential read, dd bs=1M iflag=direct, fresh mount", "coldread_direct_vhdfs", "coldread_cat", "MiB/s", "cat of the exported raw", 0.5)
cpu = med("coldcpu_vhdfs")
alts = " / ".join(f"{n} {med('coldcpu_' + k):.2f}" for k, n in
                  [("cat", "cat"), ("loopback", "loopback"), ("qsd", "qemu-storage-daemon"), ("vhdimount", "vhdimount")]
                  if "coldcpu_" + k in samples)
rows.append(["CPU of that fresh-mount read (reader + server), s per GiB", f"{cpu:.2f} s (O_DIRECT: {med('coldcpu_direct_vhdfs'):.2f} s)",
             alts, "—", "≤ 0.7 s", "yes" if cpu <= 0.7 else "**no**"])
compare("sequential read, warm cache: the kernel's page cache", "seqread_vhdfs", "seqread_vhdimount", "MiB/s", "vhdimount", 20)
compare("sequential read, warm cache: the kernel's page cache", "seqread_vhdfs", "seqread_cat", "MiB/s", "cat of the exported raw", 0.5)
va, vb = med("seqread_vhdfs_fuse"), med("seqread_vhdimount")
rows.append(["sequential read, disk.raw's page cache dropped (informational)", f"{num(va)} MiB/s",
             f"vhdimount: {num(vb)} MiB/s", f"{va / vb:.2f}×", "—", "—"])
compare("random 4 KiB reads, fio psync, 4 jobs", "fio_vhdfs", "fio_vhdimount", "IOPS", "vhdimount", 10)
va, vb = med("fio_direct_vhdfs"), med("fio_direct_vhdimount")
rows.append(["random 4 KiB reads, O_DIRECT: no page cache (informational)", f"{num(va)} IOPS",
             f"vhdimount: {num(vb)} IOPS", f"{va / vb:.2f}×", "—", "—"])
if "fio_direct_qsd" in samples:
    compare("random 4 KiB reads, O_DIRECT, 4 jobs", "fio_direct_vhdfs", "fio_direct_qsd", "IOPS", "qemu-storage-daemon's FUSE export of base.vhd", 2.2)
if "fio_qd32_qsd" in samples:
    compare("random 4 KiB reads, O_DIRECT, 1 job at queue depth 32 (libaio)", "fio_qd32_vhdfs", "fio_qd32_qsd", "IOPS", "qemu-storage-daemon's FUSE export of base.vhd", 2.0)
if "fio_qd1_qsd" in samples:
    compare("random 4 KiB reads, O_DIRECT, 1 job at queue depth 1 (libaio)", "fio_qd1_vhdfs", "fio_qd1_qsd", "IOPS", "qemu-storage-daemon's FUSE export of base.vhd", 1.0)
if "fio_direct_loopback" in samples:
    compare("random 4 KiB reads, O_DIRECT, 4 jobs", "fio_direct_vhdfs", "fio_direct_loopback", "IOPS", "go-fuse's loopback of the exported raw, no passthrough", 0.9)
info("random 4 KiB reads, O_DIRECT, 1 job at queue depth 32 (libaio; informational)", "fio_qd32_vhdfs", "fio_qd32_loopback", "IOPS", "go-fuse's loopback of the exported raw, no passthrough")
info("random 4 KiB reads, O_DIRECT, 1 job at queue depth 1 (libaio; informational)", "fio_qd1_vhdfs", "fio_qd1_loopback", "IOPS", "go-fuse's loopback of the exported raw, no passthrough")
info("re-read of disk.raw mounted with -o direct_io (its cost; informational)", "reread_directio", "reread_cached", "MiB/s", "the default mount's page cache")
compare("sequential write $((half >> 20)) MiB, dd conv=fsync, fresh top", "write_vhdfs", "write_plain", "MiB/s", "plain file", 0.4)
compare("merge depth=1 of a $((half >> 20)) MiB overlay", "merge_vhdfs", "merge_cp", "MiB/s", "cp + sync", 0.5, ("merge_vhdfs_ms", "merge_cp_ms"))
if "merge_xfs_vhdfs" in samples:
    compare("merge depth=1 of a $((half >> 20)) MiB overlay on XFS (reflink)", "merge_xfs_vhdfs", "merge_xfs_cp", "MiB/s", "cp --reflink=never + sync", 5, ("merge_xfs_vhdfs_ms", "merge_xfs_cp_ms"))
if "export_xfs_vhdfs" in samples:
    info("export of one dynamic layer on XFS (reflink; informational)", "export_xfs_vhdfs", "export_xfs_qemu", "MiB/s", "qemu-img convert")
    rows[-1][1] += f" ({num(med('export_xfs_vhdfs_ms'))} ms)"
    rows[-1][2] += f" ({num(med('export_xfs_qemu_ms'))} ms)"
va, vb = med("merge_vhdfs"), med("merge_qemu")
rows.append(["merge depth=1 of a $((half >> 20)) MiB overlay (informational)", f"{num(va)} MiB/s ({num(med('merge_vhdfs_ms'))} ms)",
             f"qemu-img commit of the same qcow2 chain: {num(vb)} MiB/s ({num(med('merge_qemu_ms'))} ms)", f"{va / vb:.2f}×", "—", "—"])
compare("export of one dynamic layer", "export_vhdfs", "export_qemu", "MiB/s", "qemu-img convert", 1, ("export_vhdfs_ms", "export_qemu_ms"))
compare("convert of the 3-deep chain into a dynamic VHDX", "convert_vhdfs", "convert_qemu", "MiB/s", "qemu-img convert -O vhdx of one dynamic VHD of the same bytes", 1, ("convert_vhdfs_ms", "convert_qemu_ms"))
# VHDX rows are held to the VHD rows of the same bytes, in the same rotation: the
# format must not cost. libvhdi reads VHDX some 40 times faster than VHD, so the VHD
# rows' vhdimount targets do not carry over; those ratios are informational.
info("export of the 3-deep chain into a pipe (informational)", "pipe_vhdfs", "pipe_cat", "MiB/s", "cat of the exported raw into a pipe")
compare("VHDX: sequential read, dd bs=1M, fresh mount", "coldread_vx_vhdfs", "coldread_vx_vhd", "MiB/s", "vhdfs on the VHD chain of the same bytes", 0.9)
info("VHDX: sequential read, dd bs=1M, fresh mount (informational)", "coldread_vx_vhdfs", "coldread_vx_vhdimount", "MiB/s", "vhdimount, fresh")
compare("VHDX: random 4 KiB reads, fio psync, 4 jobs", "fio_vx_vhdfs", "fio_vx_vhd", "IOPS", "vhdfs on the VHD chain of the same bytes", 0.9)
info("VHDX: random 4 KiB reads, fio psync, 4 jobs (informational)", "fio_vx_vhdfs", "fio_vx_vhdimount", "IOPS", "vhdimount")
compare("VHDX: export of the dynamic base", "export_vx_vhdfs", "export_vx_qemu", "MiB/s", "qemu-img convert", 1, ("export_vx_vhdfs_ms", "export_vx_qemu_ms"))
compare("VHDX: merge depth=1 of a $((half >> 20)) MiB overlay", "merge_vx_vhdfs", "merge_vx_cp", "MiB/s", "cp + sync", 0.5, ("merge_vx_vhdfs_ms", "merge_vx_cp_ms"))
compare("compact of a dynamic image, every other block zeroed", "compact_vhdfs", "compact_qemu", "MiB/s", "qemu-img convert -O vpc to a new sparse file", 1, ("compact_vhdfs_ms", "compact_qemu_ms"))
rows[-1][1] += f", {num(med('compact_vhdfs_mib'))} MiB left"
rows[-1][2] += f", {num(med('compact_qemu_mib'))} MiB"
m, rss = med("mount_ms"), med("mount_rss")
rows.append(["mount of a 16-deep chain of 2 TiB images", f"{num(m)} ms", "—", "—", "< 300 ms", "yes" if m < 300 else "**no**"])
rows.append(["RSS of that mount after reading 12 MiB", f"{num(rss)} MiB", "—", "—", "< 100 MiB", "yes" if rss < 100 else "**no**"])
for key, label in [("vhd_small", "$size_arg VHD"), ("vhd_2t", "2 TiB VHD"), ("vhdx_64t", "64 TiB VHDX (1 MiB blocks)")]:
    depths = [d for d in "$scale_depths".split() if f"scale_{key}_{d}_ms" in samples]
    ms_ = [med(f"scale_{key}_{d}_ms") for d in depths]
    rss_ = [med(f"scale_{key}_{d}_rss") for d in depths]
    ok = max(ms_) < 3000 and max(rss_) < 100
    rows.append([f"mount of a chain of {label} images, depth " + " / ".join(depths) + ", then RSS after reading 3 MiB",
                 " / ".join(f"{num(x)}" for x in ms_) + " ms; " + " / ".join(f"{num(x)}" for x in rss_) + " MiB",
                 "—", "—", "< 3 s, < 100 MiB", "yes" if ok else "**no**"])

print("## vhdfs benchmark")
print()
print("BENCH_SIZE=$size_arg (disk.raw $disk bytes), chain depth 3, medians of $runs runs "
      "(of $cold_runs for the fresh-mount reads but vhdimount's), "
      "fio ${fio_runtime}s per run; vhdfs $version; $(nproc) cores, kernel $(uname -r); "
      "load at start $(cut -d' ' -f1-3 /proc/loadavg).")
if $vhdi_bytes < $disk:
    print()
    print("vhdimount's sequential reads read its first $((vhdi_bytes >> 20)) MiB (BENCH_VHDI_READ); the others read all of disk.raw.")
print()
print("| workload | vhdfs | alternative | ratio | target | met |")
print("|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
print("Ratio is vhdfs / alternative (throughputs; for merge, export and convert, of the times' inverse): "
      "the median of the ratios of the rounds, which take both one after the other, then their range and "
      "the median 1-minute load average while the samples were taken.")
print()
print("Samples, in run order:")
print()
for k, v in samples.items():
    print(f"- {k}: " + ", ".join(num(x) for x in v))
if notes:
    print()
    print("Notes:")
    print()
    for n in notes:
        print(f"- {n}")
PY
cp "$dir/table.md" "$out"
cat "$dir/table.md"
log "table written to $out"
