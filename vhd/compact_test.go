package vhd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
)

// compactFixture builds, in dir, an image of blocks blocks of bs bytes with data in
// every block, then zeros over every block listed in zeroed; for a differencing
// image over a parent holding data in its first half. It returns the image's path,
// the parent's path ("" for none), the view (the model) and the parent's bytes.
func compactFixture(t *testing.T, dir string, typ DiskType, bs int64, blocks int, zeroed func(b int) bool) (string, string, []byte, []byte) {
	t.Helper()
	r := newRand(t, uint64(bs)+uint64(typ))
	size := int64(blocks) * bs
	var pp string
	var parent []byte
	var p string
	if typ == TypeDifferencing {
		pp = createImage(t, dir, "parent.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: bs})
		pimg := openImage(t, pp, true)
		parent = make([]byte, size)
		copy(parent, randBytes(r, int(size/2)))
		if _, err := pimg.WriteAt(parent, 0); err != nil {
			t.Fatal(err)
		}
		if err := pimg.Close(); err != nil {
			t.Fatal(err)
		}
		p = createDiff(t, dir, "top.vhd", pp, bs)
	} else {
		p = createImage(t, dir, "top.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: bs})
	}
	img := openImage(t, p, true)
	model := randBytes(r, int(size))
	if _, err := img.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Sync(); err != nil {
		t.Fatal(err)
	}
	for b := range blocks {
		if zeroed(b) {
			z := make([]byte, bs)
			if _, err := img.WriteAt(z, int64(b)*bs); err != nil {
				t.Fatal(err)
			}
			copy(model[int64(b)*bs:], z)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return p, pp, model, parent
}

// belowOf answers image.CompactOptions.BelowZero from the parent's bytes.
func belowOf(parent []byte) func(off, n int64) (bool, error) {
	if parent == nil {
		return nil
	}
	return func(off, n int64) (bool, error) {
		if off >= int64(len(parent)) {
			return true, nil
		}
		return fileio.AllZero(parent[off:min(off+n, int64(len(parent)))]), nil
	}
}

func TestCompact(t *testing.T) {
	for _, tc := range []struct {
		name   string
		typ    DiskType
		bs     int64
		blocks int
		zeroed func(b int) bool
		// wantDropped counts the blocks Compact must drop.
		wantDropped, wantKept int
	}{
		{"dynamic, every other block zeroed", TypeDynamic, 64 * kib, 40, func(b int) bool { return b%2 == 1 }, 20, 0},
		{"dynamic, the first half zeroed", TypeDynamic, 64 * kib, 40, func(b int) bool { return b < 20 }, 20, 0},
		{"dynamic, 2 MiB blocks, the last blocks zeroed", TypeDynamic, 2 * mib, 8, func(b int) bool { return b >= 5 }, 3, 0},
		{"dynamic, 512-byte blocks", TypeDynamic, 512, 64, func(b int) bool { return b%3 != 0 }, 42, 0},
		{"differencing: zeros over parent data kept, over parent zeros dropped", TypeDifferencing, 64 * kib, 40, func(b int) bool { return b%2 == 1 }, 10, 10},
		{"nothing zeroed", TypeDynamic, 64 * kib, 16, func(int) bool { return false }, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p, _, model, parent := compactFixture(t, dir, tc.typ, tc.bs, tc.blocks, tc.zeroed)
			before := fileSize(t, p)
			img := openImage(t, p, false)
			dry, err := img.Compact(context.Background(), image.CompactOptions{DryRun: true, BelowZero: belowOf(parent)})
			if err != nil {
				t.Fatal(err)
			}
			img.Close()
			if got := fileSize(t, p); got != before {
				t.Fatalf("dry run changed the size %d -> %d", before, got)
			}
			img = openImage(t, p, true)
			res, err := img.Compact(context.Background(), image.CompactOptions{BelowZero: belowOf(parent)})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			if res != dry {
				t.Fatalf("dry run said %+v, the run did %+v", dry, res)
			}
			if res.Dropped != tc.wantDropped || res.Kept != tc.wantKept {
				t.Fatalf("dropped %d, kept %d; want %d, %d", res.Dropped, res.Kept, tc.wantDropped, tc.wantKept)
			}
			after := fileSize(t, p)
			if after != res.NewSize || before != res.OldSize {
				t.Fatalf("file %d -> %d bytes, result says %d -> %d", before, after, res.OldSize, res.NewSize)
			}
			img = openImage(t, p, false)
			live := int64(res.Blocks-res.Dropped) * (img.bitmapSize + img.blockSize)
			// Data blocks 4 KiB-aligned: up to 4 KiB of padding each.
			if limit := img.metaEnd + live + live/10 + int64(res.Blocks-res.Dropped)*dataAlign + dataAlign + FooterSize; after > limit {
				t.Fatalf("file is %d bytes, want at most %d (%d live blocks)", after, limit, res.Blocks-res.Dropped)
			}
			if st, why := img.FooterState(); st != FooterAtEnd {
				t.Fatalf("footer state %v (%v)", st, why)
			}
			if ps := problems(img.Check(), Warning); len(ps) > 0 {
				t.Fatalf("Check: %v", ps)
			}
			if got := view(t, img, parent); !bytes.Equal(got, model) {
				t.Fatal("the view changed")
			}
			// The image takes writes afterwards, new blocks past the new end.
			img.Close()
			img = openImage(t, p, true)
			w := bytes.Repeat([]byte{0xa5}, int(tc.bs))
			if _, err := img.WriteAt(w, 0); err != nil {
				t.Fatal(err)
			}
			copy(model, w)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			img = openImage(t, p, false)
			if got := view(t, img, parent); !bytes.Equal(got, model) {
				t.Fatal("the view after a write changed")
			}
			if ps := problems(img.Check(), Error); len(ps) > 0 {
				t.Fatalf("Check after a write: %v", ps)
			}
		})
	}
}

// TestCompactPartial: a differencing block with only some sectors present, all of
// them zeros, is dropped over parent zeros and kept over parent data, whatever its
// other sectors hold on disk.
func TestCompactPartial(t *testing.T) {
	const bs, blocks = 64 * kib, 8
	dir := t.TempDir()
	size := int64(bs * blocks)
	pp := createImage(t, dir, "parent.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: bs})
	parent := make([]byte, size)
	copy(parent[bs:2*bs], bytes.Repeat([]byte{7}, bs)) // block 1 has parent data
	pimg := openImage(t, pp, true)
	if _, err := pimg.WriteAt(parent, 0); err != nil {
		t.Fatal(err)
	}
	pimg.Close()
	p := createDiff(t, dir, "top.vhd", pp, bs)
	img := openImage(t, p, true)
	z := make([]byte, 4*kib)
	for _, b := range []int64{1, 2, 3} {
		if _, err := img.WriteAt(z, b*bs+8*kib); err != nil { // zeros in part of blocks 1-3
			t.Fatal(err)
		}
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{9}, 4*kib), 3*bs+32*kib); err != nil { // and data in block 3
		t.Fatal(err)
	}
	img.Close()
	img = openImage(t, pp, false)
	img.Close()
	img = openImage(t, p, false)
	model := view(t, img, parent)
	img.Close()
	img = openImage(t, p, true)
	res, err := img.Compact(context.Background(), image.CompactOptions{BelowZero: belowOf(parent)})
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
	if res.Blocks != 3 || res.Dropped != 1 || res.Kept != 1 {
		t.Fatalf("result %+v: want 3 blocks, 1 dropped (block 2), 1 kept (block 1)", res)
	}
	img = openImage(t, p, false)
	if got := view(t, img, parent); !bytes.Equal(got, model) {
		t.Fatal("the view changed")
	}
	if ps := problems(img.Check(), Error); len(ps) > 0 {
		t.Fatalf("Check: %v", ps)
	}
}

func TestCompactRefuses(t *testing.T) {
	dir := t.TempDir()
	p := createImage(t, dir, "fixed.vhd", CreateOptions{Type: TypeFixed, Size: mib, ExactSize: true})
	img := openImage(t, p, true)
	if _, err := img.Compact(context.Background(), image.CompactOptions{}); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("fixed: %v, want ErrUnsupported", err)
	}
	// A blktap image with a batmap after the BAT.
	p = createImage(t, dir, "tap.vhd", CreateOptions{Type: TypeDynamic, Size: mib, ExactSize: true})
	img = openImage(t, p, true)
	if _, err := img.WriteAt(bytes.Repeat([]byte{1}, SectorSize), 0); err != nil { // the footer moves past the block
		t.Fatal(err)
	}
	h, _ := img.Header()
	img.Close()
	editFooter(t, p, func(f *Footer) { copy(f.CreatorApp[:], "tap\x00") })
	patchAt(t, p, int64(h.TableOffset)+roundUp(int64(h.MaxTableEntries)*4, SectorSize), []byte("tdbatmap"))
	img = openImage(t, p, true)
	if _, err := img.Compact(context.Background(), image.CompactOptions{}); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("batmap: %v, want ErrUnsupported", err)
	}
	p = createImage(t, dir, "dyn.vhd", CreateOptions{Type: TypeDynamic, Size: mib, ExactSize: true})
	img = openImage(t, p, false)
	if _, err := img.Compact(context.Background(), image.CompactOptions{}); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("read-only: %v, want ErrReadOnly", err)
	}
}

