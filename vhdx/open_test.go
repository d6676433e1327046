package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"
)

// model is what an image must show: the bytes ReadAt returns and, per logical
// sector, whether Run calls it stored.
type model struct {
	data   []byte
	stored []bool
	sector int64
}

// checkModel compares ReadAt over the whole disk, and Run from every sector with
// several lengths, with the model.
func checkModel(t *testing.T, img *Image, m model) {
	t.Helper()
	if img.Size() != int64(len(m.data)) {
		t.Fatalf("size %d, want %d", img.Size(), len(m.data))
	}
	got := make([]byte, len(m.data))
	if n, err := img.ReadAt(got, 0); n != len(got) || err != nil {
		t.Fatalf("ReadAt(0) = %d, %v", n, err)
	}
	if !bytes.Equal(got, m.data) {
		i := 0
		for got[i] == m.data[i] {
			i++
		}
		t.Fatalf("ReadAt: byte %d is %#x, want %#x", i, got[i], m.data[i])
	}
	// Unaligned reads across block boundaries.
	for _, off := range []int64{1, MiB - 3, 2*MiB - 511} {
		p := make([]byte, 1500)
		if _, err := img.ReadAt(p, off); err != nil && err != io.EOF {
			t.Fatal(err)
		}
		if !bytes.Equal(p, m.data[off:off+1500]) {
			t.Errorf("ReadAt(%d, 1500) differs", off)
		}
	}
	last := img.Size() / m.sector
	for s := int64(0); s < last; s++ {
		perBlock := img.BlockSize() / m.sector
		if in := s % perBlock; in > 20 && in < perBlock-20 && s%37 != 0 {
			continue // every sector near a block's edges, a sample between
		}
		for _, in := range []int64{0, m.sector / 2} {
			off := s*m.sector + in
			for _, n := range []int64{1, m.sector, 3 * MiB, img.Size()} {
				k, ok, err := img.Run(off, n)
				if err != nil {
					t.Fatalf("Run(%d, %d): %v", off, n, err)
				}
				if k <= 0 || k > n || off+k > img.Size() {
					t.Fatalf("Run(%d, %d) = %d", off, n, k)
				}
				if off+k < img.Size() && k < n && (off+k)%m.sector != 0 {
					t.Fatalf("Run(%d, %d) = %d: does not end on a sector boundary", off, n, k)
				}
				for o := off; o < off+k; o += m.sector - o%m.sector {
					if m.stored[o/m.sector] != ok {
						t.Fatalf("Run(%d, %d) = %d, %v, but sector %d is %v", off, n, k, ok, o/m.sector, m.stored[o/m.sector])
					}
				}
			}
		}
	}
}

// differencingImage builds a differencing image with every payload state, on
// logical sectors of ss bytes, and the model of what it must show.
func differencingImage(ss uint32) (*builder, model) {
	const size = 8 * MiB
	b := newBuilder(size, 1*MiB)
	b.logical, b.parent = ss, true
	sector := int64(ss)
	bs := int64(b.blockSize)
	b.locator = []KeyValue{
		{"parent_linkage", "{" + NewGUID().String() + "}"},
		{"parent_linkage2", "{00000000-0000-0000-0000-000000000000}"},
		{"relative_path", `..\base\parent.vhdx`},
		{"volume_path", `\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\base\parent.vhdx`},
		{"absolute_win32_path", `C:\base\parent.vhdx`},
	}
	m := model{data: make([]byte, size), stored: make([]bool, size/sector), sector: sector}
	perBlock := bs / sector
	set := func(p int64, secs ...int64) {
		b.bits[p] = append(b.bits[p], secs...)
		for _, s := range secs {
			m.stored[p*perBlock+s] = true
		}
	}
	present := func(p int64, st BlockState, seed byte) {
		b.states[p] = st
		b.data[p] = pattern(bs, seed)
		copy(m.data[p*bs:], b.data[p])
	}
	// 0: PARTIALLY_PRESENT, bits for a few sectors (LSB first); ReadAt shows the whole
	// block, Run only the sectors whose bit is set.
	present(0, PartiallyPresent, 1)
	set(0, 0, 1, 2, 3, 4, 5, 6, 7, 9, 16, perBlock-1)
	// 1: FULLY_PRESENT with a bitmap that says nothing: the bitmap is not consulted.
	present(1, FullyPresent, 2)
	for s := int64(0); s < perBlock; s++ {
		m.stored[perBlock+s] = true
	}
	// 2, 3, 4: ZERO, UNMAPPED, UNDEFINED read as zeros from this file.
	// 7: UNMAPPED as the 0.95 draft wrote it (5).
	for _, p := range []int64{2, 3, 4, 7} {
		for s := int64(0); s < perBlock; s++ {
			m.stored[p*perBlock+s] = true
		}
	}
	b.states[2], b.states[3], b.states[4], b.states[7] = Zero, Unmapped, Undefined, unmappedDraft
	// 5: NOT_PRESENT, from the parent. 6: PARTIALLY_PRESENT, last sector only, and bits
	// set for block 5, which must not count.
	present(6, PartiallyPresent, 3)
	set(6, perBlock-1)
	b.bits[5] = []int64{0, 1, 2}
	return b, m
}

