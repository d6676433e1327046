package chain

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vhdfs/vhdfs/vhd"
)

// TestChainModel builds chains layer by layer with random writes through chain.WriteAt
// (whole sectors, unaligned, across block boundaries, zeros) and keeps the disk each
// depth shows in a model: the whole chain and every depth must read as its model.
func TestChainModel(t *testing.T) {
	tests := []struct {
		name     string
		base     vhd.DiskType
		size     int64
		baseBS   int64
		childBS  []int64 // one per differencing layer, top last
		writes   int
		baseFill bool // write the whole base first
	}{
		{name: "dynamic base, depth 3, 4 KiB blocks", base: vhd.TypeDynamic, size: 1 * mib, baseBS: 4 * kib, childBS: []int64{4 * kib, 4 * kib}, writes: 60},
		{name: "fixed base, depth 4, mixed block sizes", base: vhd.TypeFixed, size: 1 * mib, childBS: []int64{512, 64 * kib, 4 * kib}, writes: 50, baseFill: true},
		{name: "512-byte blocks everywhere, depth 3", base: vhd.TypeDynamic, size: 256 * kib, baseBS: 512, childBS: []int64{512, 512}, writes: 80},
		{name: "2 MiB blocks, depth 5", base: vhd.TypeDynamic, size: 6 * mib, baseBS: 2 * mib, childBS: []int64{2 * mib, 2 * mib, 2 * mib, 2 * mib}, writes: 30},
		{name: "8 MiB base block under 64 KiB and 512-byte children", base: vhd.TypeDynamic, size: 3*mib + 512, baseBS: 8 * mib, childBS: []int64{64 * kib, 512, 64 * kib}, writes: 40, baseFill: true},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			r := newRand(t, uint64(i)+1)
			bss := append([]int64{max(tc.baseBS, 4*kib)}, tc.childBS...)
			var models [][]byte // by layer, base first
			model := make([]byte, tc.size)
			path := createBase(t, dir, "base.vhd", tc.base, tc.size, tc.baseBS)
			paths := []string{path}
			for layer := range bss {
				if layer > 0 {
					path = createChild(t, dir, fmt.Sprintf("layer%d.vhd", layer), path, tc.childBS[layer-1])
					paths = append(paths, path)
				}
				c := openChain(t, path, true)
				if c.Len() != layer+1 {
					t.Fatalf("chain of %s has %d layers, want %d", filepath.Base(path), c.Len(), layer+1)
				}
				// An empty child shows its parent.
				checkReads(t, r, c, 0, model)
				if layer == 0 && tc.baseFill {
					p := randBytes(r, int(tc.size))
					if _, err := c.WriteAt(p, 0); err != nil {
						t.Fatal(err)
					}
					copy(model, p)
				}
				writeRandom(t, r, c, model, tc.writes, bss[layer])
				checkReads(t, r, c, 0, model)
				closeChain(t, c)
				models = append(models, append([]byte(nil), model...))
			}

			below := make([][]byte, len(paths)-1)
			for i, p := range paths[:len(paths)-1] {
				below[i] = readFile(t, p)
			}
			c := openChain(t, path, false)
			if c.Len() != len(paths) {
				t.Fatalf("chain has %d layers, want %d", c.Len(), len(paths))
			}
			for d, l := range c.Layers() {
				if want := paths[len(paths)-1-d]; l.Path != want {
					t.Errorf("layer %d is %s, want %s", d, l.Path, want)
				}
				if d > 0 && l.FoundBy != "W2ru" {
					t.Errorf("layer %d found by %q, want W2ru", d, l.FoundBy)
				}
				if l.Image.Writable() {
					t.Errorf("layer %d of a read-only chain is writable", d)
				}
				checkReads(t, r, c, d, models[len(models)-1-d])
			}
			if _, err := c.ReadAtDepth(make([]byte, 1), 0, c.Len()); !errors.Is(err, vhd.ErrInvalidArg) {
				t.Errorf("ReadAtDepth below the base: %v, want ErrInvalidArg", err)
			}
			if _, err := c.ReadAtDepth(make([]byte, 1), 0, -1); !errors.Is(err, vhd.ErrInvalidArg) {
				t.Errorf("ReadAtDepth(-1): %v, want ErrInvalidArg", err)
			}
			closeChain(t, c)
			for i, p := range paths[:len(paths)-1] {
				if !bytes.Equal(readFile(t, p), below[i]) {
					t.Errorf("%s changed though it is below the top", filepath.Base(p))
				}
			}
			if ps := Check(path); len(atLeast(ps, vhd.Warning)) > 0 {
				t.Errorf("Check: %v", ps)
			}
		})
	}
}

