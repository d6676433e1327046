package merge

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/probe"
)

const (
	kib = 1 << 10
	mib = 1 << 20
	// sector is the unit the models track: the logical sector of VHD and of a VHDX
	// with 512-byte logical sectors. (A 4096-byte VHDX row needs it per fixture.)
	sector = 512
)

// Regions of every test disk that random writes leave alone, for the writes that
// test one rule each.
var (
	// hideRegion: every layer writes its own non-zero byte there, then the top writes
	// zeros over most of it; the zeros must win in the target.
	hideRegion = [2]int64{5 * mib, 5*mib + 256*kib}
	// zeroRegion: only the top writes there, and only zeros. It is one 1 MiB block of
	// a dynamic base, which a merge must leave unallocated.
	zeroRegion = [2]int64{6 * mib, 7 * mib}
)

// spec describes a test chain, built base first.
type spec struct {
	format     string     // "vhd" or "vhdx"
	base       image.Type // image.Fixed or image.Dynamic
	size       int64      // exact virtual size
	blockSizes []int64    // per image, base first; the base's is ignored when fixed
	writes     int        // random writes into each image while it is the top
	seed       uint64
}

// fixture is a chain on disk and a model of what each of its files stores. Indexes
// are depths: 0 is the top.
type fixture struct {
	dir   string
	paths []string
	types []image.Type
	size  int64
	// store[i] is what image i holds where it holds anything (zeros elsewhere);
	// bits[i][s] says whether differencing image i holds sector s. A base holds
	// everything as far as the view goes.
	store [][]byte
	bits  [][]bool
	model []byte // the view through the top
}

func newRand(t *testing.T, seed uint64) *rand.Rand {
	t.Helper()
	t.Logf("random seed %d", seed)
	return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, (n+7)/8*8)
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b[:n]
}

// sectorSpan is the range of whole sectors a write of n bytes at off touches.
func sectorSpan(off, n int64) (int64, int64) {
	return off / sector * sector, (off + n + sector - 1) / sector * sector
}

func overlaps(a0, a1 int64, r [2]int64) bool { return a0 < r[1] && r[0] < a1 }

// randomWrite returns a write that touches no reserved region: byte-granular about
// half the time, sector-aligned otherwise; one in four ends just past a 64 KiB
// boundary (a block boundary for every block size used here), one in six is zeros.
func randomWrite(r *rand.Rand, size int64) (int64, []byte) {
	for {
		n := 1 + r.Int64N(128*kib)
		var off int64
		if r.IntN(4) == 0 {
			off = (1+r.Int64N(size/(64*kib)-1))*64*kib - 1 - r.Int64N(n)
		} else {
			off = r.Int64N(size - n)
		}
		if r.IntN(2) == 0 {
			off, n = off/sector*sector, (n+sector-1)/sector*sector
		}
		off = max(0, min(off, size-n))
		s0, s1 := sectorSpan(off, n)
		if overlaps(s0, s1, hideRegion) || overlaps(s0, s1, zeroRegion) {
			continue
		}
		data := make([]byte, n)
		if r.IntN(6) != 0 {
			data = randBytes(r, int(n))
		}
		return off, data
	}
}

