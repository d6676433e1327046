package probe

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/vhd"
)

func TestOpenByFormat(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "d.vhd")
	if err := vhd.Create(p, vhd.CreateOptions{Type: vhd.TypeDynamic, Size: 8 << 20, ExactSize: true}); err != nil {
		t.Fatal(err)
	}
	for _, m := range []Mode{ReadOnly, Writable, ForceShare} {
		img, err := Open(p, m)
		if err != nil {
			t.Fatalf("mode %d: %v", m, err)
		}
		if img.Format() != "vhd" || img.Type() != image.Dynamic || img.Size() != 8<<20 || img.Writable() != (m == Writable) {
			t.Errorf("mode %d: %s %v size %d writable %v", m, img.Format(), img.Type(), img.Size(), img.Writable())
		}
		img.Close()
	}
}

func TestOpenRefuses(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "raw.img")
	if err := os.WriteFile(raw, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, path string
		want       error
		says       []string
	}{
		{"raw zeros are no image", raw, image.ErrUnknownFormat, []string{raw + ": ", "as VHD", "conectix", "not a VHD or VHDX image"}},
		{"the VHD refusal is still there", raw, vhd.ErrNotVHD, nil},
		{"a FIFO is never opened", fifo, fileio.ErrNotRegular, []string{"FIFO"}},
		{"nothing there", filepath.Join(dir, "none"), os.ErrNotExist, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img, err := Open(tt.path, ReadOnly)
			if err == nil {
				img.Close()
				t.Fatal("opened")
			}
			if !errors.Is(err, tt.want) {
				t.Errorf("error %q does not wrap %v", err, tt.want)
			}
			for _, s := range tt.says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
			if strings.Count(err.Error(), "\n") > 0 {
				t.Errorf("error is not one line: %q", err)
			}
		})
	}
}