func TestDifferencing(t *testing.T) {
	for _, ss := range []uint32{512, 4096} {
		t.Run(fmt.Sprintf("logical-%d", ss), func(t *testing.T) {
			b, m := differencingImage(ss)
			p := writeFile(t, b.build())
			img, err := Open(p, false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if !img.HasParent() || img.Type() != TypeDifferencing || img.LogicalSectorSize() != int64(ss) || img.PhysicalSectorSize() != 4096 {
				t.Fatalf("parent %v type %v logical %d physical %d", img.HasParent(), img.Type(), img.LogicalSectorSize(), img.PhysicalSectorSize())
			}
			if img.DataWriteGuid() != b.dataWrite || img.FileWriteGuid() != b.fileWrite {
				t.Error("write GUIDs are not those of the current header")
			}
			loc := img.ParentLocator()
			for _, kv := range b.locator {
				if loc[kv.Key] != kv.Value {
					t.Errorf("locator %s = %q, want %q", kv.Key, loc[kv.Key], kv.Value)
				}
			}
			if len(loc) != len(b.locator) {
				t.Errorf("locator has %d keys, want %d", len(loc), len(b.locator))
			}
			checkModel(t, img, m)
		})
	}
}

func TestDynamic4KSectors(t *testing.T) {
	b := newBuilder(6*MiB+8192, 2*MiB)
	b.logical = 4096
	m := model{data: make([]byte, b.size), stored: make([]bool, b.size/4096), sector: 4096}
	for _, p := range []int64{1, 3} {
		b.states[p] = FullyPresent
		b.data[p] = pattern(int64(b.blockSize), byte(p))
		copy(m.data[p*int64(b.blockSize):], b.data[p])
		for s := p * 512; s < min((p+1)*512, int64(len(m.stored))); s++ {
			m.stored[s] = true
		}
	}
	b.states[2] = Zero // a hole in an image without a parent
	img, err := Open(writeFile(t, b.build()), false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Type() != TypeDynamic || img.LogicalSectorSize() != 4096 {
		t.Fatalf("type %v, logical %d", img.Type(), img.LogicalSectorSize())
	}
	checkModel(t, img, m)
	// Reads at and past the end.
	p := make([]byte, 10000)
	if n, err := img.ReadAt(p, b.size-4096); n != 4096 || err != io.EOF {
		t.Errorf("ReadAt across the end = %d, %v", n, err)
	}
	if n, err := img.ReadAt(p, b.size); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at the end = %d, %v", n, err)
	}
	if _, err := img.ReadAt(p, -1); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("ReadAt(-1) = %v", err)
	}
	if n, ok, _ := img.Run(b.size, 100); ok || n != 100 {
		t.Errorf("Run past the end = %d, %v", n, ok)
	}
}

// TestHeaderChoice: the current header is the valid one with the higher sequence
// number, wherever it is.
func TestHeaderChoice(t *testing.T) {
	for _, tc := range []struct {
		name       string
		seq1, seq2 uint64
		slot       int64
	}{
		{"second newer", 1, 2, header2Off},
		{"first newer", 7, 3, header1Off},
		{"equal and identical", 4, 4, header1Off},
		{"only the second", 0, 9, header2Off},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBuilder(4*MiB, MiB)
			b.seq1, b.seq2 = tc.seq1, tc.seq2
			img, err := Open(writeFile(t, b.build()), false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if img.headerSlot != tc.slot {
				t.Errorf("header at %d, want %d", img.headerSlot, tc.slot)
			}
		})
	}
}