// buildChain creates the chain of sp in a new directory, writing into each image
// through chain.WriteAt while it is the top, and models every write.
func buildChain(t *testing.T, sp spec) *fixture {
	t.Helper()
	r := newRand(t, sp.seed)
	dir := t.TempDir()
	n := len(sp.blockSizes)
	f := &fixture{dir: dir, size: sp.size, model: make([]byte, sp.size)}
	sectors := sp.size / sector
	for i := range n {
		var path string
		typ := image.Differencing
		if i == 0 {
			path, typ = filepath.Join(dir, imageName(sp.format, "base", false)), sp.base
			createBase(t, sp.format, path, sp.base, sp.size, sp.blockSizes[0])
		} else {
			path = filepath.Join(dir, imageName(sp.format, fmt.Sprintf("snap%d", i), true))
			createChild(t, f.paths[0], path, sp.blockSizes[i])
		}
		// Prepend: index 0 is always the top.
		f.paths = slices.Insert(f.paths, 0, path)
		f.types = slices.Insert(f.types, 0, typ)
		f.store = slices.Insert(f.store, 0, make([]byte, sp.size))
		f.bits = slices.Insert(f.bits, 0, make([]bool, sectors))

		type write struct {
			off  int64
			data []byte
		}
		var ws []write
		for range sp.writes {
			off, data := randomWrite(r, sp.size)
			ws = append(ws, write{off, data})
		}
		ws = append(ws, write{hideRegion[0], bytes.Repeat([]byte{byte(0x30 + i)}, int(hideRegion[1]-hideRegion[0]))})
		if i == n-1 {
			ws = append(ws,
				write{hideRegion[0] + 777, make([]byte, 200*kib)},
				write{zeroRegion[0] + 1000, make([]byte, 300*kib+17)},
				write{sp.size - 3, []byte{0xa5, 0xa6, 0xa7}}, // the last bytes of the disk
			)
		}
		c, err := chain.Open(path, true)
		if err != nil {
			t.Fatalf("open %s for writing: %v", path, err)
		}
		for _, w := range ws {
			if k, err := c.WriteAt(w.data, w.off); err != nil || k != len(w.data) {
				c.Close()
				t.Fatalf("%s: write %d bytes at %d: wrote %d: %v", path, len(w.data), w.off, k, err)
			}
			f.apply(w.off, w.data)
		}
		if err := c.Close(); err != nil {
			t.Fatalf("close %s: %v", path, err)
		}
	}
	return f
}

// apply models a write into the top: the view takes the bytes, and the top stores
// every sector the write touches (its edges as the view showed them).
func (f *fixture) apply(off int64, data []byte) {
	copy(f.model[off:], data)
	s0, s1 := sectorSpan(off, int64(len(data)))
	copy(f.store[0][s0:s1], f.model[s0:s1])
	for s := s0 / sector; s < s1/sector; s++ {
		f.bits[0][s] = true
	}
}

// viewAt is the modelled view of the chain from depth k down.
func (f *fixture) viewAt(k int) []byte {
	out := make([]byte, f.size)
	for s := int64(0); s < f.size/sector; s++ {
		for i := k; i < len(f.paths); i++ {
			if f.types[i] != image.Differencing || f.bits[i][s] {
				copy(out[s*sector:(s+1)*sector], f.store[i][s*sector:(s+1)*sector])
				break
			}
		}
	}
	return out
}

// merged returns, per sector, whether layers [from, to) hold it, and the bytes the
// nearest of them holds there.
func (f *fixture) merged(from, to int) ([]bool, []byte) {
	mask := make([]bool, f.size/sector)
	data := make([]byte, f.size)
	for s := range mask {
		for i := from; i < to; i++ {
			if f.bits[i][s] {
				mask[s] = true
				copy(data[int64(s)*sector:int64(s+1)*sector], f.store[i][int64(s)*sector:int64(s+1)*sector])
				break
			}
		}
	}
	return mask, data
}

func countTrue(b []bool) int64 {
	var n int64
	for _, v := range b {
		if v {
			n++
		}
	}
	return n
}

func openChain(t *testing.T, path string, writable bool) *chain.Chain {
	t.Helper()
	c, err := chain.Open(path, writable)
	if err != nil {
		t.Fatalf("open chain %s: %v", path, err)
	}
	return c
}

// readView reads the whole view of c.
func readView(t *testing.T, c *chain.Chain) []byte {
	t.Helper()
	b := make([]byte, c.Size())
	if n, err := c.ReadAt(b, 0); err != nil || n != len(b) {
		t.Fatalf("read the view: %d bytes: %v", n, err)
	}
	return b
}

// assertSame compares got with want and names the first differing offset.
func assertSame(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	if len(got) != len(want) {
		t.Errorf("%s: %d bytes, want %d", what, len(got), len(want))
		return
	}
	for i := range got {
		if got[i] != want[i] {
			t.Errorf("%s: first difference at %d (sector %d): got %#02x, want %#02x", what, i, i/sector, got[i], want[i])
			return
		}
	}
}

