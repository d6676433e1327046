package vhdx

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

// compactFixture makes, in dir, an image of blocks 1 MiB blocks with data in every
// block, then zeros over the blocks zeroed names; a differencing one lies over a
// parent with data in its first half, and gets, besides, 8 KiB of zeros in
// PARTIALLY_PRESENT blocks at both ends: block 1 (over parent data, kept) and the
// last (over parent zeros, dropped) when they are not written. It returns the path,
// the model view and the parent's bytes (nil for none).
func compactFixture(t *testing.T, dir string, diff bool, blocks int, zeroed func(b int) bool) (string, []byte, []byte) {
	t.Helper()
	r := rand.New(rand.NewPCG(uint64(blocks), 7))
	size := int64(blocks) * MiB
	p := filepath.Join(dir, "top.vhdx")
	var parent []byte
	if diff {
		pp := filepath.Join(dir, "parent.vhdx")
		if err := Create(pp, CreateOptions{Type: TypeDynamic, Size: size, BlockSize: MiB}); err != nil {
			t.Fatal(err)
		}
		parent = make([]byte, size)
		for i := range parent[:size/2] {
			parent[i] = byte(r.Uint32() | 1)
		}
		pimg, err := Open(pp, true)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pimg.WriteAt(parent, 0); err != nil {
			t.Fatal(err)
		}
		if err := pimg.Close(); err != nil {
			t.Fatal(err)
		}
		if pimg, err = Open(pp, false); err != nil {
			t.Fatal(err)
		}
		if err := pimg.CreateChild(p, image.ChildOptions{}); err != nil {
			t.Fatal(err)
		}
		pimg.Close()
	} else if err := Create(p, CreateOptions{Type: TypeDynamic, Size: size, BlockSize: MiB}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	model := append([]byte(nil), parent...)
	if model == nil {
		model = make([]byte, size)
	}
	write := func(d []byte, off int64) {
		t.Helper()
		if _, err := img.WriteAt(d, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], d)
	}
	for b := range blocks {
		if b == 1 || b == blocks-1 {
			if diff {
				write(make([]byte, 8*KiB), int64(b)*MiB+64*KiB)
				continue
			}
		}
		d := make([]byte, MiB)
		for i := range d {
			d[i] = byte(r.Uint32())
		}
		write(d, int64(b)*MiB)
	}
	if err := img.Sync(); err != nil {
		t.Fatal(err)
	}
	for b := range blocks {
		if zeroed(b) && !(diff && (b == 1 || b == blocks-1)) {
			write(make([]byte, MiB), int64(b)*MiB)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return p, model, parent
}

// chainView is what img shows over parent's bytes (zeros without a parent).
func chainView(t *testing.T, img *Image, parent []byte) []byte {
	t.Helper()
	v := make([]byte, img.Size())
	for off := int64(0); off < img.Size(); {
		n, ok, err := img.Run(off, img.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			if _, err := img.ReadAt(v[off:off+n], off); err != nil {
				t.Fatal(err)
			}
		} else if parent != nil {
			copy(v[off:off+n], parent[off:off+n])
		}
		off += n
	}
	return v
}

func belowOf(parent []byte) func(off, n int64) (bool, error) {
	if parent == nil {
		return nil
	}
	return func(off, n int64) (bool, error) { return allZero(parent[off : off+n]), nil }
}

func sizeOf(t *testing.T, p string) int64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func atLeastWarnings(ps []image.Problem) []image.Problem {
	var out []image.Problem
	for _, p := range ps {
		if p.Severity >= image.Warning {
			out = append(out, p)
		}
	}
	return out
}

func TestCompact(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		diff                  bool
		blocks                int
		zeroed                func(b int) bool
		wantDropped, wantKept int
	}{
		{"dynamic, every other block zeroed", false, 24, func(b int) bool { return b%2 == 1 }, 12, 0},
		{"dynamic, the first half zeroed", false, 24, func(b int) bool { return b < 12 }, 12, 0},
		{"dynamic, nothing zeroed", false, 8, func(int) bool { return false }, 0, 0},
		// Odd blocks zeroed: 5 in the first half kept (1 is partial, kept too), 5 in
		// the second dropped, and the partial last one dropped.
		{"differencing", true, 24, func(b int) bool { return b%2 == 1 }, 6, 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, model, parent := compactFixture(t, t.TempDir(), tc.diff, tc.blocks, tc.zeroed)
			before := sizeOf(t, p)
			sum := fileSum(t, p)
			ro, err := Open(p, false)
			if err != nil {
				t.Fatal(err)
			}
			dry, err := ro.Compact(context.Background(), image.CompactOptions{DryRun: true, BelowZero: belowOf(parent)})
			ro.Close()
			if err != nil {
				t.Fatal(err)
			}
			if fileSum(t, p) != sum {
				t.Fatal("the dry run changed the file")
			}
			img, err := Open(p, true)
			if err != nil {
				t.Fatal(err)
			}
			dwg := img.DataWriteGuid()
			res, err := img.Compact(context.Background(), image.CompactOptions{BelowZero: belowOf(parent)})
			if err != nil {
				t.Fatal(err)
			}
			if img.DataWriteGuid() != dwg {
				t.Fatal("compact changed the DataWriteGuid: children would be orphaned")
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			if res != dry {
				t.Fatalf("dry run said %+v, the run did %+v", dry, res)
			}
			if res.Dropped != tc.wantDropped || res.Kept != tc.wantKept {
				t.Fatalf("%+v: want %d dropped, %d kept", res, tc.wantDropped, tc.wantKept)
			}
			after := sizeOf(t, p)
			if after != res.NewSize || before != res.OldSize {
				t.Fatalf("file %d -> %d, result says %d -> %d", before, after, res.OldSize, res.NewSize)
			}
			ro, err = Open(p, false)
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			// Header section, log, metadata and BAT: everything below the first block.
			var meta int64
			for _, s := range ro.spans {
				meta = max(meta, s.off+s.len)
			}
			live := int64(res.Blocks-res.Dropped) * MiB
			if tc.diff {
				live += MiB // the sector bitmap block
			}
			if after > meta+live+live/10 {
				t.Fatalf("file is %d bytes, want at most %d + %d + 10%%", after, meta, live)
			}
			if ps := atLeastWarnings(ro.Check()); len(ps) > 0 {
				t.Fatalf("Check: %v", ps)
			}
			if !bytes.Equal(chainView(t, ro, parent), model) {
				t.Fatal("the view changed")
			}
			if tc.diff {
				// The last block was PARTIALLY_PRESENT and is dropped: its bits are
				// clear, for libvhdi, which reads through them whatever the state.
				ro.mu.RLock()
				bm, err := ro.sectorBits(int64(tc.blocks - 1))
				ro.mu.RUnlock()
				if err != nil || !allZero(bm) {
					t.Fatalf("the dropped block's sector bits are not clear (%v)", err)
				}
			}
		})
	}
}

func TestCompactRefusesFixed(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f.vhdx")
	if err := Create(p, CreateOptions{Type: TypeFixed, Size: 4 * MiB, BlockSize: MiB}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.Compact(context.Background(), image.CompactOptions{}); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("%v, want ErrUnsupported", err)
	}
}

// TestCompactCrash cuts Compact after every write, fsync and truncate (cutFile):
// each cut file opens, read-only and writable (which replays its log), Check finds
// nothing wrong, and the view is the model.
func TestCompactCrash(t *testing.T) {
	defer func(n int) { compactBatch = n }(compactBatch)
	compactBatch = 2
	for _, diff := range []bool{false, true} {
		t.Run(map[bool]string{false: "dynamic", true: "differencing"}[diff], func(t *testing.T) {
			base, model, parent := compactFixture(t, t.TempDir(), diff, 16, func(b int) bool { return b%4 != 2 })
			for k := 0; ; k++ {
				if k > 1000 {
					t.Fatal("compact never completed")
				}
				p, img, _ := openCut(t, base, k)
				res, cerr := img.Compact(context.Background(), image.CompactOptions{BelowZero: belowOf(parent)})
				closeErr := img.Close()
				cut := cerr != nil || closeErr != nil
				if cerr != nil && !errors.Is(cerr, errCut) || closeErr != nil && !errors.Is(closeErr, errCut) {
					t.Fatalf("cut after %d: %v, %v", k, cerr, closeErr)
				}
				for _, writable := range []bool{false, true} {
					ro, err := Open(p, writable)
					if err != nil {
						t.Fatalf("cut after %d: open (writable %v): %v", k, writable, err)
					}
					if !bytes.Equal(chainView(t, ro, parent), model) {
						t.Fatalf("cut after %d: the view changed (writable %v)", k, writable)
					}
					if ps := atLeastWarnings(ro.Check()); writable && len(ps) > 0 {
						t.Fatalf("cut after %d: Check: %v", k, ps)
					}
					ro.Close()
				}
				if !cut {
					if res.Dropped == 0 || res.Moved == 0 || res.NewSize >= res.OldSize {
						t.Fatalf("%+v: the fixture must drop, move and shrink", res)
					}
					t.Logf("%d cut points (%+v)", k, res)
					return
				}
			}
		})
	}
}

// TestCompactManyBATSectors drops blocks whose entries lie in more BAT sectors than
// one log entry can hold (256 sectors of 512 entries, in a 1 MiB log): the changes go
// through the log in several entries.
func TestCompactManyBATSectors(t *testing.T) {
	const blocks = 300
	p := filepath.Join(t.TempDir(), "big.vhdx")
	size := int64(blocks) * batPageEntries * MiB
	if err := Create(p, CreateOptions{Type: TypeDynamic, Size: size, BlockSize: MiB}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	// One block in each BAT page: data (the block is allocated), then zeros.
	for k := int64(0); k < blocks; k++ {
		off := k * batPageEntries * MiB
		if _, err := img.WriteAt(fill(4096, 1), off); err != nil {
			t.Fatal(err)
		}
		if _, err := img.WriteAt(make([]byte, 4096), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if img, err = Open(p, true); err != nil {
		t.Fatal(err)
	}
	res, err := img.Compact(context.Background(), image.CompactOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if res.Dropped != blocks || res.NewSize >= res.OldSize {
		t.Fatalf("%+v: want all %d blocks dropped and the file smaller", res, blocks)
	}
	ro, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if ps := atLeastWarnings(ro.Check()); len(ps) > 0 {
		t.Fatalf("Check: %v", ps)
	}
	if n := ro.AllocatedBytes(); n != 0 {
		t.Fatalf("%d bytes still allocated", n)
	}
}

// TestCompactRefusesOverlap: two blocks in different BAT pages (which Open checks
// apart) that share their place are refused before anything moves.
func TestCompactRefusesOverlap(t *testing.T) {
	p := filepath.Join(t.TempDir(), "o.vhdx")
	if err := Create(p, CreateOptions{Type: TypeDynamic, Size: 1024 * MiB, BlockSize: MiB}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(fill(MiB, 5), 0); err != nil {
		t.Fatal(err)
	}
	img.mu.Lock()
	e0, err := img.entry(0)
	img.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	at := img.batOff + 8*img.geo.payloadIndex(600)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, uint64(e0))
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
	f.Close()
	sum := fileSum(t, p)
	if img, err = Open(p, true); err != nil {
		t.Fatal(err)
	}
	if _, err := img.Compact(context.Background(), image.CompactOptions{}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("%v, want ErrCorrupt", err)
	}
	img.Close()
	if fileSum(t, p) != sum {
		t.Fatal("the refused compact wrote")
	}
}
