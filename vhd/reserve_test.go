package vhd

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// fullFile is a File on a file system with no room for a new block: writes that
// start in [failFrom, failTo) fail with ENOSPC. It cannot reserve; with
// fullReservingFile around it, reserving fails with ENOSPC.
type fullFile struct {
	*os.File
	failFrom, failTo int64
}

func (f *fullFile) WriteAt(p []byte, off int64) (int, error) {
	if off >= f.failFrom && off < f.failTo {
		return 0, syscall.ENOSPC
	}
	return f.File.WriteAt(p, off)
}

type fullReservingFile struct{ *fullFile }

func (f fullReservingFile) Reserve(off, n int64) error { return syscall.ENOSPC }

// TestAllocateNoSpace: a write that needs a new block on a full file system fails
// with ENOSPC at once, and leaves the file as it was: the same size, its footer at
// the end, checking clean, the earlier data readable, blocks that exist writable.
func TestAllocateNoSpace(t *testing.T) {
	cases := []struct {
		name      string
		reserving bool
		failTo    int64 // writes from the old end of the file to this far past it fail
	}{
		{"reserve fails", true, 0},
		{"no reserve, footer write fails", false, 1 << 40},
		// The bitmap goes just below the first 4 KiB boundary past the old end, the
		// footer a block further on.
		{"no reserve, bitmap write fails", false, 4 * kib},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := createImage(t, dir, "a.vhd", CreateOptions{Type: TypeDynamic, Size: 64 * kib, ExactSize: true, BlockSize: 4 * kib})
			img := openImage(t, p, true)
			first := bytes.Repeat([]byte{0xa5}, 4*kib)
			if _, err := img.WriteAt(first, 0); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			before := readFile(t, p)

			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			ff := &fullFile{File: f, failFrom: int64(len(before)), failTo: int64(len(before)) + tc.failTo}
			var file File = ff
			if tc.reserving {
				file = fullReservingFile{ff}
			}
			img, err = OpenFile(file, p, true)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := img.WriteAt(bytes.Repeat([]byte{1}, SectorSize), 8*kib); !errors.Is(err, syscall.ENOSPC) {
				t.Errorf("write into a new block: %v, want ENOSPC", err)
			}
			if got := fileSize(t, p); got != int64(len(before)) {
				t.Errorf("file is %d bytes after the failed allocation, want %d as before", got, len(before))
			}
			second := bytes.Repeat([]byte{0x3c}, SectorSize)
			if _, err := img.WriteAt(second, SectorSize); err != nil {
				t.Errorf("write into an allocated block: %v", err)
			}
			if err := img.Close(); err != nil {
				t.Errorf("close: %v", err)
			}

			after := openImage(t, p, false)
			if st, why := after.FooterState(); st != FooterAtEnd {
				t.Errorf("FooterState = %v (%v), want FooterAtEnd", st, why)
			}
			for _, pr := range problems(after.Check(), Note) {
				if pr.Severity > Note || strings.Contains(pr.Message, "belong to no block") {
					t.Errorf("Check: %v", pr)
				}
			}
			want := make([]byte, 64*kib)
			copy(want, first)
			copy(want[SectorSize:], second)
			if got := readAll(t, after); !bytes.Equal(got, want) {
				t.Errorf("view differs at %d", firstDiff(got, want))
			}
		})
	}
}

// TestReserveOSFile: on an *os.File the space of a new block is reserved, so the
// block takes its disk space when it is allocated.
func TestReserveOSFile(t *testing.T) {
	p := createImage(t, t.TempDir(), "a.vhd", CreateOptions{Type: TypeDynamic, Size: 8 * mib, ExactSize: true})
	img := openImage(t, p, true)
	if _, err := img.WriteAt(bytes.Repeat([]byte{1}, SectorSize), 0); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Clean(p), &st); err != nil {
		t.Fatal(err)
	}
	if got := st.Blocks * 512; got < DefaultBlockSize {
		t.Errorf("file takes %d bytes on disk after a 512-byte write into a new %d-byte block; want the block reserved", got, DefaultBlockSize)
	}
}