// assertView opens the chain at path afresh and compares its view with want.
func assertView(t *testing.T, what, path string, want []byte) {
	t.Helper()
	c := openChain(t, path, false)
	defer c.Close()
	assertSame(t, what, readView(t, c), want)
}

// snapshot is the SHA-256 of every file in a directory, so that a test sees files
// changed, removed and added.
func snapshot(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][32]byte{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = sha256.Sum256(b)
	}
	return out
}

// assertUnchanged fails for every file of names (all files when names is empty)
// whose contents differ from the snapshot, and for files that came or went.
func assertUnchanged(t *testing.T, dir string, before map[string][32]byte, names ...string) {
	t.Helper()
	now := snapshot(t, dir)
	if len(names) == 0 {
		for n := range before {
			names = append(names, n)
		}
		for n := range now {
			if _, ok := before[n]; !ok {
				t.Errorf("%s appeared", n)
			}
		}
	}
	for _, n := range names {
		if w, ok := now[n]; !ok {
			t.Errorf("%s is gone", n)
		} else if w != before[n] {
			t.Errorf("%s changed", n)
		}
	}
}

// assertClean fails on every problem of severity error that chain.Check reports.
func assertClean(t *testing.T, path string) {
	t.Helper()
	for _, p := range chain.Check(path) {
		if p.Severity == image.Error {
			t.Errorf("check %s: %v", path, p)
		}
	}
}

func layerPaths(c *chain.Chain) []string {
	var out []string
	for _, l := range c.Layers() {
		out = append(out, l.Path)
	}
	return out
}

// presentSectors walks Run over a whole image and returns, per sector, whether the
// file stores it.
func presentSectors(t *testing.T, img image.Image) []bool {
	t.Helper()
	out := make([]bool, img.Size()/sector)
	for off := int64(0); off < img.Size(); {
		n, present, err := img.Run(off, img.Size()-off)
		if err != nil {
			t.Fatalf("%s: run at %d: %v", img.Name(), off, err)
		}
		if n <= 0 || n%sector != 0 {
			t.Fatalf("%s: run at %d is %d bytes", img.Name(), off, n)
		}
		for s := off / sector; s < (off+n)/sector; s++ {
			out[s] = present
		}
		off += n
	}
	return out
}

// allocatedBlocks returns, per block of a dynamic image, whether it is allocated,
// and the block size.
func allocatedBlocks(t *testing.T, path string) ([]bool, int64) {
	t.Helper()
	img := openImage(t, path)
	defer img.Close()
	bs := img.BlockSize()
	out := make([]bool, (img.Size()+bs-1)/bs)
	for b := range out {
		var err error
		_, out[b], err = img.Run(int64(b)*bs, 1)
		if err != nil {
			t.Fatal(err)
		}
	}
	if got, want := img.AllocatedBytes()/bs, countTrue(out); got != want {
		t.Errorf("%s: AllocatedBytes says %d blocks, Run finds %d", path, got, want)
	}
	return out, bs
}

