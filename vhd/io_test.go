package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
)

// ioEnv is one image to write into, with the disk it shows kept in model.
type ioEnv struct {
	path   string
	img    *Image
	parent []byte // the parent's disk, for differencing images
	first  []byte // what sectors 0-3 hold
	model  []byte
}

const ioSize = 64 * kib

// newIOEnv makes an image of ioSize bytes whose first block holds data in sectors 0-3.
// A differencing image gets a dynamic parent full of random data, so a sector that
// wrongly shows the parent differs from what was written.
func newIOEnv(t *testing.T, typ DiskType, blockSize int64, writable bool) *ioEnv {
	t.Helper()
	dir := t.TempDir()
	r := newRand(t, uint64(typ)*1000+uint64(blockSize))
	e := &ioEnv{}
	opts := CreateOptions{Type: typ, Size: ioSize, ExactSize: true, BlockSize: blockSize}
	if typ == TypeDifferencing {
		pp := createImage(t, dir, "parent.vhd", CreateOptions{Type: TypeDynamic, Size: ioSize, ExactSize: true, BlockSize: 4 * kib})
		parent := openImage(t, pp, true)
		e.parent = randBytes(r, ioSize)
		if _, err := parent.WriteAt(e.parent, 0); err != nil {
			t.Fatal(err)
		}
		if err := parent.Close(); err != nil {
			t.Fatal(err)
		}
		e.path = createDiff(t, dir, "child.vhd", pp, blockSize)
	} else {
		e.path = createImage(t, dir, "img.vhd", opts)
	}
	img := openImage(t, e.path, true)
	e.first = randBytes(r, 4*SectorSize)
	if _, err := img.WriteAt(e.first, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	e.img = openImage(t, e.path, writable)
	e.model = view(t, e.img, e.parent)
	return e
}

func allocatedBlocks(img *Image) int64 {
	if img.BlockSize() == 0 {
		return 0
	}
	return img.AllocatedBytes() / img.BlockSize()
}

func TestWriteAt(t *testing.T) {
	zeros := func(n int) []byte { return make([]byte, n) }
	ones := func(n int) []byte { return bytes.Repeat([]byte{0xa5}, n) }
	all := []DiskType{TypeFixed, TypeDynamic, TypeDifferencing}
	tests := []struct {
		name      string
		types     []DiskType
		blockSize int64 // 0: 4 KiB
		readOnly  bool
		off       int64
		n         int
		data      func(int) []byte // default ones
		wantErr   error
		wantAlloc int64 // blocks allocated by the write
	}{
		{name: "write across a block boundary", types: all, off: 4*kib - 2*SectorSize, n: 4 * SectorSize, wantAlloc: 1},
		{name: "write a whole new block", types: all, off: 8 * kib, n: 4 * kib, wantAlloc: 1},
		{name: "write into the existing block", types: all, off: 2 * SectorSize, n: 4 * SectorSize},
		{name: "write the last sector", types: all, off: ioSize - SectorSize, n: SectorSize, wantAlloc: 1},
		{name: "write the whole disk", types: all, off: 0, n: ioSize, wantAlloc: ioSize/(4*kib) - 1},
		{name: "empty write", types: all, off: 4 * kib, n: 0},
		{name: "zeros into an unallocated dynamic block do not allocate", types: []DiskType{TypeDynamic}, off: 12 * kib, n: 4 * kib, data: zeros},
		{name: "zeros across an allocated and an unallocated dynamic block", types: []DiskType{TypeDynamic}, off: 4*kib - SectorSize, n: 2 * SectorSize, data: zeros},
		{name: "zeros into a differencing image allocate and hide the parent", types: []DiskType{TypeDifferencing}, off: 12*kib + SectorSize, n: 3 * SectorSize, data: zeros, wantAlloc: 1},
		{name: "zeros into a differencing image with 512-byte blocks", types: []DiskType{TypeDifferencing}, blockSize: 512, off: 10 * SectorSize, n: 3 * SectorSize, data: zeros, wantAlloc: 3},
		{name: "512-byte blocks: a write across many blocks", types: all, blockSize: 512, off: 3 * SectorSize, n: 10 * SectorSize, wantAlloc: 9},
		{name: "512-byte blocks: the last sector", types: all, blockSize: 512, off: ioSize - SectorSize, n: SectorSize, wantAlloc: 1},
		{name: "64 KiB block holding the whole disk", types: all, blockSize: 64 * kib, off: 5 * SectorSize, n: 7 * SectorSize},
		{name: "unaligned offset", types: all, off: 100, n: SectorSize, wantErr: ErrUnaligned},
		{name: "unaligned length", types: all, off: 0, n: 100, wantErr: ErrUnaligned},
		{name: "write past the size", types: all, off: ioSize - SectorSize, n: 2 * SectorSize, wantErr: ErrOutOfRange},
		{name: "write at the size", types: all, off: ioSize, n: SectorSize, wantErr: ErrOutOfRange},
		{name: "negative offset", types: all, off: -SectorSize, n: SectorSize, wantErr: ErrOutOfRange},
		{name: "read-only image", types: all, readOnly: true, off: 0, n: SectorSize, wantErr: ErrReadOnly},
	}
	for _, tc := range tests {
		for _, typ := range tc.types {
			t.Run(fmt.Sprintf("%s/%v", tc.name, typ), func(t *testing.T) {
				bs := tc.blockSize
				if bs == 0 {
					bs = 4 * kib
				}
				if typ == TypeFixed {
					bs = 0
				}
				e := newIOEnv(t, typ, bs, !tc.readOnly)
				data := ones
				if tc.data != nil {
					data = tc.data
				}
				p := data(tc.n)
				beforeFile := readFile(t, e.path)
				beforeAlloc := allocatedBlocks(e.img)

				n, err := e.img.WriteAt(p, tc.off)
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("WriteAt(%d bytes at %d) = %d, %v; want error %v", tc.n, tc.off, n, err, tc.wantErr)
				}
				if tc.wantErr != nil {
					if n != 0 {
						t.Errorf("failed WriteAt returned n=%d", n)
					}
					if err := e.img.Sync(); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(readFile(t, e.path), beforeFile) {
						t.Errorf("a refused write changed the file")
					}
					return
				}
				if n != tc.n {
					t.Fatalf("WriteAt returned n=%d, want %d", n, tc.n)
				}
				copy(e.model[tc.off:], p)
				if got := allocatedBlocks(e.img) - beforeAlloc; typ != TypeFixed && got != tc.wantAlloc {
					t.Errorf("write allocated %d blocks, want %d", got, tc.wantAlloc)
				}
				if tc.wantAlloc == 0 && typ != TypeFixed {
					if err := e.img.Sync(); err != nil {
						t.Fatal(err)
					}
					if got := fileSize(t, e.path); got != int64(len(beforeFile)) {
						t.Errorf("file grew from %d to %d bytes without allocating", len(beforeFile), got)
					}
				}
				if got := view(t, e.img, e.parent); !bytes.Equal(got, e.model) {
					t.Fatalf("disk after the write differs from the model at %d", firstDiff(got, e.model))
				}
				if typ == TypeDifferencing && tc.n > 0 {
					k, present, err := e.img.Run(tc.off, int64(tc.n))
					if err != nil || !present || k != int64(tc.n) {
						t.Errorf("Run over the written range = %d, %v, %v; want %d, true", k, present, err, tc.n)
					}
				}
				// Everything survives Close and a fresh open that reads bitmaps from disk.
				if err := e.img.Close(); err != nil {
					t.Fatal(err)
				}
				img := openImage(t, e.path, false)
				if got := view(t, img, e.parent); !bytes.Equal(got, e.model) {
					t.Fatalf("disk after reopening differs from the model at %d", firstDiff(got, e.model))
				}
				if ps := problems(img.Check(), Warning); len(ps) > 0 {
					t.Errorf("Check: %v", ps)
				}
			})
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

func TestReadAt(t *testing.T) {
	tests := []struct {
		name    string
		off     int64
		n       int
		wantN   int
		wantErr error
	}{
		{"read the first sector", 0, SectorSize, SectorSize, nil},
		{"unaligned read across a block boundary", 4*kib - 100, 300, 300, nil},
		{"read of an unallocated block", 20 * kib, 4 * kib, 4 * kib, nil},
		{"read past the end", ioSize - SectorSize, 2 * SectorSize, SectorSize, io.EOF},
		{"unaligned read past the end", ioSize - 7, 100, 7, io.EOF},
		{"read at the end", ioSize, 10, 0, io.EOF},
		{"read beyond the end", ioSize + 4*kib, 10, 0, io.EOF},
		{"empty read", 10, 0, 0, nil},
		{"negative offset", -1, 10, 0, ErrOutOfRange},
	}
	for _, typ := range []DiskType{TypeFixed, TypeDynamic, TypeDifferencing} {
		for _, bs := range []int64{512, 4 * kib} {
			if typ == TypeFixed {
				if bs != 512 {
					continue
				}
				bs = 0
			}
			e := newIOEnv(t, typ, bs, true)
			if _, err := e.img.WriteAt(bytes.Repeat([]byte{7}, 2*SectorSize), ioSize-2*SectorSize); err != nil {
				t.Fatal(err)
			}
			if _, err := e.img.WriteAt(bytes.Repeat([]byte{9}, 4*kib), 4*kib); err != nil {
				t.Fatal(err)
			}
			// What ReadAt returns: the file's data, bitmaps ignored, zeros elsewhere.
			stored := make([]byte, ioSize)
			copy(stored, e.first)
			copy(stored[ioSize-2*SectorSize:], bytes.Repeat([]byte{7}, 2*SectorSize))
			copy(stored[4*kib:], bytes.Repeat([]byte{9}, 4*kib))
			for _, tc := range tests {
				t.Run(fmt.Sprintf("%s/%v/%d", tc.name, typ, bs), func(t *testing.T) {
					p := bytes.Repeat([]byte{0xee}, tc.n)
					n, err := e.img.ReadAt(p, tc.off)
					if n != tc.wantN || !errors.Is(err, tc.wantErr) {
						t.Fatalf("ReadAt(%d bytes at %d) = %d, %v; want %d, %v", tc.n, tc.off, n, err, tc.wantN, tc.wantErr)
					}
					if n > 0 && !bytes.Equal(p[:n], stored[tc.off:tc.off+int64(n)]) {
						t.Errorf("ReadAt returned the wrong bytes (first difference at %d)", firstDiff(p[:n], stored[tc.off:]))
					}
				})
			}
		}
	}
}

// runModel is the answer Run should give, from a per-sector presence map: the state of
// off's sector and the length of the maximal run from off, capped at n and the size.
func runModel(present []bool, size, off, n int64) (int64, bool) {
	if off < 0 || off >= size {
		return n, false
	}
	end := min(off+n, size)
	state := present[off/SectorSize]
	pos := (off/SectorSize + 1) * SectorSize
	for pos < end && present[pos/SectorSize] == state {
		pos += SectorSize
	}
	return min(pos, end) - off, state
}

// TestRunModel writes random sector ranges into differencing images and compares Run
// with a per-sector model, before and after reopening (bitmaps from the cache, then
// from disk), for unaligned offsets and lengths.
func TestRunModel(t *testing.T) {
	for _, bs := range []int64{512, 4 * kib, 64 * kib, 2 * mib} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			const size = 4 * mib
			dir := t.TempDir()
			r := newRand(t, uint64(bs))
			pp := createImage(t, dir, "p.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true})
			cp := createDiff(t, dir, "c.vhd", pp, bs)
			img := openImage(t, cp, true)
			sectors := int64(size / SectorSize)
			present := make([]bool, sectors)
			for range 200 {
				// Mostly short runs so bitmaps get mixed bits, some long ones.
				s := r.Int64N(sectors)
				k := 1 + r.Int64N(24)
				if r.IntN(10) == 0 {
					k = 1 + r.Int64N(3*bs/SectorSize+8)
				}
				k = min(k, sectors-s)
				if _, err := img.WriteAt(make([]byte, k*SectorSize), s*SectorSize); err != nil {
					t.Fatal(err)
				}
				for i := s; i < s+k; i++ {
					present[i] = true
				}
			}
			check := func(t *testing.T, img *Image) {
				t.Helper()
				for range 3000 {
					off := r.Int64N(size + 2*kib)
					n := 1 + r.Int64N(3*bs+4*kib)
					if r.IntN(4) == 0 {
						off = off / SectorSize * SectorSize
					}
					k, p, err := img.Run(off, n)
					if err != nil {
						t.Fatal(err)
					}
					wk, wp := runModel(present, size, off, n)
					if k != wk || p != wp {
						t.Fatalf("Run(%d, %d) = %d, %v; model %d, %v", off, n, k, p, wk, wp)
					}
				}
				// A sweep of maximal runs covers the disk and alternates.
				var last *bool
				for off := int64(0); off < size; {
					k, p, err := img.Run(off, size-off)
					if err != nil {
						t.Fatal(err)
					}
					if last != nil && *last == p {
						t.Fatalf("Run at %d returned %v after a run that was %v: runs are not maximal", off, p, *last)
					}
					last = &p
					off += k
				}
			}
			check(t, img)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			check(t, openImage(t, cp, false))
		})
	}
}

// TestBitRun compares bitRun with a bit-by-bit reading of random bitmaps, including
// all-ones and all-zero bytes that take the fast path.
func TestBitRun(t *testing.T) {
	r := newRand(t, 42)
	for _, bs := range []int64{512, 4 * kib, 64 * kib} {
		sectors := bs / SectorSize
		for range 2000 {
			bm := make([]byte, bitmapBytes(uint32(bs)))
			for i := range bm {
				switch r.IntN(4) {
				case 0:
					bm[i] = 0xff
				case 1:
					bm[i] = 0
				default:
					bm[i] = byte(r.Uint32())
				}
			}
			present := make([]bool, sectors)
			for s := range present {
				present[s] = bm[s/8]&(0x80>>(s%8)) != 0
			}
			in := r.Int64N(bs)
			avail := 1 + r.Int64N(bs-in)
			k, p := bitRun(bm, in, avail)
			wk, wp := runModel(present, bs, in, avail)
			if k != wk || p != wp {
				t.Fatalf("block %d, bitmap %x: bitRun(%d, %d) = %d, %v; model %d, %v", bs, bm[:min(len(bm), 16)], in, avail, k, p, wk, wp)
			}
		}
	}
}

func TestBitmapBytes(t *testing.T) {
	tests := []struct {
		blockSize uint32
		want      int64
	}{
		{512, 512}, {1024, 512}, {4096, 512}, {2 << 20, 512}, {4 << 20, 1024}, {256 << 20, 64 << 10},
	}
	for _, tc := range tests {
		if got := bitmapBytes(tc.blockSize); got != tc.want {
			t.Errorf("bitmapBytes(%d) = %d, want %d", tc.blockSize, got, tc.want)
		}
	}
}

func TestSetBits(t *testing.T) {
	r := newRand(t, 7)
	for range 2000 {
		bm := randBytes(r, 16)
		want := make([]bool, 128)
		for s := range want {
			want[s] = bm[s/8]&(0x80>>(s%8)) != 0
		}
		s := r.Int64N(128)
		count := r.Int64N(128 - s + 1)
		changedWant := false
		for i := s; i < s+count; i++ {
			changedWant = changedWant || !want[i]
			want[i] = true
		}
		if changed := setBits(bm, s, count); changed != changedWant {
			t.Fatalf("setBits(%d, %d) reported changed=%v, want %v", s, count, changed, changedWant)
		}
		for i, w := range want {
			if got := bm[i/8]&(0x80>>(i%8)) != 0; got != w {
				t.Fatalf("after setBits(%d, %d) bit %d is %v, want %v", s, count, i, got, w)
			}
		}
	}
}

// TestConcurrentAccess reads, queries runs and describes an image while another
// goroutine allocates blocks; run it with -race.
func TestConcurrentAccess(t *testing.T) {
	for _, typ := range []DiskType{TypeDynamic, TypeDifferencing} {
		t.Run(typ.String(), func(t *testing.T) {
			e := newIOEnv(t, typ, 512, true)
			half := int64(ioSize / 2)
			want := append([]byte(nil), e.model[:half]...)
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for off := half; off < ioSize; off += SectorSize {
					if _, err := e.img.WriteAt(bytes.Repeat([]byte{byte(off)}, SectorSize), off); err != nil {
						t.Error(err)
						return
					}
					if off%(8*kib) == 0 {
						if err := e.img.Sync(); err != nil {
							t.Error(err)
							return
						}
					}
				}
			}()
			for range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, ioSize)
					for range 50 {
						if _, err := e.img.ReadAt(buf, 0); err != nil {
							t.Error(err)
							return
						}
						got := make([]byte, half)
						for off := int64(0); off < half; {
							n, present, err := e.img.Run(off, half-off)
							if err != nil {
								t.Error(err)
								return
							}
							if present {
								copy(got[off:off+n], buf[off:])
							} else if e.parent != nil {
								copy(got[off:off+n], e.parent[off:])
							}
							off += n
						}
						if !bytes.Equal(got, want) {
							t.Error("the untouched half changed while the other half was written")
							return
						}
						_, _, _ = e.img.Run(half, half)
						_ = e.img.Footer()
						_ = e.img.AllocatedBytes()
						_ = e.img.Check()
					}
				}()
			}
			wg.Wait()
		})
	}
}
