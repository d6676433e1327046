package test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestFsx is a random read/write/punch/fsync test of disk.raw against an in-memory model,
// in the manner of xfstests' fsx: thousands of operations at unaligned offsets and
// lengths, across block boundaries and the end of the disk, through buffered and
// O_DIRECT handles and mmap, on a chain of depth 3. Each read is checked at once; at
// the end the disk is unmounted, mounted again and compared whole.
//
// VHDFS_FSX_SEED and VHDFS_FSX_OPS override the seed and the number of operations; the
// seed is printed when the test fails.
func TestFsx(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tc := range []struct {
			name   string
			create []string
			seed   uint64
		}{
			{"64K blocks", []string{"--size", "32M", "--block-size", "64K"}, 1},
			{"2M blocks", []string{"--size", "40M"}, 2},
		} {
			t.Run(tc.name, func(t *testing.T) {
				seed, ops := tc.seed, 3000
				if s := os.Getenv("VHDFS_FSX_SEED"); s != "" {
					v, err := strconv.ParseUint(s, 10, 64)
					if err != nil {
						t.Fatalf("VHDFS_FSX_SEED=%q: %v", s, err)
					}
					seed = v
				}
				if s := os.Getenv("VHDFS_FSX_OPS"); s != "" {
					v, err := strconv.Atoi(s)
					if err != nil {
						t.Fatalf("VHDFS_FSX_OPS=%q: %v", s, err)
					}
					ops = v
				}
				c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: tc.create, Writes: 15, Align: 512, MaxLen: 200 << 10, Seed: seed})
				lower := snapshotFiles(t, c.Images[:len(c.Images)-1]...)
				block := vhdfsInfo(t, c.Top()).Layers[0].BlockSize
				mnt := mMountpoint(t)
				mMount(t, c.Top(), mnt)
				x := &fsx{
					t:     t,
					rng:   rand.New(rand.NewPCG(seed, 0xf5)),
					disk:  filepath.Join(mnt, "disk.raw"),
					model: bytes.Clone(c.Model()),
					size:  c.Size,
					block: block,
				}
				t.Cleanup(func() {
					if t.Failed() {
						t.Logf("fsx seed %d (rerun with VHDFS_FSX_SEED=%d); the last operations:\n%s", seed, seed, strings.Join(x.log, "\n"))
					}
				})
				x.open()
				for i := range ops {
					x.step(i)
					x.checkSize(i)
					if t.Failed() {
						break
					}
				}
				x.close()
				if t.Failed() {
					mUmount(t, mnt)
					return
				}
				assertSameBytes(t, "disk.raw at the end", fileBytes(t, x.disk), x.model)
				mUmount(t, mnt)
				assertUnchanged(t, lower)
				mCheck(t, c.Top())
				assertSameBytes(t, "a fresh mount", mMountRead(t, c.Top()), x.model)
				t.Logf("seed %d: %d operations: %v", seed, ops, x.counts)
			})
		}
	})
}

// fsx is the state of one fsx run.
type fsx struct {
	t      *testing.T
	rng    *rand.Rand
	disk   string
	model  []byte
	size   int64
	block  int64
	f, d   *os.File // buffered and O_DIRECT handles of disk.raw
	log    []string // the last operations, for a failure
	counts map[string]int
}

func (x *fsx) open() {
	var err error
	if x.f, err = os.OpenFile(x.disk, os.O_RDWR, 0); err != nil {
		x.t.Fatal(err)
	}
	if x.d, err = os.OpenFile(x.disk, os.O_RDWR|syscall.O_DIRECT, 0); err != nil {
		x.t.Fatal(err)
	}
}

func (x *fsx) close() {
	for _, f := range []*os.File{x.f, x.d} {
		if err := f.Close(); err != nil {
			x.t.Errorf("close: %v", err)
		}
	}
}

func (x *fsx) logf(format string, args ...any) {
	x.log = append(x.log, fmt.Sprintf(format, args...))
	if len(x.log) > 30 {
		x.log = x.log[1:]
	}
}

// offLen picks an operation's range: lengths from one byte to 1.5 MiB, mostly short;
// offsets anywhere, just before a block boundary, or near and past the end.
func (x *fsx) offLen() (int64, int64) {
	var n int64
	switch r := x.rng.IntN(10); {
	case r < 5:
		n = 1 + x.rng.Int64N(4096)
	case r < 9:
		n = 1 + x.rng.Int64N(128<<10)
	default:
		n = 1 + x.rng.Int64N(3*mib/2)
	}
	var off int64
	switch r := x.rng.IntN(20); {
	case r < 6:
		b := x.block * (1 + x.rng.Int64N(x.size/x.block))
		off = b - 1 - x.rng.Int64N(min(n, b))
	case r < 8:
		off = x.size - 1 - x.rng.Int64N(min(2*n, x.size))
	case r < 9:
		off = x.size + x.rng.Int64N(8192)
	default:
		off = x.rng.Int64N(x.size)
	}
	return max(off, 0), n
}

