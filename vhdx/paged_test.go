package vhdx

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/pagecache"
)

// TestHugeSparseChain: a 64 TiB dynamic base with 1 MiB blocks (a 512 MiB BAT) and
// seven differencing children on it are each made in under 2 s and under 64 MiB on
// disk, open together in under 3 s and 100 MiB of heap (the table is paged: the
// bitmap cache's budget plus what is allocated), take writes far apart (the last
// sector of the disk included) that read back after a reopen, and count and check
// their blocks without reading the table's holes.
func TestHugeSparseChain(t *testing.T) {
	const (
		size   = 64 << 40
		layers = 8
	)
	dir := t.TempDir()
	paths := make([]string, layers)
	// writes[l] are the offsets layer l gets a 4 KiB write at.
	writes := [][]int64{
		{0, 1 << 40, size - 4096},
		{3 * MiB, 40 << 40},
		{},
		{1<<40 + 4096, size - 2*MiB},
		{},
		{32 << 40},
		{},
		{size - 4096, 5 * MiB},
	}
	data := func(l int, off int64) []byte {
		return bytes.Repeat([]byte(fmt.Sprintf("layer %d at %d;", l, off)), 4096)[:4096]
	}
	var parent *Image
	for l := range layers {
		paths[l] = filepath.Join(dir, fmt.Sprintf("l%d.avhdx", l))
		o := CreateOptions{Type: TypeDynamic, Size: size, BlockSize: MiB}
		if l > 0 {
			o = CreateOptions{Type: TypeDifferencing, BlockSize: MiB, Parent: parent}
		}
		start := time.Now()
		if err := Create(paths[l], o); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		if parent != nil {
			parent.Close()
		}
		var st syscall.Stat_t
		if err := syscall.Stat(paths[l], &st); err != nil {
			t.Fatal(err)
		}
		t.Logf("layer %d: made in %v, %d bytes, %d on disk", l, took, st.Size, st.Blocks*512)
		if took > 2*time.Second || st.Blocks*512 > 64*MiB {
			t.Fatalf("layer %d: made in %v, %d MiB on disk; want under 2 s and 64 MiB", l, took, st.Blocks*512>>20)
		}
		img, err := Open(paths[l], true)
		if err != nil {
			t.Fatal(err)
		}
		for _, off := range writes[l] {
			if _, err := img.WriteAt(data(l, off), off); err != nil {
				t.Fatal(err)
			}
		}
		if err := img.Sync(); err != nil {
			t.Fatal(err)
		}
		parent = img
	}
	parent.Close()

	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	imgs := make([]*Image, layers)
	for l := range layers {
		img, err := Open(paths[l], false)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		imgs[l] = img
	}
	took := time.Since(start)
	runtime.GC()
	runtime.ReadMemStats(&after)
	heap := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d layers open in %v, heap %+d KiB", layers, took, heap>>10)
	if took > 3*time.Second || heap > 100*MiB {
		t.Errorf("%d layers open in %v with %d MiB more heap; want under 3 s and 100 MiB", layers, took, heap>>20)
	}

	// What each layer holds, read through a fresh open.
	for l, img := range imgs {
		want := map[int64]bool{}
		for _, off := range writes[l] {
			want[off] = true
			got := make([]byte, 4096)
			if _, err := img.ReadAt(got, off); err != nil || !bytes.Equal(got, data(l, off)) {
				t.Errorf("layer %d at %d: %q…, %v", l, off, got[:16], err)
			}
			if n, ok, err := img.Run(off, 4096); err != nil || !ok || n != 4096 {
				t.Errorf("layer %d: Run(%d) = %d, %v, %v; want its 4096 bytes", l, off, n, ok, err)
			}
		}
		if n, ok, err := img.Run(7<<40, MiB); err != nil || ok || n != MiB {
			t.Errorf("layer %d: Run(7 TiB) = %d, %v, %v; want nothing stored", l, n, ok, err)
		}
		if a := img.AllocatedBytes(); a != int64(len(want))*MiB {
			t.Errorf("layer %d: AllocatedBytes = %d, want %d", l, a, int64(len(want))*MiB)
		}
		for _, p := range img.Check() {
			if p.Severity >= image.Warning {
				t.Errorf("layer %d: %v", l, p)
			}
		}
	}
	cached, pages := pagecache.Bitmaps.Size()
	if cached > pagecache.Budget {
		t.Errorf("the page cache holds %d bytes in %d pages, past its budget", cached, pages)
	}
}

// TestReadFileAnotherHandleGrew: a read-only handle reads the blocks a joint
// writable handle (a merge's) allocated past the end of the file the reader knew,
// without calling the entries corrupt, before and after it cached their page.
func TestReadFileAnotherHandleGrew(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.vhdx")
	if err := Create(p, CreateOptions{Type: TypeDynamic, Size: 64 * MiB, BlockSize: MiB}); err != nil {
		t.Fatal(err)
	}
	ro, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	wi, err := ro.Reopen(true)
	if err != nil {
		t.Fatal(err)
	}
	w := wi.(*Image)
	defer w.Close()
	if _, err := ro.ReadAt(make([]byte, 4096), 0); err != nil { // page 0 cached
		t.Fatal(err)
	}
	for _, off := range []int64{5 * MiB, 60 * MiB} {
		if _, err := w.WriteAt(fill(4096, 7), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Sync(); err != nil {
		t.Fatal(err)
	}
	pagecache.Bitmaps.Drop(ro.id) // as the budget may evict it
	ro.hot.Store(nil)
	for _, off := range []int64{5 * MiB, 60 * MiB} {
		got := make([]byte, 4096)
		if _, err := ro.ReadAt(got, off); err != nil || !bytes.Equal(got, fill(4096, 7)) {
			t.Errorf("ReadAt(%d) through the read-only handle: % x…, %v", off, got[:4], err)
		}
		if _, _, err := ro.Run(off, 4096); err != nil {
			t.Errorf("Run(%d): %v", off, err)
		}
	}
	for _, pr := range ro.Check() {
		if pr.Severity == image.Error {
			t.Errorf("Check: %v", pr)
		}
	}
	// A truncated file is still corrupt for the reader.
	if err := os.Truncate(p, ro.src.vsize); err != nil {
		t.Fatal(err)
	}
	pagecache.Bitmaps.Drop(ro.id)
	ro.hot.Store(nil)
	ro.grown.Store(0)
	if _, err := ro.ReadAt(make([]byte, 4096), 5*MiB); err == nil {
		t.Error("ReadAt of a block past the end of the truncated file succeeded")
	}
}