// TestCompactCrash cuts Compact after every write, fsync and truncate (stepFile):
// after each cut the image opens with its footer at the end, Check finds no error,
// and the view is the model; the first budget that lets it complete gives the
// compacted file.
func TestCompactCrash(t *testing.T) {
	// Moves in batches of two: cuts fall between batches too.
	defer func(n int) { compactBatch = n }(compactBatch)
	compactBatch = 2
	for _, tc := range []struct {
		name string
		typ  DiskType
		bs   int64
	}{
		{"dynamic", TypeDynamic, 4 * kib},
		{"dynamic 512", TypeDynamic, 512},
		{"differencing", TypeDifferencing, 4 * kib},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			template, _, model, parent := compactFixture(t, dir, tc.typ, tc.bs, 24, func(b int) bool { return b%3 != 1 || b < 4 })
			scrubGaps(t, template)
			oldSum := sha256.Sum256(readFile(t, template))
			work := filepath.Join(dir, "work.vhd")
			for k := 0; ; k++ {
				if k > 10000 {
					t.Fatal("compact never completed")
				}
				copyFile(t, template, work)
				f, err := os.OpenFile(work, os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				ff := &stepFile{File: f, left: k}
				img, err := OpenFile(ff, work, true)
				if err != nil {
					t.Fatalf("k=%d: OpenFile: %v", k, err)
				}
				res, cerr := img.Compact(context.Background(), image.CompactOptions{BelowZero: belowOf(parent)})
				closeErr := img.Close()
				if cerr != nil && !errors.Is(cerr, errInjected) || closeErr != nil && !errors.Is(closeErr, errInjected) {
					t.Fatalf("k=%d: unexpected error: %v, %v", k, cerr, closeErr)
				}
				if ff.failed != (cerr != nil || closeErr != nil) {
					t.Fatalf("k=%d: a step was refused (%v) but the errors were %v, %v", k, ff.failed, cerr, closeErr)
				}
				after, err := Open(work, false)
				if err != nil {
					t.Fatalf("k=%d: reopen after the cut: %v", k, err)
				}
				if st, why := after.FooterState(); st != FooterAtEnd {
					t.Fatalf("k=%d: FooterState = %v (%v), want FooterAtEnd", k, st, why)
				}
				if ps := problems(after.Check(), Error); len(ps) > 0 {
					t.Fatalf("k=%d: Check: %v", k, ps)
				}
				if got := view(t, after, parent); !bytes.Equal(got, model) {
					t.Fatalf("k=%d: the view changed", k)
				}
				after.Close()
				if k == 0 && sha256.Sum256(readFile(t, work)) != oldSum {
					t.Fatal("k=0: the file changed without a write")
				}
				if !ff.failed {
					if res.Dropped == 0 || res.Moved == 0 || fileSize(t, work) >= fileSize(t, template) {
						t.Fatalf("completed with %+v: the fixture must drop, move and shrink", res)
					}
					t.Logf("compact completed after %d steps (%+v); every earlier cut was safe", k, res)
					break
				}
			}
		})
	}
}

