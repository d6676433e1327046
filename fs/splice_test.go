package fs

import (
	"bytes"
	"io"
	"log"
	"os"
	"path/filepath"
	"testing"

	"github.com/hanwen/go-fuse/v2/splice"
	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/vhd"
)

// TestSpliceReplyFits: a spliced READ reply must pass whole into the pipe go-fuse
// moves it to (grown to header + size + a page bytes, the header in one of its
// slots), or not be spliced at all. Here 248 KiB of a chain of two VHDs, 31 runs that
// alternate between the layers at sector (not page) boundaries, take 92 pipe buffers
// (a buffer per page of each run); go-fuse's pipe has 64 slots, one the header's. The
// reply's own pipe, an earlier reply's from go-fuse's pool, held them all; spliced,
// the reply went over short, and the kernel took it for the end of disk.raw.
func TestSpliceReplyFits(t *testing.T) {
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.vhd"), filepath.Join(dir, "top.vhd")
	if err := vhd.Create(base, vhd.CreateOptions{Type: vhd.TypeDynamic, Size: 8 << 20, ExactSize: true}); err != nil {
		t.Fatal(err)
	}
	const size = 248 << 10
	want := make([]byte, size+256<<10)
	for i := range want {
		want[i] = byte(i*7 + 1)
	}
	c, err := chain.Open(base, true)
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.WriteAt(want, 0)
	if cerr := c.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	testChild(t, base, top)
	if c, err = chain.Open(top, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	for k := range 15 {
		off := k*(16<<10) + 512
		for i := off; i < off+512; i++ {
			want[i] = byte(i*3 + 2)
		}
		if _, err := c.WriteAt(want[off:off+512], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	pieces := 0
	if _, err := c.FileRuns(nil, 0, size, func(chain.Piece) error { pieces++; return nil }); err != nil {
		t.Fatal(err)
	}
	if pieces != 31 {
		t.Fatalf("%d pieces, want 31", pieces)
	}
	n := &diskNode{root: NewRoot(c, Options{Logger: log.New(io.Discard, "", 0)}), writable: true}
	if spliceThrough(t, n, 0, size, want) {
		t.Log("spliced (and passed whole)")
	}
	// A run of whole pages, at page-aligned offsets of one file, still goes by splice.
	if !spliceThrough(t, n, size, 256<<10, want[size:]) {
		t.Error("256 KiB of one run of the base were copied, not spliced")
	}
}

// spliceThrough reads size bytes at off of n as the kernel's READ would, and if the
// reply is a pipe, passes it on as go-fuse does (fuse.fuseFD.trySplice: a pipe of its
// own, grown to header + size + a page bytes, the header written, the reply moved in
// with one splice). It fails the test if the pipe does not take the whole reply or
// holds bytes other than want, and reports whether the reply was spliced.
func spliceThrough(t *testing.T, n *diskNode, off int64, size int, want []byte) bool {
	t.Helper()
	// The pool hands out its latest pipe: make it a large one, as an earlier large
	// reply leaves it.
	p, err := splice.Get()
	if err != nil {
		t.Skip(err)
	}
	if err := p.Grow(1 << 20); err != nil {
		t.Skip(err)
	}
	splice.Done(p)
	res, ok := n.spliceRead(int64(size), off)
	if !ok {
		return false // copied
	}
	defer res.Done()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	if _, err := unix.FcntlInt(pw.Fd(), unix.F_SETPIPE_SZ, 16+size+os.Getpagesize()); err != nil {
		t.Fatal(err)
	}
	if _, err := pw.Write(make([]byte, 16)); err != nil {
		t.Fatal(err)
	}
	src, _ := res.(interface{ Stateful() (uintptr, int) }).Stateful()
	moved, err := unix.Splice(int(src), nil, int(pw.Fd()), nil, size, 0)
	if err != nil || moved != int64(size) {
		t.Fatalf("%d bytes at %d: go-fuse's pipe took %d of the spliced reply (%v): it would send a short reply", size, off, moved, err)
	}
	got := make([]byte, 16+size)
	if _, err := io.ReadFull(pr, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[16:], want[:size]) {
		t.Fatalf("%d bytes at %d: the spliced reply differs from the disk", size, off)
	}
	return true
}