func (x *fsx) step(i int) {
	if x.counts == nil {
		x.counts = map[string]int{}
	}
	var op string
	switch r := x.rng.IntN(100); {
	case r < 28:
		op = "read"
	case r < 38:
		op = "read direct"
	case r < 63:
		op = "write"
	case r < 65:
		op = "punch"
	case r < 66:
		op = "zero range"
	case r < 76:
		op = "write direct"
	case r < 84:
		op = "mapread"
	case r < 92:
		op = "mapwrite"
	case r < 97:
		op = "fsync"
	default:
		op = "reopen"
	}
	x.counts[op]++
	off, n := x.offLen()
	f := x.f
	if strings.HasSuffix(op, "direct") {
		// O_DIRECT takes any length through FUSE; keep whole sectors anyway, as block
		// devices want them.
		f, off, n = x.d, off&^511, max(n&^511, 512)
	}
	switch op {
	case "read", "read direct":
		x.logf("%d: %s %d bytes at %d", i, op, n, off)
		x.read(f, op, off, n)
	case "write", "write direct":
		x.logf("%d: %s %d bytes at %d", i, op, n, off)
		x.write(f, op, off, n)
	case "punch", "zero range":
		x.logf("%d: %s %d bytes at %d", i, op, n, off)
		x.punch(op, off, n)
	case "mapread", "mapwrite":
		if off >= x.size {
			off = x.rng.Int64N(x.size)
		}
		n = min(n, x.size-off)
		x.logf("%d: %s %d bytes at %d", i, op, n, off)
		x.mmap(op, off, n)
	case "fsync":
		x.logf("%d: fsync", i)
		if err := x.f.Sync(); err != nil {
			x.t.Errorf("op %d: fsync: %v", i, err)
		}
	case "reopen":
		x.logf("%d: close and reopen", i)
		x.close()
		x.open()
	}
}

// checkSize fails the test if the kernel no longer sees disk.raw at its size: it takes
// a READ reply shorter than asked for for the end of the file and shrinks its size to
// there (until it asks the server again), and then reads past there come back short
// and a mapping faults.
func (x *fsx) checkSize(i int) {
	fi, err := x.f.Stat()
	if err != nil {
		x.t.Errorf("after op %d: fstat: %v", i, err)
	} else if fi.Size() != x.size {
		x.t.Errorf("after op %d: disk.raw's size is %d, want %d (a short READ reply?)", i, fi.Size(), x.size)
	}
}

func (x *fsx) read(f *os.File, op string, off, n int64) {
	buf := make([]byte, n)
	k, err := f.ReadAt(buf, off)
	want := max(min(n, x.size-off), 0)
	if int64(k) != want {
		x.t.Errorf("%s %d bytes at %d: read %d, want %d (%v)", op, n, off, k, want, err)
		return
	}
	if k < int(n) && err != io.EOF {
		x.t.Errorf("%s %d bytes at %d: short read with %v, want EOF", op, n, off, err)
	}
	if k == int(n) && err != nil {
		x.t.Errorf("%s %d bytes at %d: %v", op, n, off, err)
	}
	if k > 0 {
		assertSameBytes(x.t, fmt.Sprintf("%s %d bytes at %d", op, n, off), buf[:k], x.model[off:off+int64(k)])
	}
}

func (x *fsx) write(f *os.File, op string, off, n int64) {
	data := mRandBytes(x.rng, int(n))
	if x.rng.IntN(8) == 0 {
		clear(data) // zeros must still hide the layers below
	}
	k, err := mPwrite(f, data, off)
	if op == "write direct" && off+n > x.size {
		x.directPastEnd(f, data, off, k, err)
		return
	}
	want := max(min(n, x.size-off), 0)
	if int64(k) != want {
		x.t.Errorf("%s %d bytes at %d: wrote %d, want %d (%v)", op, n, off, k, want, err)
	}
	if want < n && !errors.Is(err, syscall.ENOSPC) {
		x.t.Errorf("%s %d bytes at %d, past the end at %d: %v, want ENOSPC", op, n, off, x.size, err)
	}
	if want == n && err != nil {
		x.t.Errorf("%s %d bytes at %d: %v", op, n, off, err)
	}
	if k > 0 {
		copy(x.model[off:off+int64(k)], data[:k])
	}
}