func TestValidate(t *testing.T) {
	cases := []struct {
		name        string
		n           int
		from, depth int
		wantDepth   int   // after Validate, when it succeeds
		err         error // nil for success
	}{
		{"depth 0 is the default, 1", 4, 0, 0, 1, nil},
		{"depth 1 of two images", 2, 0, 1, 1, nil},
		{"depth 3 of four images: into the base", 4, 0, 3, 3, nil},
		{"from 1 depth 2 of four images: into the base", 4, 1, 2, 2, nil},
		{"from 2 depth 1 of four images", 4, 2, 1, 1, nil},
		{"negative depth", 4, 0, -1, 0, ErrDepth},
		{"negative from", 4, -1, 1, 0, ErrDepth},
		{"depth equal to the chain length", 4, 0, 4, 0, ErrDepth},
		{"depth past the chain length", 4, 0, 9, 0, ErrDepth},
		{"a single image has nothing to merge", 1, 0, 1, 0, ErrDepth},
		{"single image, default depth", 1, 0, 0, 0, ErrDepth},
		{"from+depth equal to the chain length", 4, 2, 2, 0, ErrDepth},
		{"from at the base", 4, 3, 1, 0, ErrDepth},
		{"from past the base", 4, 7, 1, 0, ErrDepth},
		{"depth that overflows from+depth", 4, 1, math.MaxInt, 0, ErrDepth},
		{"from that overflows from+depth", 4, math.MaxInt, 1, 0, ErrDepth},
		{"both huge", 4, math.MaxInt, math.MaxInt, 0, ErrDepth},
		{"most negative depth", 4, 0, math.MinInt, 0, ErrDepth},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := Options{From: tc.from, Depth: tc.depth}
			err := o.Validate(tc.n)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("Validate(%d) of from=%d depth=%d: %v, want %v", tc.n, tc.from, tc.depth, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Validate(%d) of from=%d depth=%d: %v", tc.n, tc.from, tc.depth, err)
			}
			if o.Depth != tc.wantDepth || o.From != tc.from {
				t.Errorf("after Validate: from=%d depth=%d, want from=%d depth=%d", o.From, o.Depth, tc.from, tc.wantDepth)
			}
			if o.Progress == nil || o.Logf == nil || o.Hook == nil {
				t.Errorf("Validate left a callback nil: progress %v, logf %v, hook %v", o.Progress != nil, o.Logf != nil, o.Hook != nil)
			}
			// Defaults are callable.
			o.Progress(0, 0)
			o.Logf("x %d", 1)
			o.Hook("copy-start")
		})
	}
}

// chainSpec is the 4-deep chain of format the merge tests run on: a fixed or dynamic
// base and three differencing images with other block sizes than the base and each
// other.
func chainSpec(format string, base image.Type, seed uint64) spec {
	return spec{format: format, base: base, size: 8 * mib, blockSizes: blockSizes(format, 1*mib, 512*kib, 2*mib, 64*kib), writes: 20, seed: seed}
}

// TestMergeFromTop merges the top and depth-1 images below it into the image depth
// levels down, for differencing, dynamic and fixed targets.
func TestMergeFromTop(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, base := range []image.Type{image.Dynamic, image.Fixed} {
			for depth := 1; depth <= 3; depth++ {
				target := "differencing"
				if depth == 3 {
					target = base.String()
				}
				t.Run(fmt.Sprintf("depth %d into %s (base %s)", depth, target, base), func(t *testing.T) {
					f := buildChain(t, chainSpec(format, base, uint64(depth)*10+uint64(base)))
					testMergeFromTop(t, f, depth)
				})
			}
		}
	})
}

