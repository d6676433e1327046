package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// resizeCase is an image with data, to resize from size to to.
type resizeCase struct {
	name  string
	typ   DiskType
	bs    int64
	size  int64
	to    int64
	moved bool // the BAT must move
	empty bool // no data written
}

var resizeCases = []resizeCase{
	{name: "grow dynamic within its BAT", typ: TypeDynamic, bs: 4 * kib, size: 40*kib + 1024, to: 44 * kib},
	{name: "grow dynamic into its BAT's padding", typ: TypeDynamic, bs: 4 * kib, size: 40*kib + 1024, to: 100 * kib},
	{name: "grow dynamic past its BAT", typ: TypeDynamic, bs: 4 * kib, size: 40*kib + 1024, to: 4*mib + 512, moved: true},
	// The new table reaches past the footer (an empty image), and past where the
	// blocks in its way are copied to (a table larger than the blocks after it).
	{name: "grow an empty dynamic past its BAT", typ: TypeDynamic, bs: 4 * kib, size: 40 * kib, to: 4 * mib, moved: true, empty: true},
	{name: "grow dynamic far past its BAT", typ: TypeDynamic, bs: 4 * kib, size: 8 * kib, to: 64 * mib, moved: true},
	{name: "grow differencing far past its BAT", typ: TypeDifferencing, bs: 4 * kib, size: 8 * kib, to: 64 * mib, moved: true},
	{name: "shrink dynamic into a block", typ: TypeDynamic, bs: 4 * kib, size: 40 * kib, to: 21*kib + 512},
	{name: "grow differencing past its BAT", typ: TypeDifferencing, bs: 4 * kib, size: 40 * kib, to: 16*mib + 512, moved: true},
	{name: "shrink differencing", typ: TypeDifferencing, bs: 4 * kib, size: 40 * kib, to: 30 * kib},
	{name: "grow fixed", typ: TypeFixed, size: 40 * kib, to: 1 * mib},
	{name: "shrink fixed", typ: TypeFixed, size: 40 * kib, to: 20*kib + 512},
}

// makeResizeImage creates the case's image in dir with data in it, and returns its
// path, the parent's data (differencing) and the view before the resize.
func makeResizeImage(t *testing.T, dir string, c resizeCase) (string, []byte, []byte) {
	t.Helper()
	r := newRand(t, uint64(c.size+c.to))
	var parent []byte
	var path string
	switch c.typ {
	case TypeDifferencing:
		pp := createImage(t, dir, "parent.vhd", CreateOptions{Type: TypeDynamic, Size: c.size, ExactSize: true, BlockSize: c.bs})
		pimg := openImage(t, pp, true)
		parent = randBytes(r, int(c.size))
		if _, err := pimg.WriteAt(parent, 0); err != nil {
			t.Fatal(err)
		}
		if err := pimg.Close(); err != nil {
			t.Fatal(err)
		}
		path = createDiff(t, dir, "image.vhd", pp, c.bs)
	default:
		path = createImage(t, dir, "image.vhd", CreateOptions{Type: c.typ, Size: c.size, ExactSize: true, BlockSize: c.bs})
	}
	img := openImage(t, path, true)
	for s := int64(0); s < c.size/SectorSize && !c.empty; s++ {
		if s%3 != 1 {
			if _, err := img.WriteAt(randBytes(r, SectorSize), s*SectorSize); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	img = openImage(t, path, false)
	v := view(t, img, parent)
	img.Close()
	return path, parent, v
}

// checkResized opens path and checks its size is old or to (new only if mustBeNew),
// its view against before over the shared part and zeros past it, and Check.
func checkResized(t *testing.T, path string, parent, before []byte, to int64, mustBeNew bool, what string) {
	t.Helper()
	img, err := Open(path, false)
	if err != nil {
		t.Fatalf("%s: reopen: %v", what, err)
	}
	defer img.Close()
	size := img.Size()
	if size != to && (mustBeNew || size != int64(len(before))) {
		t.Fatalf("%s: size %d, want %d (or the old %d)", what, size, to, len(before))
	}
	if st, why := img.FooterState(); st != FooterAtEnd {
		t.Fatalf("%s: FooterState = %v (%v)", what, st, why)
	}
	if ps := problems(img.Check(), Error); len(ps) > 0 {
		t.Fatalf("%s: Check: %v", what, ps)
	}
	for _, p := range problems(img.Check(), Warning) {
		if strings.Contains(p.Message, "lies inside the space of the header") {
			t.Fatalf("%s: Check: %v", what, p)
		}
	}
	got := view(t, img, parent)
	common := min(size, int64(len(before)))
	if !bytes.Equal(got[:common], before[:common]) {
		t.Fatalf("%s: the first %d bytes changed", what, common)
	}
	if size > common {
		// Past the old end: the file stores nothing, so a differencing image shows
		// its parent, which ends where the old size did.
		if !bytes.Equal(got[common:], make([]byte, size-common)) {
			t.Fatalf("%s: grown space does not read zeros", what)
		}
	}
}

func TestResize(t *testing.T) {
	for _, c := range resizeCases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path, parent, before := makeResizeImage(t, dir, c)
			img := openImage(t, path, true)
			oldBAT, _ := img.Header()
			if err := img.Resize(c.to); err != nil {
				t.Fatal(err)
			}
			if img.Size() != c.to {
				t.Fatalf("Size() = %d after Resize(%d)", img.Size(), c.to)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			checkResized(t, path, parent, before, c.to, true, "after resize")
			after := openImage(t, path, false)
			h, _ := after.Header()
			moved := roundUp(int64(h.MaxTableEntries)*4, SectorSize) > roundUp(int64(oldBAT.MaxTableEntries)*4, SectorSize)
			if moved != c.moved {
				t.Fatalf("BAT grown past its sectors = %v (%d entries at %d, was %d at %d), want %v", moved, h.MaxTableEntries, h.TableOffset, oldBAT.MaxTableEntries, oldBAT.TableOffset, c.moved)
			}
			if c.moved && !c.empty && int64(after.bat.get(0))*SectorSize < int64(h.TableOffset)+int64(h.MaxTableEntries)*4 {
				t.Fatalf("block 0 at %d, before the end of the BAT", int64(after.bat.get(0))*SectorSize)
			}
			f := after.Footer()
			if g := CHS(c.to); g.Bytes() == c.to && f.Geometry != g || g.Bytes() != c.to && f.Geometry != MaxGeometry {
				t.Fatalf("geometry %+v for size %d", f.Geometry, c.to)
			}
			after.Close()

			// Back to the old size: what was cut reads zeros, the rest stays.
			img = openImage(t, path, true)
			if err := img.Resize(c.size); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			want := append([]byte(nil), before[:min(c.size, c.to)]...)
			want = append(want, make([]byte, c.size-int64(len(want)))...)
			if c.typ == TypeDifferencing && c.to < c.size {
				copy(want[c.to:], parent[c.to:]) // the parent shows where the child stores nothing
			}
			checkResized(t, path, parent, want, c.size, true, "back to the old size")

			if c.typ != TypeDifferencing {
				qemuImg := requireTool(t, "qemu-img")
				out := run(t, qemuImg, "info", "-f", "vpc", "--output=json", path)
				if !strings.Contains(string(out), fmt.Sprintf(`"virtual-size": %d,`, c.size)) {
					t.Fatalf("qemu-img info after resizing back to %d:\n%s", c.size, out)
				}
			}
		})
	}
}