func atLeast(ps []vhd.Problem, s vhd.Severity) []vhd.Problem {
	var out []vhd.Problem
	for _, p := range ps {
		if p.Severity >= s {
			out = append(out, p)
		}
	}
	return out
}

// TestWritesStayInTop writes through a chain and checks that only the top file changed
// and that the top's bitmaps hold exactly the written sectors: a sector-granular
// write into a new block must not hide the parent's other sectors of that block.
func TestWritesStayInTop(t *testing.T) {
	dir := t.TempDir()
	r := newRand(t, 99)
	const size = 512 * kib
	base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, size, 64*kib)
	c := openChain(t, base, true)
	model := randBytes(r, size)
	if _, err := c.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	closeChain(t, c)
	top := createChild(t, dir, "top.vhd", base, 64*kib)
	baseBytes := readFile(t, base)

	c = openChain(t, top, true)
	writes := []struct{ off, n int64 }{
		{100, 10},                    // inside sector 0
		{64*kib - 3, 6},              // across a block boundary, two partial sectors
		{130 * kib, 512},             // one whole sector
		{200*kib + 511, 514},         // partial, whole, partial
		{size - 1, 1},                // the last byte
		{300 * kib, 0},               // nothing
		{400*kib + 7, 64*kib + 1000}, // a block and more
	}
	present := make([]bool, size/vhd.SectorSize)
	for _, w := range writes {
		p := make([]byte, w.n) // zeros: they must still hide the parent
		if n, err := c.WriteAt(p, w.off); n != int(w.n) || err != nil {
			t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", w.n, w.off, n, err)
		}
		copy(model[w.off:], p)
		for s := w.off / vhd.SectorSize; w.n > 0 && s <= (w.off+w.n-1)/vhd.SectorSize; s++ {
			present[s] = true
		}
	}
	checkReads(t, r, c, 0, model)
	topImg := c.Layers()[0].Image
	for s := range present {
		_, p, err := topImg.Run(int64(s)*vhd.SectorSize, vhd.SectorSize)
		if err != nil {
			t.Fatal(err)
		}
		if p != present[s] {
			t.Fatalf("top image sector %d present=%v, want %v", s, p, present[s])
		}
	}
	closeChain(t, c)
	if !bytes.Equal(readFile(t, base), baseBytes) {
		t.Errorf("the base changed")
	}
}

func TestWriteAtErrors(t *testing.T) {
	dir := t.TempDir()
	const size = 64 * kib
	base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, size, 4*kib)
	top := createChild(t, dir, "top.vhd", base, 0)
	tests := []struct {
		name     string
		writable bool
		off      int64
		n        int
		wantN    int
		wantErr  error
	}{
		{"write running past the end writes what fits", true, size - 700, 1000, 700, ErrNoSpace},
		{"write at the end", true, size, 1, 0, ErrNoSpace},
		{"write beyond the end", true, size + 4096, 1, 0, ErrNoSpace},
		{"negative offset", true, -1, 1, 0, ErrNoSpace},
		{"read-only chain", false, 0, 512, 0, ErrReadOnly},
		{"empty write", true, 100, 0, 0, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := openChain(t, top, tc.writable)
			before := make([]byte, size)
			if _, err := c.ReadAt(before, 0); err != nil {
				t.Fatal(err)
			}
			p := bytes.Repeat([]byte{0x3c}, tc.n)
			n, err := c.WriteAt(p, tc.off)
			if n != tc.wantN || !errors.Is(err, tc.wantErr) {
				t.Fatalf("WriteAt(%d bytes at %d) = %d, %v; want %d, %v", tc.n, tc.off, n, err, tc.wantN, tc.wantErr)
			}
			want := before
			if n > 0 {
				copy(want[tc.off:], p[:n])
			}
			got := make([]byte, size)
			if _, err := c.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("disk after the write differs at %d", firstDiff(got, want))
			}
			closeChain(t, c)
		})
	}
}