// scrubGaps overwrites the 512 bytes after every block with 0xCC where no block or
// footer is: each allocation leaves a valid footer there (allocateLocked), which
// would make a file cut right after a block valid by chance.
func scrubGaps(t *testing.T, p string) {
	t.Helper()
	img := openImage(t, p, false)
	var offs []int64
	blockLen := img.bitmapSize + img.blockSize
	for _, e := range img.bat.allocated() {
		off := int64(e)*SectorSize + blockLen
		free := off+FooterSize <= img.footerOff
		for _, o := range img.bat.allocated() {
			free = free && !overlaps(off, FooterSize, int64(o)*SectorSize, blockLen)
		}
		if free {
			offs = append(offs, off)
		}
	}
	img.Close()
	junk := bytes.Repeat([]byte{0xcc}, FooterSize)
	for _, off := range offs {
		patchAt(t, p, off, junk)
	}
}

// stepFile lets the first left writes, fsyncs and truncates through and refuses every
// later one: unlike failFile, a cut can fall between any two of them (between the
// footer's fsync and the truncate, say).
type stepFile struct {
	*os.File
	left   int
	failed bool
}

func (f *stepFile) step() error {
	if f.left <= 0 {
		f.failed = true
		return errInjected
	}
	f.left--
	return nil
}

