package vhdx

import (
	"testing"
)

// benchImage opens a 64 MiB differencing image with 2 MiB PARTIALLY_PRESENT blocks
// whose bits alternate every `every` sectors.
func benchImage(b *testing.B, every int64) *Image {
	b.Helper()
	bl := newBuilder(64*MiB, 2*MiB)
	bl.parent = true
	bl.locator = []KeyValue{{"parent_linkage", "{" + NewGUID().String() + "}"}, {"relative_path", "p.vhdx"}}
	for p := int64(0); p < 32; p++ {
		bl.states[p] = PartiallyPresent
		for s := int64(0); s < 2*MiB/512; s++ {
			if s/every%2 == 0 {
				bl.bits[p] = append(bl.bits[p], s)
			}
		}
	}
	p := writeFile(b, bl.build())
	img, err := Open(p, false)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { img.Close() })
	return img
}

// BenchmarkRun walks the disk as a chain does, 128 KiB at a time, asking Run for each
// run of stored or not stored sectors.
func BenchmarkRun(b *testing.B) {
	for _, bc := range []struct {
		name  string
		every int64
	}{{"runs of 4 KiB", 8}, {"runs of 64 KiB", 128}, {"runs of 1 MiB", 2048}} {
		b.Run(bc.name, func(b *testing.B) {
			img := benchImage(b, bc.every)
			b.SetBytes(img.Size())
			b.ResetTimer()
			for range b.N {
				for off := int64(0); off < img.Size(); {
					k, _, err := img.Run(off, 128*KiB)
					if err != nil {
						b.Fatal(err)
					}
					off += k
				}
			}
		})
	}
}

// BenchmarkReadPartial reads the stored runs of the disk as a chain does: Run, then
// ReadAt of each stored run, 128 KiB at a time.
func BenchmarkReadPartial(b *testing.B) {
	for _, bc := range []struct {
		name  string
		every int64
	}{{"runs of 4 KiB", 8}, {"runs of 64 KiB", 128}} {
		b.Run(bc.name, func(b *testing.B) {
			img := benchImage(b, bc.every)
			buf := make([]byte, 128*KiB)
			b.SetBytes(img.Size())
			b.ResetTimer()
			for range b.N {
				for off := int64(0); off < img.Size(); {
					k, present, err := img.Run(off, 128*KiB)
					if err != nil {
						b.Fatal(err)
					}
					if present {
						if _, err := img.ReadAt(buf[:k], off); err != nil {
							b.Fatal(err)
						}
					}
					off += k
				}
			}
		})
	}
}
