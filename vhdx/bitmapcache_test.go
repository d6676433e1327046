package vhdx

import (
	"strings"
	"sync"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/pagecache"
)

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
	if pagecache.Bitmaps.Get(pagecache.Key{Image: img.id}) == nil {
		t.Fatal("Run on a PARTIALLY_PRESENT block cached nothing")
	}
	img.Close()
	if pagecache.Bitmaps.Get(pagecache.Key{Image: img.id}) != nil {
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