// directPastEnd checks an O_DIRECT write that crosses the end: the kernel sends the
// requests of an O_DIRECT write together (ASYNC_DIO) and fails the whole write when
// one fails, so vhdfs refuses the request that crosses the end (ENOSPC) and the write
// fails; a request before it, of a write longer than one request, may have been
// written. So: ENOSPC, nothing reported written, and each byte up to the end is the
// old one or the new one (the model takes what is there).
func (x *fsx) directPastEnd(f *os.File, data []byte, off int64, k int, err error) {
	if k != 0 || !errors.Is(err, syscall.ENOSPC) {
		x.t.Errorf("write direct %d bytes at %d, past the end at %d: wrote %d (%v), want 0 and ENOSPC", len(data), off, x.size, k, err)
	}
	if off >= x.size {
		return
	}
	got := make([]byte, x.size-off)
	if _, err := x.f.ReadAt(got, off); err != nil && err != io.EOF {
		x.t.Errorf("read back after write direct at %d: %v", off, err)
		return
	}
	for i := range got {
		if got[i] != x.model[off+int64(i)] && got[i] != data[i] {
			x.t.Errorf("write direct %d bytes at %d (refused): byte %d is %#x, neither the old %#x nor the written %#x", len(data), off, off+int64(i), got[i], x.model[off+int64(i)], data[i])
			return
		}
	}
	copy(x.model[off:], got)
}

// punch makes [off, off+n) read zeros with fallocate (PUNCH_HOLE or ZERO_RANGE, with
// KEEP_SIZE): the part inside the disk.
func (x *fsx) punch(op string, off, n int64) {
	mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
	if op == "zero range" {
		mode = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
	}
	if err := unix.Fallocate(int(x.f.Fd()), mode, off, n); err != nil {
		x.t.Errorf("%s %d bytes at %d: %v", op, n, off, err)
		return
	}
	if off < x.size {
		clear(x.model[off:min(off+n, x.size)])
	}
}

// mmap reads or writes [off, off+n) through a shared mapping of the buffered handle;
// a write is followed by msync(MS_SYNC).
func (x *fsx) mmap(op string, off, n int64) {
	page := int64(os.Getpagesize())
	start := off / page * page
	m, err := syscall.Mmap(int(x.f.Fd()), start, int(off+n-start), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		x.t.Errorf("%s: mmap %d bytes at %d: %v", op, off+n-start, start, err)
		return
	}
	defer func() {
		if err := syscall.Munmap(m); err != nil {
			x.t.Errorf("%s: munmap: %v", op, err)
		}
	}()
	p := m[off-start:]
	if op == "mapread" {
		got := make([]byte, n)
		if x.mapped(op, off, p, func() { copy(got, p) }) {
			assertSameBytes(x.t, fmt.Sprintf("mapread %d bytes at %d", n, off), got, x.model[off:off+n])
		}
		return
	}
	data := mRandBytes(x.rng, int(n))
	if !x.mapped(op, off, p, func() { copy(p, data) }) {
		return
	}
	copy(x.model[off:], data)
	if _, _, e := syscall.Syscall(syscall.SYS_MSYNC, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), syscall.MS_SYNC); e != 0 {
		x.t.Errorf("mapwrite %d bytes at %d: msync: %v", n, off, e)
	}
}

// mapped runs fn, which reads or writes p, the mapping of [off, off+len(p)), and reports
// whether it got through. A page fault the kernel cannot serve (the READ for the page
// failed or came back short, or the page is past the size the kernel has for the
// file) is a SIGBUS, which would kill the test binary: SetPanicOnFault turns it into a
// panic, recovered here to fail the test with the operation and the offset.
func (x *fsx) mapped(op string, off int64, p []byte, fn func()) (ok bool) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		f, isFault := r.(interface{ Addr() uintptr })
		if !isFault {
			panic(r)
		}
		size := "unknown"
		if fi, err := x.f.Stat(); err == nil {
			size = strconv.FormatInt(fi.Size(), 10)
		}
		x.t.Errorf("%s %d bytes at %d: the mapping faulted (SIGBUS) near disk.raw's byte %d; its size is now %s, want %d",
			op, len(p), off, off+int64(f.Addr()-uintptr(unsafe.Pointer(&p[0]))), size, x.size)
	}()
	fn()
	return true
}