func (f *stepFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.step(); err != nil {
		return 0, err
	}
	return f.File.WriteAt(p, off)
}

func (f *stepFile) Sync() error {
	if err := f.step(); err != nil {
		return err
	}
	return f.File.Sync()
}

func (f *stepFile) Truncate(n int64) error {
	if err := f.step(); err != nil {
		return err
	}
	return f.File.Truncate(n)
}

// TestCompactFit: a moved block's data is 4 KiB-aligned unless that would leave a
// hole room for fewer blocks.
func TestCompactFit(t *testing.T) {
	img := &Image{bitmapSize: 512, blockSize: 2 * mib}
	n := img.bitmapSize + img.blockSize
	for _, tc := range []struct {
		name             string
		start, end, want int64
		ok               bool
	}{
		{"aligned already", 3584, 3584 + n, 3584, true},
		{"room to align", 1024, 1024 + n + 4096, 3584, true},
		{"no room to align", 1024, 1024 + n, 1024, true},
		{"two packed slots keep two blocks", 1024, 1024 + 2*n, 1024, true},
		{"too small", 1024, 1024 + n - 512, 1024, false},
		{"unaligned start rounds to a sector", 1000, 1024 + n, 1024, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := img.fit(tc.start, tc.end, n)
			if got != tc.want || ok != tc.ok {
				t.Fatalf("fit(%d, %d) = %d, %v; want %d, %v", tc.start, tc.end, got, ok, tc.want, tc.ok)
			}
		})
	}
}

// TestCompactLastBlock: the last block of a disk that is not a whole number of
// blocks is dropped when the part inside the disk reads zeros, whatever the file
// holds past the disk's end.
func TestCompactLastBlock(t *testing.T) {
	const bs = 64 * kib
	dir := t.TempDir()
	size := int64(3*bs + bs/2)
	p := createImage(t, dir, "odd.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: bs})
	img := openImage(t, p, true)
	if _, err := img.WriteAt(bytes.Repeat([]byte{3}, int(size)), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(make([]byte, bs/2), 3*bs); err != nil {
		t.Fatal(err)
	}
	e := img.bat.get(3)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	// Junk in the last block past the disk's end.
	patchAt(t, p, int64(e)*SectorSize+SectorSize+bs/2, []byte("junk past the end"))
	img = openImage(t, p, true)
	res, err := img.Compact(context.Background(), image.CompactOptions{})
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
	if res.Dropped != 1 || res.Blocks != 4 {
		t.Fatalf("%+v: want the last of 4 blocks dropped", res)
	}
	img = openImage(t, p, false)
	want := append(bytes.Repeat([]byte{3}, 3*bs), make([]byte, bs/2)...)
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatal("the view changed")
	}
}