func TestResizeRefusals(t *testing.T) {
	dir := t.TempDir()
	p := createImage(t, dir, "a.vhd", CreateOptions{Type: TypeDynamic, Size: 1 * mib, ExactSize: true})
	ro := openImage(t, p, false)
	if err := ro.Resize(2 * mib); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("read-only Resize: %v, want ErrReadOnly", err)
	}
	ro.Close()
	img := openImage(t, p, true)
	for _, size := range []int64{0, -512, 1000, maxDynamicSize + SectorSize} {
		if err := img.Resize(size); !errors.Is(err, ErrInvalidArg) {
			t.Fatalf("Resize(%d): %v, want ErrInvalidArg", size, err)
		}
	}
}

// TestResizeCrash cuts every write of each resize and checks that the image opens
// with the old size or the new one, the shared part unchanged and clean.
func TestResizeCrash(t *testing.T) {
	for _, c := range resizeCases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			template, parent, before := makeResizeImage(t, dir, c)
			work := filepath.Join(dir, "work.vhd")
			for k := 0; ; k++ {
				if k > 1000 {
					t.Fatal("the resize never completed")
				}
				copyFile(t, template, work)
				f, err := os.OpenFile(work, os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				ff := &failFile{File: f, budget: k}
				img, err := OpenFile(ff, work, true)
				if err != nil {
					t.Fatalf("k=%d: OpenFile: %v", k, err)
				}
				rerr := img.Resize(c.to)
				cerr := img.Close()
				if rerr != nil && !errors.Is(rerr, errInjected) || cerr != nil && !errors.Is(cerr, errInjected) {
					t.Fatalf("k=%d: unexpected error: %v, %v", k, rerr, cerr)
				}
				completed := !ff.failed
				checkResized(t, work, parent, before, c.to, completed, fmt.Sprintf("k=%d", k))
				if c.to < c.size {
					// Grown back, whatever the cut left past the smaller size is gone.
					regrow(t, work, parent, before, c.to, fmt.Sprintf("k=%d, grown back", k))
				}
				if completed {
					t.Logf("resize completed with %d writes; every earlier cut was safe", ff.writes)
					break
				}
			}
		})
	}
}

// regrow resizes the image at path, cut down to size from the view before, back to
// len(before) and checks that the part past size reads zeros (a differencing image:
// its parent, as it stores nothing there).
func regrow(t *testing.T, path string, parent, before []byte, size int64, what string) {
	t.Helper()
	img, err := Open(path, true)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if img.Size() != size { // the cut left the old size
		img.Close()
		return
	}
	if err := img.Resize(int64(len(before))); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if err := img.Close(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	want := append([]byte(nil), before[:size]...)
	want = append(want, make([]byte, int64(len(before))-size)...)
	if parent != nil {
		copy(want[size:], parent[size:])
	}
	checkResized(t, path, parent, want, int64(len(before)), true, what)
}