// TestLargerChild: a child may be larger than its parent; past the parent's end it
// reads zeros, also inside the parent's last, partly used block and in the edge sectors
// an unaligned write reads back.
func TestLargerChild(t *testing.T) {
	t.Run("footer grown in place, parent ends inside a block", func(t *testing.T) {
		dir := t.TempDir()
		r := newRand(t, 5)
		const parentSize, childSize = 1*mib - 32*kib - 512, 1 * mib
		parent := createBase(t, dir, "parent.vhd", vhd.TypeDynamic, parentSize, 64*kib)
		c := openChain(t, parent, true)
		pdata := randBytes(r, parentSize)
		if _, err := c.WriteAt(pdata, 0); err != nil {
			t.Fatal(err)
		}
		closeChain(t, c)
		child := createChild(t, dir, "child.vhd", parent, 64*kib)
		// 16 BAT entries of 64 KiB cover the larger size.
		editFooter(t, child, func(f *vhd.Footer) { f.CurrentSize = childSize; f.Geometry = vhd.CHS(childSize) })

		c = openChain(t, child, true)
		if c.Size() != childSize || c.SizeAt(1) != parentSize {
			t.Fatalf("sizes %d over %d, want %d over %d", c.Size(), c.SizeAt(1), childSize, parentSize)
		}
		model := make([]byte, childSize)
		copy(model, pdata)
		checkReads(t, r, c, 0, model)
		checkReads(t, r, c, 1, pdata)
		for _, w := range []struct{ off, n int64 }{
			{parentSize - 100, 300},   // straddles the parent's end, unaligned both sides
			{parentSize + 700, 10},    // past the parent's end, in its last block
			{childSize - 600, 600},    // the child's end
			{parentSize - 512, 512},   // the parent's last sector, whole
			{parentSize - 1000, 1500}, // again across, over earlier writes
		} {
			p := randBytes(r, int(w.n))
			if n, err := c.WriteAt(p, w.off); n != int(w.n) || err != nil {
				t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", w.n, w.off, n, err)
			}
			copy(model[w.off:], p)
			checkReads(t, r, c, 0, model)
		}
		writeRandom(t, r, c, model, 40, 64*kib)
		checkReads(t, r, c, 0, model)
		checkReads(t, r, c, 1, pdata)
		closeChain(t, c)
	})
	t.Run("depth 3, each layer larger, re-linked with SetParent", func(t *testing.T) {
		dir := t.TempDir()
		r := newRand(t, 6)
		sizes := []int64{256 * kib, 512*kib + 512, 1 * mib}
		bss := []int64{4 * kib, 64 * kib, 4 * kib}
		path := createBase(t, dir, "l0.vhd", vhd.TypeDynamic, sizes[0], bss[0])
		var models [][]byte
		var model []byte
		for i, size := range sizes {
			if i > 0 {
				path = createSizedChild(t, dir, fmt.Sprintf("l%d.vhd", i), path, size, bss[i])
			}
			grown := make([]byte, size)
			copy(grown, model)
			model = grown
			c := openChain(t, path, true)
			checkReads(t, r, c, 0, model)
			writeRandom(t, r, c, model, 40, bss[i])
			checkReads(t, r, c, 0, model)
			closeChain(t, c)
			models = append(models, append([]byte(nil), model...))
		}
		c := openChain(t, path, false)
		for d := range sizes {
			checkReads(t, r, c, d, models[len(models)-1-d])
		}
		if ps := Check(path); len(atLeast(ps, vhd.Warning)) > 0 {
			t.Errorf("Check: %v", ps)
		}
	})
}

