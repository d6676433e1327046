package vhdx

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/image"
)

const GiB = 1 << 30

// 1 MiB of BAT, the least a region holds, is 131072 entries: with 1 MiB blocks
// 127.97 GiB of a dynamic disk, 127.97 GiB of a differencing one. Growing a disk of
// 100 GiB to 200 GiB needs a larger region. Only a few MiB of it are stored, so the
// views are compared sparsely (sparseModel).
var batMoveCases = []resizeCase{
	{"dynamic past the BAT region", false, 100*GiB + 1536, 200*GiB + 4096},
	{"differencing past the BAT region", true, 100*GiB + 1536, 200 * GiB},
}

// ext is one write: data at off.
type ext struct {
	off int64
	b   []byte
}

// sparseModel is what a large, mostly empty disk holds: the parent's writes, then
// the image's, over zeros, cut at size.
type sparseModel struct {
	parent, writes []ext
}

// want is the model's view of n bytes at off of a disk of size bytes.
func (m *sparseModel) want(off, n, size int64) []byte {
	v := make([]byte, n)
	for _, e := range append(append([]ext(nil), m.parent...), m.writes...) {
		lo, hi := max(off, e.off), min(off+n, e.off+int64(len(e.b)), size)
		if lo < hi {
			copy(v[lo-off:hi-off], e.b[lo-e.off:hi-e.off])
		}
	}
	return v
}