func testMergeFromTop(t *testing.T, f *fixture, depth int) {
	targetPath := f.paths[depth]
	before := snapshot(t, f.dir)
	mask, mergedData := f.merged(0, depth)
	var wantBits []bool
	var wantBlocks []bool
	switch f.types[depth] {
	case image.Differencing:
		// The target gains exactly the merged sectors, zeros included.
		wantBits = slices.Clone(f.bits[depth])
		for s, m := range mask {
			wantBits[s] = wantBits[s] || m
		}
	case image.Dynamic:
		// A block gets allocated only for non-zero merged data.
		var bs int64
		wantBlocks, bs = allocatedBlocks(t, targetPath)
		for s, m := range mask {
			off := int64(s) * sector
			if m && !fileio.AllZero(mergedData[off:off+sector]) {
				wantBlocks[off/bs] = true
			}
		}
		if b := zeroRegion[0] / bs; wantBlocks[b] {
			t.Fatalf("test setup: block %d of the base should be left unallocated", b)
		}
	}

	c := openChain(t, f.paths[0], true)
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	oldTopID := c.Layers()[0].Image.ID()
	oldTargetID := c.Layers()[depth].Image.ID()
	assertSame(t, "view before the merge", readView(t, c), f.model)
	var points []string
	res, err := Merge(context.Background(), c, Options{Depth: depth, Hook: func(p string) { points = append(points, p) }})
	if err != nil {
		t.Fatalf("merge depth=%d: %v", depth, err)
	}
	if want := []string{"push", "prepare", "prepare-parent", "copy-start", "copy-half", "copy-done", "relink-before", "relink-parent", "relink-id", "relink-target", "relink-after"}; !slices.Equal(points, want) {
		t.Errorf("hook points %v, want %v", points, want)
	}
	if res.Target != targetPath {
		t.Errorf("result target %s, want %s", res.Target, targetPath)
	}
	if want := f.paths[1:depth]; !slices.Equal(res.Detached, want) {
		t.Errorf("detached %v, want %v", res.Detached, want)
	}
	if want := countTrue(mask) * sector; res.Bytes != want {
		t.Errorf("result bytes %d, want %d (the merged sectors)", res.Bytes, want)
	}

	// The open chain: same view, the new top on the target, the rest as before.
	assertSame(t, "view after the merge", readView(t, c), f.model)
	wantPaths := append([]string{f.paths[0]}, f.paths[depth:]...)
	if got := layerPaths(c); !slices.Equal(got, wantPaths) {
		t.Errorf("layers after the merge %v, want %v", got, wantPaths)
	}

	// The new top: an empty differencing image at the old top's path, on the target.
	top := c.Layers()[0].Image
	targetImg := openImage(t, targetPath)
	if top.Type() != image.Differencing || top.AllocatedBytes() != 0 || top.Size() != f.size || !top.Writable() {
		t.Errorf("new top: %v, %d bytes allocated, size %d, writable %v", top.Type(), top.AllocatedBytes(), top.Size(), top.Writable())
	}
	if top.ParentID() != targetImg.ID() {
		t.Errorf("new top's parent unique ID %s, want the target's %s", top.ParentID(), targetImg.ID())
	}
	// Identity: the new top is the old top's stand-in (same view), so it keeps the
	// old top's ID; the target changed, so it has a new one.
	if got := top.ID(); got != oldTopID {
		t.Errorf("new top's unique ID %s, want the old top's %s", got, oldTopID)
	}
	if got := targetImg.ID(); got == oldTargetID {
		t.Errorf("target kept its unique ID %s after being merged into", got)
	}
	switch {
	case wantBits != nil:
		got := presentSectors(t, targetImg)
		for s := range got {
			if got[s] != wantBits[s] {
				t.Errorf("target sector %d: stored %v, want %v (merged %v)", s, got[s], wantBits[s], mask[s])
				break
			}
		}
	case wantBlocks != nil:
		if got, _ := allocatedBlocks(t, targetPath); !slices.Equal(got, wantBlocks) {
			t.Errorf("allocated blocks of the target %v, want %v", got, wantBlocks)
		}
	}
	targetImg.Close()

	// The merged-away images (but the one right above the target, which records the
	// target's interim ID) and those below the target are untouched; the top's path
	// now holds another file; no temporary file is left.
	var untouched []string
	for _, p := range append(f.paths[1:max(depth-1, 1):max(depth-1, 1)], f.paths[depth+1:]...) {
		untouched = append(untouched, filepath.Base(p))
	}
	assertUnchanged(t, f.dir, before, untouched...)
	if got, want := len(snapshot(t, f.dir)), len(before); got != want {
		t.Errorf("%d files in the directory after the merge, want %d", got, want)
	}

	// The target alone shows the merged view.
	assertView(t, "the target's view", targetPath, f.model)
	// The images merged away no longer open: their chain runs into the target,
	// whose unique ID changed.
	for _, p := range f.paths[1:depth] {
		if c, err := chain.Open(p, false); !errors.Is(err, image.ErrParentMismatch) || !strings.Contains(err.Error(), "no longer valid") {
			if err == nil {
				c.Close()
			}
			t.Errorf("open merged-away %s: %v, want ErrParentMismatch saying it is no longer valid", p, err)
		}
	}

	// The new top takes writes.
	w := bytes.Repeat([]byte{0x5a}, 1000)
	if _, err := c.WriteAt(w, 3*mib+100); err != nil {
		t.Fatalf("write into the new top: %v", err)
	}
	copy(f.model[3*mib+100:], w)
	assertSame(t, "view after a write into the new top", readView(t, c), f.model)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c = nil

	// The chain on disk, opened afresh.
	c2 := openChain(t, f.paths[0], false)
	if got := layerPaths(c2); !slices.Equal(got, wantPaths) {
		t.Errorf("layers reopened %v, want %v", got, wantPaths)
	}
	assertSame(t, "view reopened", readView(t, c2), f.model)
	c2.Close()
	assertClean(t, f.paths[0])
}

