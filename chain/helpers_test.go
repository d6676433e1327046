package chain

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"unicode/utf16"

	"github.com/vhdfs/vhdfs/vhd"
)

const (
	kib = 1 << 10
	mib = 1 << 20
)

func newRand(t *testing.T, seed uint64) *rand.Rand {
	t.Helper()
	t.Logf("random seed %d", seed)
	return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, (n+7)/8*8)
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b[:n]
}

// createBase creates a fixed or dynamic image of exactly size bytes.
func createBase(t *testing.T, dir, name string, typ vhd.DiskType, size, blockSize int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := vhd.Create(p, vhd.CreateOptions{Type: typ, Size: size, ExactSize: true, BlockSize: blockSize}); err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return p
}

// createChild creates an empty differencing image on parentPath.
func createChild(t *testing.T, dir, name, parentPath string, blockSize int64) string {
	t.Helper()
	parent, err := vhd.Open(parentPath, false)
	if err != nil {
		t.Fatal(err)
	}
	defer parent.Close()
	p := filepath.Join(dir, name)
	if err := vhd.Create(p, vhd.CreateOptions{Type: vhd.TypeDifferencing, Parent: parent, ParentPath: parentPath, BlockSize: blockSize}); err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return p
}

// reparent points the differencing image at childPath at parentPath (vhd.SetParent).
func reparent(t *testing.T, childPath, parentPath string) {
	t.Helper()
	parent, err := vhd.Open(parentPath, false)
	if err != nil {
		t.Fatal(err)
	}
	id := parent.Footer().UniqueID
	parent.Close()
	child, err := vhd.Open(childPath, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := child.SetParent(id, parentPath, childPath); err != nil {
		t.Fatalf("SetParent(%s, %s): %v", childPath, parentPath, err)
	}
	if err := child.Close(); err != nil {
		t.Fatal(err)
	}
}

// createSizedChild creates an empty differencing image of size bytes on parentPath,
// whatever the parent's size: it is made on a scratch dynamic image of that size and
// then pointed at the real parent.
func createSizedChild(t *testing.T, dir, name, parentPath string, size, blockSize int64) string {
	t.Helper()
	donor := createBase(t, dir, name+".donor", vhd.TypeDynamic, size, blockSize)
	p := createChild(t, dir, name, donor, blockSize)
	reparent(t, p, parentPath)
	if err := os.Remove(donor); err != nil {
		t.Fatal(err)
	}
	return p
}

func openChain(t *testing.T, path string, writable bool) *Chain {
	t.Helper()
	c, err := Open(path, writable)
	if err != nil {
		t.Fatalf("chain.Open(%s, %v): %v", path, writable, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func closeChain(t *testing.T, c *Chain) {
	t.Helper()
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// randomWrite picks a write for a disk of size bytes with blocks of bs bytes: whole
// sectors, unaligned ranges, ranges across a block boundary, or a few bytes.
func randomWrite(r *rand.Rand, size, bs int64) (off, n int64) {
	switch r.IntN(4) {
	case 0:
		off = r.Int64N(size/vhd.SectorSize) * vhd.SectorSize
		n = (1 + r.Int64N(3*bs/vhd.SectorSize+4)) * vhd.SectorSize
	case 1:
		off = r.Int64N(size)
		n = 1 + r.Int64N(2*bs+3000)
	case 2:
		if blocks := size / bs; blocks > 1 {
			off = (1+r.Int64N(blocks-1))*bs - 1 - r.Int64N(min(bs, 1500))
		} else {
			off = r.Int64N(size)
		}
		n = 2 + r.Int64N(3000)
	default:
		off = r.Int64N(size)
		n = 1 + r.Int64N(40)
	}
	return off, min(n, size-off)
}

// writeRandom makes count random writes through c and applies them to model. A fifth
// of them write zeros.
func writeRandom(t *testing.T, r *rand.Rand, c *Chain, model []byte, count int, bs int64) {
	t.Helper()
	for range count {
		off, n := randomWrite(r, int64(len(model)), bs)
		p := make([]byte, n)
		if r.IntN(5) != 0 {
			p = randBytes(r, int(n))
		}
		k, err := c.WriteAt(p, off)
		if err != nil || k != len(p) {
			t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", n, off, k, err)
		}
		copy(model[off:], p)
	}
}

// checkReads compares the view of c from depth down with model: whole, random ranges
// (unaligned, across blocks, past the end), and where Run says no layer stores a byte
// it must read as zero.
func checkReads(t *testing.T, r *rand.Rand, c *Chain, depth int, model []byte) {
	t.Helper()
	size := int64(len(model))
	if got := c.SizeAt(depth); got != size {
		t.Fatalf("depth %d: SizeAt = %d, want %d", depth, got, size)
	}
	whole := make([]byte, size)
	if n, err := c.ReadAtDepth(whole, 0, depth); n != len(whole) || err != nil {
		t.Fatalf("depth %d: whole read = %d, %v", depth, n, err)
	}
	if !bytes.Equal(whole, model) {
		t.Fatalf("depth %d: whole disk differs from the model at %d", depth, firstDiff(whole, model))
	}
	for range 200 {
		off := r.Int64N(size + 1024)
		n := 1 + r.Int64N(256*kib)
		p := make([]byte, n)
		k, err := c.ReadAtDepth(p, off, depth)
		want := max(min(n, size-off), 0)
		if int64(k) != want {
			t.Fatalf("depth %d: ReadAtDepth(%d bytes at %d) = %d, want %d", depth, n, off, k, want)
		}
		if (want < n) != errors.Is(err, io.EOF) || err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("depth %d: ReadAtDepth(%d bytes at %d) error %v", depth, n, off, err)
		}
		if k > 0 && !bytes.Equal(p[:k], model[off:off+int64(k)]) {
			t.Fatalf("depth %d: ReadAtDepth(%d bytes at %d) differs from the model at +%d", depth, n, off, firstDiff(p[:k], model[off:]))
		}
		checkFileRuns(t, c, depth, model, off, n)
	}
	checkFileRuns(t, c, depth, model, 0, size)
	for off := int64(0); off < size; {
		n, present, err := c.Run(depth, off, size-off)
		if err != nil || n <= 0 {
			t.Fatalf("depth %d: Run(%d) = %d, %v", depth, off, n, err)
		}
		if !present {
			for i := off; i < off+n; i++ {
				if model[i] != 0 {
					t.Fatalf("depth %d: Run says no layer stores [%d, %d) but byte %d is %#x", depth, off, off+n, i, model[i])
				}
			}
		}
		off += n
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

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func patchAt(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// editFooter rewrites both footers of a dynamic or differencing image with a fresh
// checksum (vhd.Footer.Marshal).
func editFooter(t *testing.T, path string, edit func(*vhd.Footer)) {
	t.Helper()
	img, err := vhd.Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	f := img.Footer()
	img.Close()
	edit(&f)
	b := f.Marshal()
	patchAt(t, path, 0, b)
	patchAt(t, path, int64(len(readFile(t, path)))-vhd.FooterSize, b)
}

// locator is one parent locator for setLocators.
type locator struct {
	code uint32
	data []byte
}

func utf16LE(s string) []byte {
	var b []byte
	for _, c := range utf16.Encode([]rune(s)) {
		b = binary.LittleEndian.AppendUint16(b, c)
	}
	return b
}

func utf16BE(s string) []byte {
	var b []byte
	for _, c := range utf16.Encode([]rune(s)) {
		b = binary.BigEndian.AppendUint16(b, c)
	}
	return b
}

// setLocators replaces the parent locators and the parent name of a differencing
// image: the data goes before the end footer, a sector each, and the header is
// rewritten with a fresh checksum. Slots follow the order of locs.
func setLocators(t *testing.T, path string, name string, locs []locator) {
	t.Helper()
	img, err := vhd.Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	h, _ := img.Header()
	headerOff := int64(img.Footer().DataOffset)
	img.Close()
	b := readFile(t, path)
	foot := append([]byte(nil), b[len(b)-vhd.FooterSize:]...)
	body := b[:len(b)-vhd.FooterSize]
	h.ParentLocators = [8]vhd.Locator{}
	for i, l := range locs {
		h.ParentLocators[i] = vhd.Locator{PlatformCode: l.code, PlatformDataSpace: vhd.SectorSize, PlatformDataLength: uint32(len(l.data)), PlatformDataOffset: uint64(len(body))}
		chunk := make([]byte, vhd.SectorSize)
		copy(chunk, l.data)
		body = append(body, chunk...)
	}
	h.ParentUnicodeName = [512]byte{}
	copy(h.ParentUnicodeName[:], utf16BE(name))
	copy(body[headerOff:], h.Marshal())
	writeFile(t, path, append(body, foot...))
}

// checkFileRuns compares the pieces FileRuns gives for [off, off+n) of the view from
// depth down, read from their files, with model.
func checkFileRuns(t *testing.T, c *Chain, depth int, model []byte, off, n int64) {
	t.Helper()
	size := int64(len(model))
	var l *Layer // the whole chain: nil
	if depth > 0 {
		l = c.Layers()[depth]
	}
	var got []byte
	total, err := c.FileRuns(l, off, n, func(p Piece) error {
		if p.N <= 0 {
			return fmt.Errorf("a piece of %d bytes", p.N)
		}
		b := make([]byte, p.N)
		if p.File != nil {
			if _, err := p.File.ReadAt(b, p.FileOff); err != nil {
				return err
			}
		}
		got = append(got, b...)
		return nil
	})
	if off >= size {
		if total != 0 || !errors.Is(err, io.EOF) {
			t.Fatalf("depth %d: FileRuns(%d bytes at %d), past the end = %d, %v; want 0, EOF", depth, n, off, total, err)
		}
		return
	}
	want := min(n, size-off)
	if err != nil || total != want || int64(len(got)) != want {
		t.Fatalf("depth %d: FileRuns(%d bytes at %d) = %d (pieces of %d bytes), %v; want %d", depth, n, off, total, len(got), err, want)
	}
	if !bytes.Equal(got, model[off:off+want]) {
		t.Fatalf("depth %d: FileRuns(%d bytes at %d) differ from the model at +%d", depth, n, off, firstDiff(got, model[off:]))
	}
}
