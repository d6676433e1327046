package vhd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

// fuzzSeeds makes small real images: each kind of image vhdfs creates, with data,
// Windows-style locators, a 511-byte footer and a footer that survives only as the
// copy at offset 0. They are kept to a few KiB (small blocks, packed as qemu packs
// them): minimising a new input costs an execution per byte.
func fuzzSeeds(t testing.TB) map[string][]byte {
	dir := t.TempDir()
	seeds := map[string][]byte{}
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	// create makes an image, writes a sector of data at each offset, and keeps it
	// with its blocks packed (or, if aligned, as vhdfs lays them out).
	create := func(name string, aligned bool, opts CreateOptions, writes ...int64) string {
		p := filepath.Join(dir, name)
		must(Create(p, opts))
		img, err := Open(p, true)
		must(err)
		for i, off := range writes {
			_, err := img.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, SectorSize), off)
			must(err)
		}
		must(img.Close())
		b, err := os.ReadFile(p)
		must(err)
		if !aligned {
			b = packBlocks(t, p, b)
		}
		seeds[name] = b
		return p
	}
	create("fixed", false, CreateOptions{Type: TypeFixed, Size: 2 * kib, ExactSize: true}, 0, 1*kib)
	create("dynamic-512", false, CreateOptions{Type: TypeDynamic, Size: 4 * kib, ExactSize: true, BlockSize: 512}, 0, 1024, 3584)
	create("dynamic-512-aligned", true, CreateOptions{Type: TypeDynamic, Size: 4 * kib, ExactSize: true, BlockSize: 512}, 1024)
	parent := create("dynamic-1k", false, CreateOptions{Type: TypeDynamic, Size: 4 * kib, ExactSize: true, BlockSize: 1024}, 512, 2560)
	create("dynamic-2m-empty", false, CreateOptions{Type: TypeDynamic, Size: 4 * mib, ExactSize: true})
	pimg, err := Open(parent, false)
	must(err)
	create("diff-1k", false, CreateOptions{Type: TypeDifferencing, Parent: pimg, ParentPath: parent}, 0, 3*kib)
	create("diff-2k", false, CreateOptions{Type: TypeDifferencing, Parent: pimg, ParentPath: parent, BlockSize: 2048}, 1024)
	pimg.Close()

	// Windows-style locators: W2ku before W2ru, spaces in bytes and in sectors.
	b := append([]byte(nil), seeds["diff-1k"]...)
	foot := append([]byte(nil), b[len(b)-FooterSize:]...)
	body := b[:len(b)-FooterSize]
	var h Header
	must(binary.Read(bytes.NewReader(body[FooterSize:FooterSize+HeaderSize]), binary.BigEndian, &h))
	w2ku := encodeUTF16(`C:\Users\x\dynamic-1k`, binary.LittleEndian)
	w2ru := encodeUTF16(`.\dynamic-1k`, binary.LittleEndian)
	h.ParentLocators[0] = Locator{PlatformCode: PlatformW2ku, PlatformDataSpace: 1, PlatformDataLength: uint32(len(w2ku)), PlatformDataOffset: uint64(len(body))}
	body = append(body, make([]byte, SectorSize)...)
	copy(body[len(body)-SectorSize:], w2ku)
	h.ParentLocators[1] = Locator{PlatformCode: PlatformW2ru, PlatformDataSpace: 512, PlatformDataLength: uint32(len(w2ru)), PlatformDataOffset: uint64(len(body))}
	body = append(body, make([]byte, SectorSize)...)
	copy(body[len(body)-SectorSize:], w2ru)
	h.ParentLocators[2] = Locator{PlatformCode: PlatformMacX, PlatformDataSpace: 1, PlatformDataLength: 20, PlatformDataOffset: uint64(len(body))}
	body = append(body, make([]byte, SectorSize)...)
	copy(body[len(body)-SectorSize:], "file://./dynamic-1k")
	copy(body[FooterSize:], h.Marshal())
	seeds["diff-windows-locators"] = append(body, foot...)

	short := seeds["dynamic-1k"]
	seeds["dynamic-511-footer"] = short[:len(short)-1]
	seeds["fixed-511-footer"] = seeds["fixed"][:len(seeds["fixed"])-1]
	copyOnly := append([]byte(nil), seeds["diff-1k"]...)
	copyOnly[len(copyOnly)-FooterSize+100] ^= 1
	seeds["diff-footer-copy-only"] = copyOnly

	// Regressions: each of these once panicked, opened with a negative size, or made
	// Open or ParentLocations allocate gigabytes.
	pimg, err = Open(parent, false)
	must(err)
	create("regress-diff-512-blocks", false, CreateOptions{Type: TypeDifferencing, Parent: pimg, ParentPath: parent, BlockSize: 512}, 0, 2048)
	pimg.Close()
	seeds["regress-bat-offset-top-bit"] = edited(t, seeds["dynamic-1k"], func(f *Footer, h *Header) { h.TableOffset, h.MaxTableEntries = 1<<63, 1<<30 })
	seeds["regress-header-offset-top-bit"] = edited(t, seeds["dynamic-1k"], func(f *Footer, h *Header) { f.DataOffset = 1 << 63 })
	seeds["regress-fixed-size-top-bit"] = edited(t, seeds["fixed"], func(f *Footer, h *Header) { f.CurrentSize = 1 << 63 })
	seeds["regress-dynamic-with-locator"] = edited(t, seeds["dynamic-1k"], func(f *Footer, h *Header) {
		h.ParentLocators[0] = Locator{PlatformCode: PlatformW2ru, PlatformDataLength: 0xfffffff0, PlatformDataOffset: 1 << 40}
	})
	return seeds
}