// TestMergeMiddle merges a range below the top into the image under it; the image
// above the range is re-linked to the target and the top stays writable.
func TestMergeMiddle(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		cases := []struct{ from, depth int }{{1, 1}, {2, 1}, {1, 2}}
		for _, base := range []image.Type{image.Dynamic, image.Fixed} {
			for _, tc := range cases {
				t.Run(fmt.Sprintf("from %d depth %d (base %s)", tc.from, tc.depth, base), func(t *testing.T) {
					f := buildChain(t, chainSpec(format, base, uint64(100+tc.from*10+tc.depth)+uint64(base)))
					from, depth := tc.from, tc.depth
					to := from + depth
					targetPath := f.paths[to]
					before := snapshot(t, f.dir)
					targetView := f.viewAt(from)
					mask, _ := f.merged(from, to)

					c := openChain(t, f.paths[0], true)
					defer c.Close()
					res, err := Merge(context.Background(), c, Options{From: from, Depth: depth})
					if err != nil {
						t.Fatalf("merge from=%d depth=%d: %v", from, depth, err)
					}
					if want := f.paths[from:to]; !slices.Equal(res.Detached, want) || res.Target != targetPath {
						t.Errorf("result: target %s, detached %v; want %s, %v", res.Target, res.Detached, targetPath, want)
					}
					if want := countTrue(mask) * sector; res.Bytes != want {
						t.Errorf("result bytes %d, want %d", res.Bytes, want)
					}
					assertSame(t, "view after the merge", readView(t, c), f.model)
					wantPaths := append(slices.Clone(f.paths[:from]), f.paths[to:]...)
					if got := layerPaths(c); !slices.Equal(got, wantPaths) {
						t.Errorf("layers after the merge %v, want %v", got, wantPaths)
					}

					// The image above the range now names the target as its parent.
					above := openImage(t, f.paths[from-1])
					targetImg := openImage(t, targetPath)
					if above.ParentID() != targetImg.ID() {
						t.Errorf("%s: parent ID %s, want the target's %s", f.paths[from-1], above.ParentID(), targetImg.ID())
					}
					above.Close()
					targetImg.Close()

					// Merged images and those below the target are untouched, but for the
					// merged layer right above the target, which records the target's interim
					// ID; so is the top when it is not the re-linked one.
					var untouched []string
					for i, p := range f.paths {
						if i != from-1 && i != to && i != to-1 {
							untouched = append(untouched, filepath.Base(p))
						}
					}
					assertUnchanged(t, f.dir, before, untouched...)
					assertView(t, "the target's view", targetPath, targetView)

					// The top still takes writes, through the new chain.
					w := bytes.Repeat([]byte{0xc3}, 3000)
					if _, err := c.WriteAt(w, 7*mib+11); err != nil {
						t.Fatalf("write after the merge: %v", err)
					}
					copy(f.model[7*mib+11:], w)
					assertSame(t, "view after a write", readView(t, c), f.model)
					if err := c.Close(); err != nil {
						t.Fatal(err)
					}
					c2 := openChain(t, f.paths[0], false)
					defer c2.Close()
					if got := layerPaths(c2); !slices.Equal(got, wantPaths) {
						t.Errorf("layers reopened %v, want %v", got, wantPaths)
					}
					assertSame(t, "view reopened", readView(t, c2), f.model)
					assertClean(t, f.paths[0])
				})
			}
		}
	})
}

