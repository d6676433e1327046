package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"
)

// parentBlocks returns the below function of a parent whose data lies in the blocks
// [from, to) of bs bytes: what chain hands Discard.
func parentBlocks(bs, from, to int64) func(off, n int64) (bool, error) {
	return func(off, n int64) (bool, error) {
		return off < to*bs && off+n > from*bs, nil
	}
}

// allocatedBytes is the space the file system holds for path (st_blocks).
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}

func TestDiscard(t *testing.T) {
	const (
		bs     = 64 * kib
		blocks = 16
		size   = blocks * bs
		spb    = bs / SectorSize
	)
	// The parent (of a differencing top) has data in blocks 8-15; the top has data in
	// blocks 0-3 and 8-11, every sector in a dynamic image, every other one in a
	// differencing image, so parent data shows between them.
	cases := []struct {
		name     string
		off, n   int64
		err      error
		dropped  []int64 // blocks whose BAT entry must be cleared
		freesOne bool    // the file's allocation drops by at least a block
	}{
		{name: "drop a whole block with nothing below", off: 1 * bs, n: bs, dropped: []int64{1}, freesOne: true},
		{name: "punch part of a block with nothing below", off: 2*bs + 3*SectorSize, n: 40 * SectorSize},
		{name: "punch across a block boundary", off: 2*bs + 100*SectorSize, n: bs, dropped: nil},
		{name: "punch two whole blocks and two halves", off: bs / 2, n: 3 * bs, dropped: []int64{1, 2}, freesOne: true},
		{name: "punch a never-written block", off: 5 * bs, n: bs},
		{name: "punch a never-written block over parent data", off: 13 * bs, n: bs},
		{name: "punch a whole block over parent data", off: 9 * bs, n: bs},
		{name: "punch unaligned sectors over parent data", off: 10*bs + 7*SectorSize, n: 3 * SectorSize},
		{name: "punch across the parent's edge", off: 7*bs + 5*SectorSize, n: bs},
		{name: "punch the whole disk", off: 0, n: size, dropped: []int64{0, 1, 2, 3, 4, 5, 6, 7}, freesOne: true},
		{name: "punch nothing", off: bs, n: 0},
		{name: "punch past the end", off: size - bs, n: 2 * bs, err: ErrOutOfRange},
		{name: "punch at a negative offset", off: -SectorSize, n: SectorSize, err: ErrOutOfRange},
		{name: "punch half a sector", off: SectorSize, n: SectorSize / 2, err: ErrInvalidArg},
	}
	for _, typ := range []DiskType{TypeDynamic, TypeDifferencing} {
		for _, c := range cases {
			t.Run(fmt.Sprintf("%v/%s", typ, c.name), func(t *testing.T) {
				dir := t.TempDir()
				r := newRand(t, 7)
				var parent []byte
				var path string
				var below func(off, n int64) (bool, error)
				if typ == TypeDifferencing {
					pp := createImage(t, dir, "parent.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: bs})
					pimg := openImage(t, pp, true)
					parent = make([]byte, size)
					copy(parent[8*bs:], randBytes(r, 8*bs))
					if _, err := pimg.WriteAt(parent[8*bs:], 8*bs); err != nil {
						t.Fatal(err)
					}
					if err := pimg.Close(); err != nil {
						t.Fatal(err)
					}
					path = createDiff(t, dir, "top.vhd", pp, bs)
					below = parentBlocks(bs, 8, 16)
				} else {
					path = createImage(t, dir, "top.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: bs})
				}
				img := openImage(t, path, true)
				for _, b := range []int64{0, 1, 2, 3, 8, 9, 10, 11} {
					for s := int64(0); s < spb; s++ {
						if typ == TypeDynamic || s%2 == 0 {
							if _, err := img.WriteAt(randBytes(r, SectorSize), b*bs+s*SectorSize); err != nil {
								t.Fatal(err)
							}
						}
					}
				}
				if err := img.Sync(); err != nil {
					t.Fatal(err)
				}
				want := view(t, img, parent)
				before := allocatedBytes(t, path)

				err := img.Discard(c.off, c.n, below)
				if c.err != nil {
					if !errors.Is(err, c.err) {
						t.Fatalf("Discard(%d, %d) = %v, want %v", c.off, c.n, err, c.err)
					}
					if got := view(t, img, parent); !bytes.Equal(got, want) {
						t.Fatal("a refused discard changed the view")
					}
					return
				}
				if err != nil {
					t.Fatalf("Discard(%d, %d): %v", c.off, c.n, err)
				}
				clear(want[c.off : c.off+c.n])
				if got := view(t, img, parent); !bytes.Equal(got, want) {
					t.Fatalf("view after Discard differs from the model at %d", firstDiff(got, want))
				}
				if err := img.Close(); err != nil {
					t.Fatal(err)
				}
				after := openImage(t, path, false)
				if got := view(t, after, parent); !bytes.Equal(got, want) {
					t.Fatalf("view after reopening differs from the model at %d", firstDiff(got, want))
				}
				if ps := problems(after.Check(), Warning); len(ps) > 0 {
					t.Fatalf("Check: %v", ps)
				}
				for _, b := range c.dropped {
					if e := after.bat.get(b); e != unallocated {
						t.Errorf("block %d: BAT entry %#x, want unallocated", b, e)
					}
				}
				if a := allocatedBytes(t, path); c.freesOne && a > before-bs {
					t.Errorf("allocation %d -> %d bytes: want at least a block (%d) back", before, a, bs)
				}
			})
		}
	}
}

// TestDiscardFixed: a fixed image punches the range in place.
func TestDiscardFixed(t *testing.T) {
	const size = 1 * mib
	dir := t.TempDir()
	r := newRand(t, 9)
	p := createImage(t, dir, "fixed.vhd", CreateOptions{Type: TypeFixed, Size: size, ExactSize: true})
	img := openImage(t, p, true)
	want := randBytes(r, size)
	if _, err := img.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Sync(); err != nil {
		t.Fatal(err)
	}
	before := allocatedBytes(t, p)
	if err := img.Discard(64*kib, 256*kib, nil); err != nil {
		t.Fatal(err)
	}
	if err := img.Discard(size-SectorSize, 2*SectorSize, nil); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("Discard past the end: %v, want ErrOutOfRange", err)
	}
	clear(want[64*kib : 320*kib])
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatalf("view differs from the model at %d", firstDiff(got, want))
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if a := allocatedBytes(t, p); a > before-256*kib {
		t.Errorf("allocation %d -> %d: want 256 KiB back", before, a)
	}
	after := openImage(t, p, false)
	if ps := problems(after.Check(), Warning); len(ps) > 0 {
		t.Fatalf("Check: %v", ps)
	}
}