// packBlocks returns the image at path (whose bytes are b) with its blocks moved next
// to each other right after the metadata, as qemu places them, instead of at 4 KiB
// boundaries.
func packBlocks(t testing.TB, path string, b []byte) []byte {
	img, err := Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.header == nil {
		return b
	}
	out := append([]byte(nil), b[:roundUp(img.metaEnd, SectorSize)]...)
	blockLen := img.bitmapSize + img.blockSize
	for i, e := range img.bat.allocated() {
		binary.BigEndian.PutUint32(out[int64(img.header.TableOffset)+4*int64(i):], uint32(len(out)/SectorSize))
		out = append(out, b[int64(e)*SectorSize:int64(e)*SectorSize+blockLen]...)
	}
	return append(out, b[len(b)-FooterSize:]...)
}

// edited returns a copy of an image with its footers (and header, if any) changed.
func edited(t testing.TB, img []byte, edit func(*Footer, *Header)) []byte {
	b := append([]byte(nil), img...)
	var f Footer
	if err := binary.Read(bytes.NewReader(b[len(b)-FooterSize:]), binary.BigEndian, &f); err != nil {
		t.Fatal(err)
	}
	var h Header
	dynamic := f.DiskType != TypeFixed
	if dynamic {
		if err := binary.Read(bytes.NewReader(b[f.DataOffset:f.DataOffset+HeaderSize]), binary.BigEndian, &h); err != nil {
			t.Fatal(err)
		}
	}
	headerOff := f.DataOffset
	edit(&f, &h)
	copy(b[len(b)-FooterSize:], f.Marshal())
	if dynamic {
		copy(b, f.Marshal())
		copy(b[headerOff:], h.Marshal())
	}
	return b
}

// qemuSeeds adds images qemu-img makes, when it is installed.
func qemuSeeds(t testing.TB, seeds map[string][]byte) {
	qemuImg, err := exec.LookPath("qemu-img")
	if err != nil {
		return
	}
	dir := t.TempDir()
	for name, args := range map[string][]string{
		"qemu-dynamic": {"-f", "vpc", "-o", "subformat=dynamic"},
		"qemu-fixed":   {"-f", "vpc", "-o", "subformat=fixed"},
		"qemu-forced":  {"-f", "vpc", "-o", "subformat=dynamic,force_size=on"},
	} {
		p := filepath.Join(dir, name)
		if out, err := exec.Command(qemuImg, append(append([]string{"create", "-q"}, args...), p, "20k")...).CombinedOutput(); err != nil {
			t.Logf("qemu-img create %s: %v\n%s", name, err, out)
			continue
		}
		if b, err := os.ReadFile(p); err == nil {
			seeds[name] = b
		}
	}
}