// TestMergeAbort cancels the context from the hook at a point of the copy: Merge
// returns context.Canceled, the chain is as it was (in memory and on disk), and the
// same merge then completes.
func TestMergeAbort(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		cases := []struct {
			point       string
			from, depth int
		}{
			{"copy-half", 0, 2},
			{"copy-half", 0, 3},
			{"copy-half", 1, 2},
			{"copy-start", 0, 1},
			{"copy-done", 0, 2},
			{"copy-done", 2, 1},
		}
		for i, tc := range cases {
			t.Run(fmt.Sprintf("from %d depth %d cancelled at %s", tc.from, tc.depth, tc.point), func(t *testing.T) {
				sp := chainSpec(format, image.Dynamic, uint64(200+i))
				sp.size, sp.writes = 16*mib, 40 // several 4 MiB chunks, so copy-half falls inside the copy
				f := buildChain(t, sp)
				// The images an abort must not touch: all but the target and the merged
				// layer right above it, which records the target's interim unique ID.
				var keep []string
				to := tc.from + tc.depth
				for k, p := range f.paths {
					if k != to && k != to-1 {
						keep = append(keep, filepath.Base(p))
					}
				}
				oldTargetID := readID(t, f.paths[to])
				before := snapshot(t, f.dir)
				c := openChain(t, f.paths[0], true)
				defer c.Close()
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				var progress int64
				var points []string
				opts := Options{From: tc.from, Depth: tc.depth,
					Progress: func(done, total int64) { progress = done },
					Hook: func(p string) {
						points = append(points, p)
						if p == tc.point {
							cancel()
						}
					}}
				res, err := Merge(ctx, c, opts)
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("merge cancelled at %s: %v (result %+v), want context.Canceled", tc.point, err, res)
				}
				if slices.Contains(points, "relink-before") {
					t.Errorf("a cancelled merge went on to re-link: %v", points)
				}
				if tc.point == "copy-half" && progress == 0 {
					t.Errorf("cancelled at copy-half before anything was copied")
				}
				if got := layerPaths(c); !slices.Equal(got, f.paths) {
					t.Errorf("layers after abort %v, want %v", got, f.paths)
				}
				assertSame(t, "view after abort", readView(t, c), f.model)
				assertUnchanged(t, f.dir, before, keep...)
				if got, want := len(snapshot(t, f.dir)), len(before); got != want {
					t.Errorf("%d files after abort, want %d", got, want)
				}
				// What is on disk is a valid chain with the same view; the target took an
				// interim ID before the copy changed it, and the layer above records it.
				assertClean(t, f.paths[0])
				assertView(t, "view reopened after abort", f.paths[0], f.model)
				if id := readID(t, f.paths[to]); id == oldTargetID {
					t.Errorf("the target kept its unique ID %s although the copy changed it", id)
				}

				// The same merge again completes.
				if _, err := Merge(context.Background(), c, Options{From: tc.from, Depth: tc.depth}); err != nil {
					t.Fatalf("merge after abort: %v", err)
				}
				if got, want := c.Len(), len(f.paths)-tc.depth+boolInt(tc.from == 0); got != want {
					t.Errorf("chain of %d after the merge, want %d", got, want)
				}
				assertSame(t, "view after the merge", readView(t, c), f.model)
				if err := c.Close(); err != nil {
					t.Fatal(err)
				}
				assertView(t, "view reopened after the merge", f.paths[0], f.model)
				assertClean(t, f.paths[0])
			})
		}
	})
}