// TestConcurrentReadWrite reads through the chain while another goroutine writes into
// a disjoint range; run with -race.
func TestConcurrentReadWrite(t *testing.T) {
	dir := t.TempDir()
	r := newRand(t, 11)
	const size = 256 * kib
	base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, size, 4*kib)
	c := openChain(t, base, true)
	model := randBytes(r, size/2)
	if _, err := c.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	closeChain(t, c)
	top := createChild(t, dir, "top.vhd", base, 512)
	c = openChain(t, top, true)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for off := int64(size / 2); off+700 < size; off += 1500 {
			if _, err := c.WriteAt(bytes.Repeat([]byte{1}, 700), off); err != nil {
				t.Error(err)
				return
			}
			if off%(32*kib) < 1500 {
				if err := c.Sync(); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, size/2)
			for range 40 {
				if _, err := c.ReadAt(p, 0); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(p, model) {
					t.Error("the untouched half changed during writes")
					return
				}
				if _, err := c.ReadAt(p, size/2); err != nil && !errors.Is(err, io.EOF) {
					t.Error(err)
					return
				}
				_ = Describe(c)
			}
		}()
	}
	wg.Wait()
}

func TestExport(t *testing.T) {
	dir := t.TempDir()
	r := newRand(t, 12)
	const size = 9*mib + 512 // not a whole number of export chunks
	base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, size, 64*kib)
	c := openChain(t, base, true)
	model := make([]byte, size)
	writeRandom(t, r, c, model, 30, 64*kib)
	closeChain(t, c)
	top := createChild(t, dir, "top.vhd", base, 4*kib)
	c = openChain(t, top, true)
	writeRandom(t, r, c, model, 30, 4*kib)
	out, err := os.Create(filepath.Join(dir, "out.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	var mu sync.Mutex // Export calls progress from its workers
	var last int64
	if err := Export(c, out, func(done int64) { mu.Lock(); last = max(last, done); mu.Unlock() }); err != nil {
		t.Fatalf("Export: %v", err)
	}
	if last != size {
		t.Errorf("progress ended at %d, want %d", last, size)
	}
	if got := readFile(t, out.Name()); !bytes.Equal(got, model) {
		t.Fatalf("exported image differs from the model at %d (len %d)", firstDiff(got, model), len(got))
	}
}

func TestDescribe(t *testing.T) {
	dir := t.TempDir()
	base := createBase(t, dir, "base.vhd", vhd.TypeFixed, 128*kib, 0)
	mid := createChild(t, dir, "mid.vhd", base, 4*kib)
	top := createChild(t, dir, "top.vhd", mid, 0)
	c := openChain(t, top, true)
	if _, err := c.WriteAt([]byte{1}, 5000); err != nil {
		t.Fatal(err)
	}
	info := Describe(c)
	if info.VirtualSize != 128*kib || len(info.Layers) != 3 {
		t.Fatalf("Describe = %+v", info)
	}
	baseImg, midImg := c.Layers()[2].Image, c.Layers()[1].Image
	want := []LayerInfo{
		{Depth: 0, Path: top, Type: "differencing", VirtualSize: 128 * kib, BlockSize: 4 * kib, AllocatedBytes: 4 * kib, ParentUniqueID: midImg.ID().String()},
		{Depth: 1, Path: mid, Type: "differencing", VirtualSize: 128 * kib, BlockSize: 4 * kib, ParentUniqueID: baseImg.ID().String(), FoundBy: "W2ru"},
		{Depth: 2, Path: base, Type: "fixed", VirtualSize: 128 * kib, AllocatedBytes: 128 * kib, FoundBy: "W2ru"},
	}
	for i, w := range want {
		g := info.Layers[i]
		if g.Depth != w.Depth || g.Path != w.Path || g.Type != w.Type || g.VirtualSize != w.VirtualSize || g.BlockSize != w.BlockSize ||
			g.AllocatedBytes != w.AllocatedBytes || g.ParentUniqueID != w.ParentUniqueID || g.FoundBy != w.FoundBy {
			t.Errorf("layer %d = %+v, want %+v", i, g, w)
		}
		if g.Creator != "vhdf 1.0" || g.UniqueID != c.Layers()[i].Image.ID().String() {
			t.Errorf("layer %d creator %q unique ID %q", i, g.Creator, g.UniqueID)
		}
		if w.Type == "differencing" && g.ParentName != filepath.Base(c.Layers()[i+1].Path) {
			t.Errorf("layer %d's parent name is not its parent's base name: %+v", i, g)
		}
	}
}