// fixChecksums recomputes the checksums of the footer at the end, the copy at offset 0
// and the dynamic header the end footer points at, so that mutations reach the code
// behind the checksum checks.
func fixChecksums(b []byte) {
	fix := func(s []byte, off int) {
		binary.BigEndian.PutUint32(s[off:], 0)
		binary.BigEndian.PutUint32(s[off:], checksum(s, off))
	}
	if len(b) < FooterSize {
		return
	}
	end := b[len(b)-FooterSize:]
	fix(end, footerChecksumOff)
	if len(b) >= FooterSize+HeaderSize {
		fix(b[:FooterSize], footerChecksumOff)
	}
	if off := binary.BigEndian.Uint64(end[16:]); off <= uint64(len(b)-HeaderSize) && len(b) >= HeaderSize {
		fix(b[off:off+HeaderSize], headerChecksumOff)
	}
}

// maxFuzzRead bounds how much of an opened image the fuzz body reads.
const maxFuzzRead = 1 << 20

// FuzzOpen opens arbitrary bytes as an image. Open must fail with an error naming the
// file or return an image that Check, Run, ReadAt, ParentLocations and a write handle
// without panicking, hanging or contradicting themselves.
func FuzzOpen(f *testing.F) {
	seeds := fuzzSeeds(f)
	qemuSeeds(f, seeds)
	for _, b := range seeds {
		f.Add(b, false)
		f.Add(b, true)
	}
	// One directory per worker process and one file per input: cheaper than a
	// t.TempDir each time, and minimising runs the body many thousand times.
	dir := f.TempDir()
	var seq atomic.Int64
	f.Fuzz(func(t *testing.T, data []byte, fix bool) {
		path, data, ok := fuzzFile(t, dir, "fuzz", &seq, data, fix)
		if !ok {
			return
		}
		defer os.Remove(path)
		img, err := Open(path, false)
		if err != nil {
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		exercise(t, img)
		img.Close()
		if b, err := os.ReadFile(path); err != nil || !bytes.Equal(b, data) {
			t.Fatalf("a read-only open changed the file (%v)", err)
		}

		// A writable image accepts a write at each end and still opens afterwards.
		if img.BlockSize() > 4<<20 {
			return
		}
		wf, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		w, err := OpenFile(noSyncFile{wf}, path, true)
		if err != nil {
			wf.Close()
			if st, _ := img.FooterState(); st == FooterCopyOnly && errors.Is(err, ErrReadOnly) {
				return
			}
			t.Fatalf("opens read-only but not writable: %v", err)
		}
		for _, off := range []int64{0, w.Size() - SectorSize} {
			if _, err := w.WriteAt(bytes.Repeat([]byte{0xab}, SectorSize), off); err != nil {
				t.Fatalf("WriteAt(%d): %v", off, err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatalf("Close after writing: %v", err)
		}
		again, err := Open(path, false)
		if err != nil {
			t.Fatalf("reopen after writing: %v", err)
		}
		defer again.Close()
		for _, off := range []int64{0, again.Size() - SectorSize} {
			p := make([]byte, SectorSize)
			if _, err := again.ReadAt(p, off); err != nil {
				t.Fatalf("ReadAt(%d) after writing: %v", off, err)
			}
			if !bytes.Equal(p, bytes.Repeat([]byte{0xab}, SectorSize)) {
				t.Fatalf("sector at %d does not hold what was written", off)
			}
			if n, present, err := again.Run(off, SectorSize); err != nil || !present || n != SectorSize {
				t.Fatalf("Run(%d) after writing = %d, %v, %v", off, n, present, err)
			}
		}
		exercise(t, again)
	})
}

// noSyncFile skips fsync: durability is not what the fuzz test is after, speed is.
type noSyncFile struct{ *os.File }

func (noSyncFile) Sync() error { return nil }

// exercise reads an open image the ways a mount does, over its first blocks.
func exercise(t *testing.T, img *Image) {
	t.Helper()
	_ = img.Check()
	_ = img.AllocatedBytes()
	locs, err := img.ParentLocations()
	if err != nil && !strings.Contains(err.Error(), img.Name()) {
		t.Fatalf("ParentLocations error does not name the file: %v", err)
	}
	if img.Type() != TypeDifferencing && (locs != nil || err != nil) {
		t.Fatalf("a %v image has parent locations %q, %v", img.Type(), locs, err)
	}
	size := img.Size()
	if size <= 0 {
		t.Fatalf("opened an image of size %d", size)
	}
	limit := min(size, maxFuzzRead)
	if bs := img.BlockSize(); bs > 0 {
		limit = min(limit, 64*bs)
	}
	buf := make([]byte, limit)
	for off := int64(0); off < limit; {
		n, present, err := img.Run(off, limit-off)
		if err != nil {
			t.Fatalf("Run(%d, %d): %v", off, limit-off, err)
		}
		if n <= 0 || n > limit-off {
			t.Fatalf("Run(%d, %d) returned length %d", off, limit-off, n)
		}
		if present || img.Type() != TypeDifferencing {
			if k, err := img.ReadAt(buf[off:off+n], off); k != int(n) || err != nil {
				t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", n, off, k, err)
			}
		}
		off += n
	}
	// Unaligned reads across blocks, and the end of the disk.
	for off := int64(0); off < limit; off += 4099 {
		p := buf[:min(5000, limit-off)]
		if k, err := img.ReadAt(p, off); k != len(p) || err != nil {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", len(p), off, k, err)
		}
	}
	p := make([]byte, 2*SectorSize)
	if k, err := img.ReadAt(p, size-SectorSize); k != SectorSize || !errors.Is(err, io.EOF) {
		t.Fatalf("ReadAt past the end = %d, %v; want %d, EOF", k, err, SectorSize)
	}
}

// TestFuzzCorpusFresh checks that the seed corpus in testdata still opens (it must
// keep working without qemu-img), and rewrites it when VHDFS_WRITE_FUZZ_CORPUS=1.
func TestFuzzCorpusFresh(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	seeds := fuzzSeeds(t)
	if os.Getenv("VHDFS_WRITE_FUZZ_CORPUS") == "1" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, b := range seeds {
			content := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\nbool(false)\n", b)
			if err := os.WriteFile(filepath.Join(dir, "seed-"+name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	tmp := t.TempDir()
	for name, b := range seeds {
		if _, err := os.Stat(filepath.Join(dir, "seed-"+name)); err != nil {
			t.Errorf("seed corpus file missing (run with VHDFS_WRITE_FUZZ_CORPUS=1): %v", err)
		}
		// Real images must open, or they seed nothing past the first checks.
		if strings.HasPrefix(name, "regress-") {
			continue
		}
		p := filepath.Join(tmp, name)
		writeFile(t, p, b)
		img, err := Open(p, false)
		if err != nil {
			t.Errorf("seed %s does not open: %v", name, err)
			continue
		}
		if ps := problems(img.Check(), Error); len(ps) > 0 && name != "diff-footer-copy-only" {
			t.Errorf("seed %s: %v", name, ps)
		}
		img.Close()
	}
}

// FuzzOpenSalvage: a salvage open of any bytes either fails naming the file or reads
// (exercise) without error or panic, and never changes the file; neither does the
// raw fallback.
func FuzzOpenSalvage(f *testing.F) {
	for _, b := range fuzzSeeds(f) {
		f.Add(b, false)
		f.Add(b, true)
	}
	dir := f.TempDir()
	var seq atomic.Int64
	f.Fuzz(func(t *testing.T, data []byte, fix bool) {
		path, data, ok := fuzzFile(t, dir, "salvage", &seq, data, fix)
		if !ok {
			return
		}
		defer os.Remove(path)
		for _, open := range []func(string, bool) (*Image, error){OpenSalvage, OpenSalvageRaw} {
			img, err := open(path, false)
			if err != nil {
				if !strings.Contains(err.Error(), path) {
					t.Fatalf("error does not name the file: %v", err)
				}
				continue
			}
			exercise(t, img)
			for _, n := range img.Notes() {
				if !strings.HasPrefix(n, path+": ") {
					t.Fatalf("note does not name the file: %q", n)
				}
			}
			img.Close()
			if b, err := os.ReadFile(path); err != nil || !bytes.Equal(b, data) {
				t.Fatalf("a salvage open changed the file (%v)", err)
			}
		}
	})
}

// fuzzFile writes a fuzz input (a copy of data, its checksums fixed if fix says so) to
// a new file in dir and returns its path and the bytes written; false for an input
// over 1 MiB, which is skipped.
func fuzzFile(t *testing.T, dir, prefix string, seq *atomic.Int64, data []byte, fix bool) (string, []byte, bool) {
	if len(data) > 1<<20 {
		return "", nil, false
	}
	data = append([]byte(nil), data...)
	if fix {
		fixChecksums(data)
	}
	path := filepath.Join(dir, fmt.Sprintf("%s%d.vhd", prefix, seq.Add(1)))
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data, true
}