// readID returns the unique ID of the image at path.
func readID(t *testing.T, path string) image.ID {
	t.Helper()
	img := openImage(t, path)
	defer img.Close()
	return img.ID()
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestMergeProgress: the callback starts at 0, never goes back, keeps one total, and
// ends at done == total == the bytes the merged layers hold.
func TestMergeProgress(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tc := range []struct{ from, depth int }{{0, 1}, {0, 3}, {1, 2}} {
			t.Run(fmt.Sprintf("from %d depth %d", tc.from, tc.depth), func(t *testing.T) {
				sp := chainSpec(format, image.Fixed, uint64(300+tc.from*10+tc.depth))
				sp.size, sp.writes = 16*mib, 40
				f := buildChain(t, sp)
				mask, _ := f.merged(tc.from, tc.from+tc.depth)
				want := countTrue(mask) * sector
				c := openChain(t, f.paths[0], true)
				defer c.Close()
				type call struct{ done, total int64 }
				var calls []call
				res, err := Merge(context.Background(), c, Options{From: tc.from, Depth: tc.depth,
					Progress: func(done, total int64) { calls = append(calls, call{done, total}) }})
				if err != nil {
					t.Fatal(err)
				}
				if len(calls) < 2 {
					t.Fatalf("progress called %d times: %v", len(calls), calls)
				}
				if calls[0].done != 0 {
					t.Errorf("first progress call %v, want done 0", calls[0])
				}
				for k, cl := range calls {
					if cl.total != want {
						t.Errorf("progress call %d: total %d, want %d", k, cl.total, want)
					}
					if cl.done < 0 || cl.done > cl.total || (k > 0 && cl.done < calls[k-1].done) {
						t.Errorf("progress call %d: %v after %v", k, cl, calls[max(k-1, 0)])
					}
				}
				if last := calls[len(calls)-1]; last.done != want || last.total != want {
					t.Errorf("last progress call %v, want done = total = %d", last, want)
				}
				if res.Bytes != want {
					t.Errorf("result bytes %d, want %d", res.Bytes, want)
				}
				assertSame(t, "view after the merge", readView(t, c), f.model)
			})
		}
	})
}

// TestMergeRejects: merges that cannot run fail before writing anything.
func TestMergeRejects(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		// mid (8 MiB) sits on small (4 MiB): re-linked there from an 8 MiB base, big8, as
		// a resized or hand-built chain would be. top (8 MiB) is above it.
		dir := t.TempDir()
		r := newRand(t, 400)
		small, big8 := filepath.Join(dir, imageName(format, "small", false)), filepath.Join(dir, imageName(format, "big8", false))
		mid, top := filepath.Join(dir, imageName(format, "mid", true)), filepath.Join(dir, imageName(format, "top", true))
		write := func(path string, off int64, n int) {
			t.Helper()
			c := openChain(t, path, true)
			if _, err := c.WriteAt(randBytes(r, n), off); err != nil {
				t.Fatal(err)
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
		}
		createBase(t, format, small, image.Dynamic, 4*mib, 0)
		createBase(t, format, big8, image.Dynamic, 8*mib, 0)
		write(small, 1*mib, 100*kib)
		createChild(t, big8, mid, 0)
		{
			w, err := probe.Open(mid, probe.Writable)
			if err != nil {
				t.Fatal(err)
			}
			p := openImage(t, small)
			if err := w.SetParent(p.ID(), small, mid); err != nil {
				t.Fatal(err)
			}
			p.Close()
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
		}
		write(mid, 1*mib+50*kib, 100*kib)
		write(mid, 6*mib, 100*kib) // past the end of small
		createChild(t, mid, top, 0)
		write(top, 7*mib+3, 5000)

		cases := []struct {
			name        string
			from, depth int
			err         error
		}{
			{"depth reaching past the base", 0, 3, ErrDepth},
			{"from and depth reaching past the base", 1, 2, ErrDepth},
			{"negative depth", 0, -1, ErrDepth},
			{"from at the base", 2, 1, ErrDepth},
			{"merged layers larger than the target", 0, 2, ErrTooLarge},
			{"middle layer larger than the target", 1, 1, ErrTooLarge},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				before := snapshot(t, dir)
				c := openChain(t, top, true)
				defer c.Close()
				want := readView(t, c)
				paths := layerPaths(c)
				var points []string
				res, err := Merge(context.Background(), c, Options{From: tc.from, Depth: tc.depth, Hook: func(p string) { points = append(points, p) }})
				if !errors.Is(err, tc.err) {
					t.Fatalf("merge from=%d depth=%d: %v (result %+v), want %v", tc.from, tc.depth, err, res, tc.err)
				}
				if len(points) != 0 {
					t.Errorf("a rejected merge reached %v", points)
				}
				if got := layerPaths(c); !slices.Equal(got, paths) {
					t.Errorf("layers %v, want %v", got, paths)
				}
				assertSame(t, "view", readView(t, c), want)
				if err := c.Close(); err != nil {
					t.Fatal(err)
				}
				assertUnchanged(t, dir, before)
			})
		}
	})
}
