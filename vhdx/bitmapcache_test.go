package vhdx

import (
	"bytes"
	"strings"
	"sync"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

// TestSliceCacheBudget: the cache stays within its budget, the clock spares a slice
// used since the hand last passed, and drop forgets one image's slices only.
func TestSliceCacheBudget(t *testing.T) {
	const n = 256
	c := newSliceCache(10 * (n + sliceOverhead))
	for i := range int64(10) {
		c.put(sliceKey{1, i}, bytes.Repeat([]byte{byte(i)}, n))
	}
	if b, s := c.size(); s != 10 || b != 10*(n+sliceOverhead) {
		t.Fatalf("size %d bytes, %d slices; want 10 slices", b, s)
	}
	if got := c.get(sliceKey{1, 0}); len(got) != n || got[0] != 0 {
		t.Fatal("slice 0 is not cached")
	}
	c.put(sliceKey{2, 0}, make([]byte, n)) // evicts one: not slice 0, just used
	if b, s := c.size(); s != 10 || b > c.budget {
		t.Fatalf("over budget: %d bytes, %d slices", b, s)
	}
	if c.get(sliceKey{1, 0}) == nil {
		t.Error("the clock evicted the slice just used")
	}
	if c.get(sliceKey{1, 1}) != nil {
		t.Error("slice 1, unused, is still cached")
	}
	c.put(sliceKey{1, 0}, bytes.Repeat([]byte{9}, n)) // replaces
	if got := c.get(sliceKey{1, 0}); got[0] != 9 {
		t.Error("put did not replace")
	}
	c.put(sliceKey{3, 0}, make([]byte, c.budget)) // larger than the budget: not kept
	if c.get(sliceKey{3, 0}) != nil {
		t.Error("a slice over the budget is cached")
	}
	c.invalidate(sliceKey{1, 5})
	if c.get(sliceKey{1, 5}) != nil {
		t.Error("invalidate left the slice")
	}
	c.drop(1)
	if _, s := c.size(); s != 1 || c.get(sliceKey{2, 0}) == nil {
		t.Errorf("drop(1) left %d slices, or dropped image 2's", s)
	}
}

// TestSliceCacheClose: closing an image forgets its slices.
func TestSliceCacheClose(t *testing.T) {
	b, _ := differencingImage(512)
	img, err := Open(writeFile(t, b.build()), false)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := img.Run(0, MiB); err != nil {
		t.Fatal(err)
	}
	if bitmapCache.get(sliceKey{img.id, 0}) == nil {
		t.Fatal("Run on a PARTIALLY_PRESENT block cached nothing")
	}
	img.Close()
	if bitmapCache.get(sliceKey{img.id, 0}) != nil {
		t.Error("Close left the image's slices cached")
	}
}

// TestRunDuringWrites: Run, ReadAt, Check, Describe and FileRun beside WriteAt into
// PARTIALLY_PRESENT blocks (for the race detector); Check finds no error in what
// the writes make, and every sector written is stored.
func TestRunDuringWrites(t *testing.T) {
	b, _ := differencingImage(512)
	img, err := Open(writeFile(t, b.build()), true)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		wg.Go(func() {
			buf := make([]byte, 64*KiB)
			for {
				select {
				case <-stop:
					return
				default:
				}
				for off := int64(0); off < img.Size(); off += 64 * KiB {
					if _, _, err := img.Run(off, 64*KiB); err != nil {
						t.Error(err)
						return
					}
					if _, err := img.ReadAt(buf, off); err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, p := range img.Check() {
				if p.Severity == image.Error || strings.Contains(p.Message, "not valid") {
					t.Errorf("Check beside writes: %v", p)
				}
			}
			_ = img.Describe()
			_, _, _, _ = img.FileRun(MiB, MiB)
		}
	})
	var written []int64
	for i := int64(0); i < 64; i++ {
		off := (i * 7919 * 512) % (8 * MiB) &^ 511
		if _, err := img.WriteAt(fill(512, byte(i)), off); err != nil {
			t.Fatal(err)
		}
		written = append(written, off)
	}
	close(stop)
	wg.Wait()
	for _, off := range written {
		if k, ok, err := img.Run(off, 512); err != nil || !ok || k != 512 {
			t.Errorf("Run(%d) after a write = %d, %v, %v", off, k, ok, err)
		}
	}
}
