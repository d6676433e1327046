package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

type resizeCase struct {
	name     string
	diff     bool
	size, to int64
}

var vhdxResizeCases = []resizeCase{
	{"grow dynamic from a partial block", false, 5*MiB + 1536, 9*MiB + 512},
	{"shrink dynamic into a block", false, 5 * MiB, 2*MiB + 1024},
	{"grow differencing", true, 5*MiB + 1536, 8 * MiB},
	{"shrink differencing", true, 5 * MiB, 3*MiB + 512},
}

// makeResized creates the case's image in dir, with data, and returns its path, the
// parent's data and the view before the resize.
func makeResized(t *testing.T, dir string, c resizeCase) (string, []byte, []byte) {
	t.Helper()
	r := rand.New(rand.NewPCG(uint64(c.size), uint64(c.to)))
	rnd := func(n int64) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	path := filepath.Join(dir, "image.vhdx")
	var parent []byte
	if c.diff {
		pp := filepath.Join(dir, "parent.vhdx")
		if err := Create(pp, CreateOptions{Type: TypeDynamic, Size: c.size, BlockSize: MiB}); err != nil {
			t.Fatal(err)
		}
		p, err := Open(pp, true)
		if err != nil {
			t.Fatal(err)
		}
		parent = rnd(c.size)
		if _, err := p.WriteAt(parent, 0); err != nil {
			t.Fatal(err)
		}
		if err := p.CreateChild(path, image.ChildOptions{BlockSize: MiB}); err != nil {
			t.Fatal(err)
		}
		p.Close()
	} else if err := Create(path, CreateOptions{Type: TypeDynamic, Size: c.size, BlockSize: MiB}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	// Every block gets some sectors, the last (partial) one up to its end.
	for off := int64(0); off < c.size; off += MiB / 2 {
		n := min(int64(64<<10), c.size-off)
		if _, err := img.WriteAt(rnd(n), off); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := img.WriteAt(rnd(1024), c.size-1024); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return path, parent, resizedView(t, path, false, parent)
}

// resizedView opens path and returns what a chain of it over a parent holding parent
// shows.
func resizedView(t *testing.T, path string, writable bool, parent []byte) []byte {
	t.Helper()
	img, err := Open(path, writable)
	if err != nil {
		t.Fatalf("open (writable %v): %v", writable, err)
	}
	defer img.Close()
	if ps := img.Check(); len(errorsOf(ps)) > 0 {
		t.Fatalf("Check: %v", errorsOf(ps))
	}
	v := make([]byte, img.Size())
	if _, err := img.ReadAt(v, 0); err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < img.Size(); {
		n, ok, err := img.Run(off, img.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			clear(v[off : off+n])
			if off < int64(len(parent)) {
				copy(v[off:off+n], parent[off:])
			}
		}
		off += n
	}
	return v
}

func errorsOf(ps []image.Problem) []image.Problem {
	var out []image.Problem
	for _, p := range ps {
		if p.Severity >= image.Error {
			out = append(out, p)
		}
	}
	return out
}

// sameOrResized checks that v is before with the size old or to (to only if
// mustBeNew): the shared part unchanged, zeros past it.
func sameOrResized(t *testing.T, v, before []byte, to int64, mustBeNew bool, what string) {
	t.Helper()
	size := int64(len(v))
	if size != to && (mustBeNew || size != int64(len(before))) {
		t.Fatalf("%s: size %d, want %d (or the old %d)", what, size, to, len(before))
	}
	common := min(size, int64(len(before)))
	if !bytes.Equal(v[:common], before[:common]) {
		t.Fatalf("%s: the first %d bytes changed", what, common)
	}
	if !bytes.Equal(v[common:], make([]byte, size-common)) {
		t.Fatalf("%s: grown space does not read zeros", what)
	}
}

func TestResize(t *testing.T) {
	for _, c := range vhdxResizeCases {
		t.Run(c.name, func(t *testing.T) {
			path, parent, before := makeResized(t, t.TempDir(), c)
			img, err := Open(path, true)
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Resize(c.to); err != nil {
				t.Fatal(err)
			}
			if img.Size() != c.to {
				t.Fatalf("Size() = %d", img.Size())
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			sameOrResized(t, resizedView(t, path, false, parent), before, c.to, true, "after")

			// Back: what was cut off reads zeros (the parent's, differencing).
			img, err = Open(path, true)
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Resize(c.size); err != nil {
				t.Fatal(err)
			}
			img.Close()
			want := append([]byte(nil), before[:min(c.size, c.to)]...)
			want = append(want, make([]byte, c.size-int64(len(want)))...)
			if c.diff && c.to < c.size {
				copy(want[c.to:], parent[c.to:])
			}
			if got := resizedView(t, path, false, parent); !bytes.Equal(got, want) {
				t.Fatal("back at the old size, the view is not the old one cut and zero-filled")
			}
		})
	}
}

func TestResizeRefusals(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a.vhdx")
	if err := Create(p, CreateOptions{Type: TypeDynamic, Size: 64 * MiB, BlockSize: MiB}); err != nil {
		t.Fatal(err)
	}
	ro, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := ro.Resize(128 * MiB); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("read-only: %v", err)
	}
	ro.Close()
	img, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for _, size := range []int64{0, 1000, maxVirtualSize + MiB} {
		if err := img.Resize(size); !errors.Is(err, ErrInvalidArg) {
			t.Fatalf("Resize(%d): %v, want ErrInvalidArg", size, err)
		}
	}
	if img.Size() != 64*MiB {
		t.Fatalf("a refused resize changed the size to %d", img.Size())
	}
}

// TestResizeCut cuts Resize after every write, fsync and truncate: the file opens,
// read-only (log replayed in memory) and writable (into the file), with the old size
// or the new one, the shared part unchanged and clean; uncut, the new one.
func TestResizeCut(t *testing.T) {
	for _, c := range vhdxResizeCases {
		t.Run(c.name, func(t *testing.T) {
			base, parent, before := makeResized(t, t.TempDir(), c)
			for k := 0; ; k++ {
				if k > 500 {
					t.Fatal("never completed")
				}
				p, img, _ := openCut(t, base, k)
				err := img.Resize(c.to)
				if err != nil && !errors.Is(err, errCut) {
					t.Fatalf("cut after %d: %v", k, err)
				}
				img.Close()
				for _, writable := range []bool{false, true} {
					what := fmt.Sprintf("cut after %d (writable %v)", k, writable)
					sameOrResized(t, resizedView(t, p, writable, parent), before, c.to, err == nil, what)
				}
				if c.to < c.size {
					// Grown back, what the cut left past the smaller size is gone.
					img, oerr := Open(p, true)
					if oerr != nil {
						t.Fatal(oerr)
					}
					if img.Size() == c.to {
						if rerr := img.Resize(c.size); rerr != nil {
							t.Fatalf("cut after %d, grown back: %v", k, rerr)
						}
						want := append(append([]byte(nil), before[:c.to]...), make([]byte, c.size-c.to)...)
						if c.diff {
							copy(want[c.to:], parent[c.to:])
						}
						img.Close()
						if got := resizedView(t, p, false, parent); !bytes.Equal(got, want) {
							t.Fatalf("cut after %d, grown back: not the view cut and zero-filled", k)
						}
					} else {
						img.Close()
					}
				}
				if err == nil {
					t.Logf("%d cut points", k)
					return
				}
			}
		})
	}
}
