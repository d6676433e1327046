package vhdx

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// needTool skips the test unless the program is installed.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed", name)
	}
	return p
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
}

// qemuWrite is a write qemu-io makes: a pattern byte over a range.
type qemuWrite struct {
	off, len int64
	pattern  byte
}

// TestQemuImages reads fixed and dynamic images that qemu-img made and qemu-io wrote,
// with several block sizes and more than one chunk (4 GiB at 512-byte sectors), and
// compares every byte with qemu-img convert's raw output. (qemu 7.2 makes a fixed
// image with every BAT entry ZERO at offset 0; a block qemu-io writes becomes
// FULLY_PRESENT at its preallocated place.) Run must call every byte
// qemu wrote stored, and every byte it calls not stored must be zero in the raw.
func TestQemuImages(t *testing.T) {
	needTool(t, "qemu-img")
	needTool(t, "qemu-io")
	const gib = int64(1) << 30
	size := 4*gib + 512*MiB
	writes := []qemuWrite{
		{0, 64 * KiB, 0x11},
		{MiB - 512, 1024, 0x22},            // across a 1 MiB block boundary
		{33*MiB - 4096, 8192, 0x33},        // across a 32 MiB block boundary
		{4*gib - 4096, 8192, 0x44},         // across the chunk boundary at 4 GiB
		{4*gib + 100*MiB + 512, 512, 0x55}, // in the second chunk
		{size - 4096, 4096, 0x66},          // the last sector
	}
	for _, tc := range []struct {
		subformat string
		blockSize int64
		size      int64
	}{
		{"dynamic", 1 * MiB, size},
		{"dynamic", 32 * MiB, size},
		{"fixed", 1 * MiB, size},
		{"dynamic", 2 * MiB, 8*MiB + 3*512}, // a partial last block
	} {
		t.Run(fmt.Sprintf("%s-%dM-%d", tc.subformat, tc.blockSize/MiB, tc.size), func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "x.vhdx")
			run(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", fmt.Sprintf("subformat=%s,block_size=%d", tc.subformat, tc.blockSize), p, fmt.Sprint(tc.size))
			var done []qemuWrite
			for _, w := range writes {
				if w.off+w.len > tc.size {
					continue
				}
				run(t, "qemu-io", "-f", "vhdx", "-c", fmt.Sprintf("write -P %#x %d %d", w.pattern, w.off, w.len), p)
				done = append(done, w)
			}
			raw := filepath.Join(dir, "x.raw")
			run(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", p, raw)
			before := headSum(t, p)
			img, err := Open(p, false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if img.Size() != tc.size || img.BlockSize() != tc.blockSize || img.LogicalSectorSize() != 512 || img.HasParent() {
				t.Fatalf("size %d block %d sector %d parent %v", img.Size(), img.BlockSize(), img.LogicalSectorSize(), img.HasParent())
			}
			if want := map[string]DiskType{"fixed": TypeFixed, "dynamic": TypeDynamic}[tc.subformat]; img.Type() != want {
				t.Errorf("type %v, want %v", img.Type(), want)
			}
			compareRaw(t, img, raw)
			for _, w := range done {
				for o := w.off; o < w.off+w.len; {
					n, ok, err := img.Run(o, w.off+w.len-o)
					if err != nil || !ok {
						t.Fatalf("Run(%d) = %d, %v, %v: qemu wrote there", o, n, ok, err)
					}
					o += n
				}
			}
			checkHolesZero(t, img, raw)
			if after := headSum(t, p); after != before {
				t.Error("a read-only open changed the file")
			}
		})
	}
}

// compareRaw compares img with the raw file byte for byte wherever either holds
// data: every 16 MiB chunk in which the raw file has data (SEEK_DATA) or Run reports
// a stored byte. Other chunks are sampled (their first 64 KiB): in an image without a
// parent, ReadAt returns file data only for the FULLY_PRESENT blocks that Run
// reports, so a chunk that Run calls empty reads as zeros by construction. (Reading
// 4.5 GiB of zeros a few times takes minutes under the race detector.)
func compareRaw(t *testing.T, img *Image, raw string) {
	t.Helper()
	f, err := os.Open(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	if st.Size() != img.Size() {
		t.Fatalf("raw is %d bytes, image %d", st.Size(), img.Size())
	}
	const chunk = 16 * MiB
	a, b := make([]byte, chunk), make([]byte, chunk)
	for off := int64(0); off < img.Size(); off += chunk {
		n := min(chunk, img.Size()-off)
		if !hasData(t, f, off, n) {
			if k, stored, err := img.Run(off, n); err != nil || k == n && !stored {
				n = min(n, 64*KiB)
			}
		}
		if _, err := img.ReadAt(a[:n], off); err != nil {
			t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
		}
		if _, err := f.ReadAt(b[:n], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a[:n], b[:n]) {
			i := 0
			for i < int(n) && a[i] == b[i] {
				i++
			}
			t.Fatalf("byte %d differs from qemu-img convert: %#x, qemu %#x", off+int64(i), a[i], b[i])
		}
	}
	if n, err := img.ReadAt(a, img.Size()-512); n != 512 || err != io.EOF {
		t.Errorf("ReadAt across the end = %d, %v, want 512, EOF", n, err)
	}
}

// hasData reports whether f has data (not a hole) in [off, off+n).
func hasData(t *testing.T, f *os.File, off, n int64) bool {
	t.Helper()
	d, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return d < off+n
}

// checkHolesZero checks that every range Run calls not stored is zero in the raw.
func checkHolesZero(t *testing.T, img *Image, raw string) {
	t.Helper()
	f, err := os.Open(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 16*MiB)
	for off := int64(0); off < img.Size(); {
		n, ok, err := img.Run(off, img.Size()-off)
		if err != nil || n <= 0 {
			t.Fatalf("Run(%d) = %d, %v", off, n, err)
		}
		if !ok {
			for o := off; o < off+n; o += int64(len(buf)) {
				k := min(int64(len(buf)), off+n-o)
				if !hasData(t, f, o, k) {
					continue
				}
				if _, err := f.ReadAt(buf[:k], o); err != nil {
					t.Fatal(err)
				}
				if !allZero(buf[:k]) {
					t.Fatalf("Run says %d+%d is not stored, but qemu has data there", off, n)
				}
			}
		}
		off += n
	}
}
