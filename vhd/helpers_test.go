package vhd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

const (
	kib = 1 << 10
	mib = 1 << 20
)

// createImage creates an image named name in dir and returns its path.
func createImage(t *testing.T, dir, name string, opts CreateOptions) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := Create(p, opts); err != nil {
		t.Fatalf("Create(%s, %+v): %v", name, opts, err)
	}
	return p
}

// openImage opens path and closes it when the test ends (a second Close is harmless
// here: its error is ignored).
func openImage(t *testing.T, path string, writable bool) *Image {
	t.Helper()
	img, err := Open(path, writable)
	if err != nil {
		t.Fatalf("Open(%s, %v): %v", path, writable, err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// createDiff creates a differencing image name in dir whose parent is parentPath.
func createDiff(t *testing.T, dir, name, parentPath string, blockSize int64) string {
	t.Helper()
	parent := openImage(t, parentPath, false)
	p := createImage(t, dir, name, CreateOptions{Type: TypeDifferencing, Parent: parent, ParentPath: parentPath, BlockSize: blockSize})
	if err := parent.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func newRand(t *testing.T, seed uint64) *rand.Rand {
	t.Helper()
	t.Logf("random seed %d", seed)
	return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
}

// readAll reads what img stores over its whole size (ReadAt, bitmaps ignored).
func readAll(t *testing.T, img *Image) []byte {
	t.Helper()
	b := make([]byte, img.Size())
	if n, err := img.ReadAt(b, 0); err != nil || n != len(b) {
		t.Fatalf("%s: ReadAt whole disk: n=%d err=%v", img.Name(), n, err)
	}
	return b
}

// view is the disk a chain of img over a parent holding parent shows: sectors img's
// Run reports present come from img, the others from parent (zeros past its end).
func view(t *testing.T, img *Image, parent []byte) []byte {
	t.Helper()
	out := make([]byte, img.Size())
	for off := int64(0); off < img.Size(); {
		n, present, err := img.Run(off, img.Size()-off)
		if err != nil {
			t.Fatalf("%s: Run(%d): %v", img.Name(), off, err)
		}
		if n <= 0 {
			t.Fatalf("%s: Run(%d) returned length %d", img.Name(), off, n)
		}
		if present {
			if _, err := img.ReadAt(out[off:off+n], off); err != nil && !errors.Is(err, io.EOF) {
				t.Fatalf("%s: ReadAt(%d, %d): %v", img.Name(), off, n, err)
			}
		} else if off < int64(len(parent)) {
			copy(out[off:off+n], parent[off:])
		}
		off += n
	}
	return out
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

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	writeFile(t, dst, readFile(t, src))
}

// patchAt overwrites bytes of the file at off.
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

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// decodeFooter decodes 512 bytes without checking them.
func decodeFooter(t *testing.T, b []byte) Footer {
	t.Helper()
	var f Footer
	if err := binary.Read(bytes.NewReader(b[:FooterSize]), binary.BigEndian, &f); err != nil {
		t.Fatal(err)
	}
	return f
}

// editFooter rewrites the footer at the end of the file and, for dynamic and
// differencing images, the copy at offset 0, with a fresh checksum.
func editFooter(t *testing.T, path string, edit func(*Footer)) {
	t.Helper()
	b := readFile(t, path)
	end := int64(len(b)) - FooterSize
	f := decodeFooter(t, b[end:])
	hasCopy := f.DiskType != TypeFixed
	edit(&f)
	foot := f.Marshal()
	patchAt(t, path, end, foot)
	if hasCopy {
		patchAt(t, path, 0, foot)
	}
}

// editHeader rewrites the dynamic header at offset 512 with a fresh checksum.
func editHeader(t *testing.T, path string, edit func(*Header)) {
	t.Helper()
	b := readFile(t, path)
	var h Header
	if err := binary.Read(bytes.NewReader(b[FooterSize:FooterSize+HeaderSize]), binary.BigEndian, &h); err != nil {
		t.Fatal(err)
	}
	edit(&h)
	patchAt(t, path, FooterSize, h.Marshal())
}

// setBAT writes BAT entry i of an image whose BAT is at 1536 (as Create places it).
func setBAT(t *testing.T, path string, i int, e uint32) {
	t.Helper()
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], e)
	patchAt(t, path, FooterSize+HeaderSize+4*int64(i), b[:])
}

// requireTool fails the test when a tool the Makefile installs is missing.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is required for this test and is missing (run 'make deps'): %v", name, err)
	}
	return p
}

func run(t *testing.T, name string, args ...string) []byte {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return out
}

// problems returns the problems of at least severity atLeast.
func problems(ps []Problem, atLeast Severity) []Problem {
	var out []Problem
	for _, p := range ps {
		if p.Severity >= atLeast {
			out = append(out, p)
		}
	}
	return out
}
