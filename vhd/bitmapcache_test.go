package vhd

import (
	"path/filepath"
	"testing"

	"github.com/vhdfs/vhdfs/internal/pagecache"
)

// TestBitmapBytesBounded writes a sector into every bitmap page of 2 GiB blocks
// (128 pages of 4 KiB each): the pending bits stay under maxDirtyBitmapBytes, the
// cache under its budget, and after a reopen every written sector, and no other,
// reads as present.
func TestBitmapBytesBounded(t *testing.T) {
	const (
		blocks = 40
		bs     = 2 << 30
	)
	dir := t.TempDir()
	base := createImage(t, dir, "base.vhd", CreateOptions{Type: TypeDynamic, Size: blocks * bs, ExactSize: true, BlockSize: bs})
	diff := createDiff(t, dir, "diff.vhd", base, bs)
	img := openImage(t, diff, true)
	sector := make([]byte, SectorSize)
	written := map[int64]bool{}
	for b := int64(0); b < blocks; b++ {
		for pg := int64(0); pg < bitmapBytes(bs)/bitmapPage; pg++ {
			off := b*bs + pg*bytesPerPageData + (b+pg)%sectorsPerPage*SectorSize
			if _, err := img.WriteAt(sector, off); err != nil {
				t.Fatal(err)
			}
			written[off] = true
			if img.dirtyBytes > maxDirtyBitmapBytes {
				t.Fatalf("%d bytes of bitmap pending after a write, over %d", img.dirtyBytes, maxDirtyBitmapBytes)
			}
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	img = openImage(t, diff, false)
	for off := range written {
		// The run from the sector before: absent, then exactly one sector present.
		n, present, err := img.Run(off-SectorSize, 3*SectorSize)
		if err != nil {
			t.Fatal(err)
		}
		if off%bs == 0 {
			n, present = SectorSize, false // the sector before lies in another block
		}
		if n != SectorSize || present {
			t.Fatalf("Run(%d) = %d, %v: want %d absent bytes", off-SectorSize, n, present, SectorSize)
		}
		if n, present, err = img.Run(off, 2*SectorSize); err != nil || n != SectorSize || !present {
			t.Fatalf("Run(%d) = %d, %v, %v: want %d present bytes", off, n, present, err, SectorSize)
		}
		if got, _ := bitmapCache.Size(); got > pagecache.Budget {
			t.Fatalf("bitmap cache holds %d bytes, over %d", got, pagecache.Budget)
		}
	}
}

// BenchmarkRun asks a differencing image with 2 MiB blocks, every other 4 KiB of
// which is present, which layer holds 4 KiB at random places: the cache-hit path.
func BenchmarkRun(b *testing.B) {
	const size = 64 * mib
	dir := b.TempDir()
	base := filepath.Join(dir, "base.vhd")
	if err := Create(base, CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true}); err != nil {
		b.Fatal(err)
	}
	parent, err := Open(base, false)
	if err != nil {
		b.Fatal(err)
	}
	diff := filepath.Join(dir, "diff.vhd")
	if err := Create(diff, CreateOptions{Type: TypeDifferencing, Parent: parent, ParentPath: base}); err != nil {
		b.Fatal(err)
	}
	parent.Close()
	img, err := Open(diff, true)
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	for off := int64(0); off < size; off += 8 * kib {
		if _, err := img.WriteAt(make([]byte, 4*kib), off); err != nil {
			b.Fatal(err)
		}
	}
	if err := img.Sync(); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(4 * kib)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		off := int64(0)
		for pb.Next() {
			off = (off + 1237*4*kib) % size
			if _, _, err := img.Run(off, 4*kib); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