// makeMoved creates the case's image in dir, writes some sectors (at the start, in
// the middle, up to the partial last block's end), and returns its path and model.
func makeMoved(t *testing.T, dir string, c resizeCase) (string, *sparseModel) {
	t.Helper()
	r := rand.New(rand.NewPCG(uint64(c.size), uint64(c.to)))
	rnd := func(n int64) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	m := &sparseModel{}
	path := filepath.Join(dir, "image.vhdx")
	if c.diff {
		pp := filepath.Join(dir, "parent.vhdx")
		if err := Create(pp, CreateOptions{Type: TypeDynamic, Size: c.size, BlockSize: MiB}); err != nil {
			t.Fatal(err)
		}
		p, err := Open(pp, true)
		if err != nil {
			t.Fatal(err)
		}
		for _, off := range []int64{0, 3 * MiB, 60 * GiB, c.size - 2*MiB} {
			e := ext{off, rnd(2 * MiB)}
			if _, err := p.WriteAt(e.b, e.off); err != nil {
				t.Fatal(err)
			}
			m.parent = append(m.parent, e)
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
	for _, w := range []struct{ off, n int64 }{
		{0, 64 * KiB}, {MiB + 512, 3 * MiB}, {4096 * MiB, MiB}, {60*GiB + 512*KiB, 2 * MiB}, {c.size - 1024, 1024}, {c.size - 3*MiB, 8 * KiB},
	} {
		e := ext{w.off, rnd(w.n)}
		if _, err := img.WriteAt(e.b, e.off); err != nil {
			t.Fatal(err)
		}
		m.writes = append(m.writes, e)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return path, m
}

// checkMoved opens path and checks it against the model: Check clean, the size old
// or to (to if mustBeNew), the bytes of every stored run, of the model's writes and
// of the start and end of the grown space as the model has them. It returns the size.
func checkMoved(t *testing.T, path string, writable bool, m *sparseModel, old, to int64, mustBeNew bool, what string) int64 {
	t.Helper()
	img, err := Open(path, writable)
	if err != nil {
		t.Fatalf("%s: open: %v", what, err)
	}
	defer img.Close()
	for _, p := range img.Check() {
		// A read-only open of a cut file reports the log it replayed in memory.
		if p.Severity >= image.Warning && !(strings.Contains(p.Message, "replayed in memory") && !writable) {
			t.Fatalf("%s: Check: %v", what, p)
		}
	}
	size := img.Size()
	if size != to && (mustBeNew || size != old) {
		t.Fatalf("%s: size %d, want %d (or the old %d)", what, size, to, old)
	}
	type rng struct{ off, n int64 }
	var look []rng
	for off := int64(0); off < size; {
		n, ok, err := img.Run(off, size-off)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if ok {
			look = append(look, rng{off, n})
		}
		off += n
	}
	for _, e := range append(append([]ext(nil), m.parent...), m.writes...) {
		look = append(look, rng{e.off, int64(len(e.b))})
	}
	look = append(look, rng{old &^ (MiB - 1), 2 * MiB}, rng{size - MiB, MiB})
	for _, l := range look {
		if l.n = min(l.n, size-l.off); l.n <= 0 {
			continue
		}
		got := make([]byte, l.n)
		if _, err := img.ReadAt(got, l.off); err != nil {
			t.Fatalf("%s: read %d bytes at %d: %v", what, l.n, l.off, err)
		}
		for off := l.off; off < l.off+l.n; {
			n, ok, err := img.Run(off, l.off+l.n-off)
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			if !ok && img.HasParent() {
				copy(got[off-l.off:], (&sparseModel{parent: m.parent}).want(off, n, old))
			}
			off += n
		}
		if want := m.want(l.off, l.n, size); !bytes.Equal(got, want) {
			i := 0
			for got[i] == want[i] {
				i++
			}
			t.Fatalf("%s: %d bytes at %d differ from the model from %d", what, l.n, l.off, l.off+int64(i))
		}
	}
	return size
}

func batRegion(t *testing.T, path string) RegionEntry {
	t.Helper()
	img, err := Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for _, r := range img.regions {
		if r.Guid == RegionBAT {
			return r
		}
	}
	t.Fatal("no BAT region")
	return RegionEntry{}
}

// TestResizeMovesBAT grows images past what their BAT region holds: the table moves
// to a new region at the end of the file, large enough, the old one is punched, the
// view is the model's, and the image grows and shrinks again from there.
func TestResizeMovesBAT(t *testing.T) {
	for _, c := range batMoveCases {
		t.Run(c.name, func(t *testing.T) {
			path, m := makeMoved(t, t.TempDir(), c)
			old := batRegion(t, path)
			checkMoved(t, path, false, m, c.size, c.size, false, "before")
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
			// The same handle reads and writes through the new table.
			checkAfter := func(what string) {
				t.Helper()
				if ps := errorsOf(img.Check()); len(ps) > 0 {
					t.Fatalf("%s: Check: %v", what, ps)
				}
				got := make([]byte, 64*KiB)
				if _, err := img.ReadAt(got, 0); err != nil || !bytes.Equal(got, m.want(0, 64*KiB, c.to)) {
					t.Fatalf("%s: the first sectors differ (%v)", what, err)
				}
			}
			checkAfter("same handle")
			e := ext{c.to - 5*MiB, fill(3*MiB, 0x5a)}
			if _, err := img.WriteAt(e.b, e.off); err != nil {
				t.Fatal(err)
			}
			m.writes = append(m.writes, e)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			nw := batRegion(t, path)
			g := newGeometry(c.to, MiB, 512, c.diff)
			if int64(nw.FileOffset) <= int64(old.FileOffset) || int64(nw.Length) != (g.entries*8+MiB-1)/MiB*MiB || nw.FileOffset%MiB != 0 {
				t.Errorf("BAT region at %d, %d bytes (was at %d, %d bytes); want past it, %d entries' worth", nw.FileOffset, nw.Length, old.FileOffset, old.Length, g.entries)
			}
			if f, err := os.Open(path); err == nil {
				if d, err := unix.Seek(int(f.Fd()), int64(old.FileOffset), unix.SEEK_DATA); err == nil && d < int64(old.FileOffset)+int64(old.Length) {
					t.Errorf("the old BAT region still holds data at %d", d)
				}
				f.Close()
			}
			checkMoved(t, path, false, m, c.to, c.to, true, "after")
			checkMoved(t, path, true, m, c.to, c.to, true, "after, writable")
			if !c.diff {
				if _, err := exec.LookPath("qemu-img"); err == nil {
					if out, err := exec.Command("qemu-img", "check", "-f", "vhdx", path).CombinedOutput(); err != nil {
						t.Errorf("qemu-img check: %v\n%s", err, out)
					}
				}
			}
			// It grows on in its new region, and moves again past it.
			img, err = Open(path, true)
			if err != nil {
				t.Fatal(err)
			}
			for _, size := range []int64{c.to + 64*GiB, 1 << 40} {
				if err := img.Resize(size); err != nil {
					t.Fatalf("Resize(%d): %v", size, err)
				}
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			if r := batRegion(t, path); r.FileOffset == nw.FileOffset {
				t.Errorf("growing to 1 TiB left the BAT region at %d, %d bytes", r.FileOffset, r.Length)
			}
			checkMoved(t, path, false, m, 1<<40, 1<<40, true, "at 1 TiB")

			// Compact moves the blocks written since into the old regions' space,
			// around the table at its new place.
			img, err = Open(path, true)
			if err != nil {
				t.Fatal(err)
			}
			o := image.CompactOptions{}
			if c.diff {
				o.BelowZero = func(off, n int64) (bool, error) { return false, nil }
			}
			res, err := img.Compact(context.Background(), o)
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			t.Logf("compact: %+v", res)
			if res.Moved == 0 {
				t.Errorf("Compact moved nothing: %+v", res)
			}
			checkMoved(t, path, false, m, 1<<40, 1<<40, true, "compacted")
		})
	}
}

// TestResizeMovesBATCut cuts a resize that moves the BAT region after every write,
// fsync and truncate: the file opens, read-only (log replayed in memory) and
// writable (into the file), with the old size or the new one, the model's view and
// Check clean; uncut, the new one.
func TestResizeMovesBATCut(t *testing.T) {
	for _, c := range batMoveCases {
		t.Run(c.name, func(t *testing.T) {
			base, m := makeMoved(t, t.TempDir(), c)
			sizes := map[int64]int{}
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
					sizes[checkMoved(t, p, writable, m, c.size, c.to, err == nil, what)]++
				}
				if err == nil {
					t.Logf("%d cut points; opens at each size: %v", k, sizes)
					if sizes[c.size] == 0 || sizes[c.to] < 2 {
						t.Errorf("every cut point left one size: %v", sizes)
					}
					return
				}
			}
		})
	}
}

// TestResizeMovesBATLeavesStaleEntries: an entry past the last block of a
// differencing image's last chunk (here FULLY_PRESENT, over block 2's data, as a
// torn shrink or another tool may leave it) is not carried into the new region, and
// the handle that cached its page before the move reads the grown block as
// NOT_PRESENT after it, not through the page of the old region.
func TestResizeMovesBATLeavesStaleEntries(t *testing.T) {
	c := batMoveCases[1]
	path, _ := makeMoved(t, t.TempDir(), c)
	g := newGeometry(c.size, MiB, 512, true)
	bat := int64(batRegion(t, path).FileOffset)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	e0 := make([]byte, 8) // block 2's, written whole
	if _, err := f.ReadAt(e0, bat+8*g.payloadIndex(2)); err != nil {
		t.Fatal(err)
	}
	stray := g.payloadIndex(g.blocks + 1)
	if _, err := f.WriteAt(e0, bat+8*stray); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if stray/batPageEntries != g.payloadIndex(g.blocks-1)/batPageEntries || batEntry(binary.LittleEndian.Uint64(e0)).state() != FullyPresent {
		t.Fatal("test bug: the stray entry is not on the last block's page, or block 2 is not stored whole")
	}

	img, err := Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	last := make([]byte, 512)
	if _, err := img.ReadAt(last, c.size-512); err != nil { // caches the page
		t.Fatal(err)
	}
	if err := img.Resize(c.to); err != nil {
		t.Fatal(err)
	}
	off := (g.blocks + 1) * MiB
	if _, ok, err := img.Run(off, MiB); err != nil || ok {
		t.Fatalf("block %d after the move: stored %v (%v), want NOT_PRESENT", g.blocks+1, ok, err)
	}
	got := make([]byte, MiB)
	if _, err := img.ReadAt(got, off); err != nil || !allZero(got) {
		t.Fatalf("block %d after the move does not read zeros (%v)", g.blocks+1, err)
	}
	if ps := errorsOf(img.Check()); len(ps) > 0 {
		t.Fatalf("Check: %v", ps)
	}
}

// TestResizeMovesBATQemuReplay: a move cut once its log entry is durable and named
// by the header, before it is in place, is replayed by qemu (qemu-img check -r all)
// to the grown disk: qemu then reports the new size and we read the model, clean.
func TestResizeMovesBATQemuReplay(t *testing.T) {
	needTool(t, "qemu-img")
	c := batMoveCases[0]
	base, m := makeMoved(t, t.TempDir(), c)
	for k := 0; ; k++ {
		if k > 500 {
			t.Fatal("the log was never left pending")
		}
		p, img, _ := openCut(t, base, k)
		err := img.Resize(c.to)
		img.Close()
		if err == nil {
			t.Fatal("the resize completed before its log entry was left pending")
		}
		f, ferr := os.Open(p)
		if ferr != nil {
			t.Fatal(ferr)
		}
		raw, ferr := OpenFile(f, p, false)
		if ferr != nil {
			t.Fatalf("cut after %d: %v", k, ferr)
		}
		pending := !raw.Header().LogGuid.IsZero()
		raw.Close()
		if !pending {
			continue
		}
		run(t, "qemu-img", "check", "-q", "-r", "all", "-f", "vhdx", p)
		out, err := exec.Command("qemu-img", "info", "-f", "vhdx", p).CombinedOutput()
		if err != nil || !bytes.Contains(out, []byte(fmt.Sprintf("(%d bytes)", c.to))) {
			t.Fatalf("cut after %d, replayed by qemu: qemu-img info (%v):\n%s", k, err, out)
		}
		run(t, "qemu-img", "check", "-f", "vhdx", p)
		checkMoved(t, p, false, m, c.size, c.to, true, fmt.Sprintf("cut after %d, replayed by qemu", k))
		return
	}
}
