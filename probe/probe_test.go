package probe

import (
	"errors"
	"go/build"
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

// TestOtherFormat: the signatures of formats vhdfs does not read are named; a file
// with none is not; a fixed VHD whose disk has a partition table is still a VHD.
func TestOtherFormat(t *testing.T) {
	at := func(size int, parts ...any) []byte {
		b := make([]byte, size)
		for i := 0; i < len(parts); i += 2 {
			copy(b[parts[i].(int):], parts[i+1].(string))
		}
		return b
	}
	for _, tc := range []struct {
		name string
		head []byte
		want Other // zero: none
	}{
		{"qcow2", at(4096, 0, "QFI\xfb\x00\x00\x00\x03"), Other{Name: "qcow2"}},
		{"qcow", at(512, 0, "QFI\xfb\x00\x00\x00\x01"), Other{Name: "qcow"}},
		{"sparse VMDK", at(4096, 0, "KDMV\x01\x00\x00\x00"), Other{Name: "VMDK"}},
		{"ESX sparse VMDK", at(4096, 0, "COWD"), Other{Name: "VMDK"}},
		{"VMDK descriptor, short", []byte("# Disk DescriptorFile\nversion=1\n"), Other{Name: "VMDK"}},
		{"VDI", at(4096, 0, "<<< Oracle VM VirtualBox Disk Image >>>\n", 64, "\x7f\x10\xda\xbe"), Other{Name: "VDI"}},
		{"VDI signature alone", at(4096, 64, "\x7f\x10\xda\xbe"), Other{Name: "VDI"}},
		{"VDI text alone", at(100, 0, "<<< Sun xVM VirtualBox Disk Image >>>\n"), Other{Name: "VDI"}},
		{"GPT", at(4104, 510, "\x55\xaa", 512, "EFI PART"), Other{Name: "raw", Table: "GPT"}},
		{"GPT, 4 KiB sectors", at(4104, 510, "\x55\xaa", 4096, "EFI PART"), Other{Name: "raw", Table: "GPT"}},
		{"MBR", at(4104, 510, "\x55\xaa"), Other{Name: "raw", Table: "MBR"}},
		{"zeros", at(4104), Other{}},
		{"a VHDX", at(4104, 0, "vhdxfile"), Other{}},
		{"empty", nil, Other{}},
		{"half a magic", []byte("QF"), Other{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "f")
			if err := os.WriteFile(p, tc.head, 0o644); err != nil {
				t.Fatal(err)
			}
			got, ok := OtherFormat(p)
			if got != tc.want || ok != (tc.want != Other{}) {
				t.Errorf("OtherFormat = %+v, %v; want %+v", got, ok, tc.want)
			}
			if ok {
				return
			}
			if _, err := Open(p, ReadOnly); err == nil || strings.Contains(err.Error(), "not VHD or VHDX (") {
				t.Errorf("Open: %v; want no other format named", err)
			}
		})
	}

	// Open names the format, and the error still wraps the formats' refusals.
	dir := t.TempDir()
	q := filepath.Join(dir, "x.qcow2")
	if err := os.WriteFile(q, at(1<<20, 0, "QFI\xfb\x00\x00\x00\x03"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Open(q, ReadOnly)
	want := q + ": a qcow2 image, not VHD or VHDX (convert it with qemu-img convert -O vhdx " + q + " " + filepath.Join(dir, "x.vhdx") + ")"
	if err == nil || err.Error() != want || !errors.Is(err, image.ErrUnknownFormat) || !errors.Is(err, vhd.ErrNotVHD) {
		t.Errorf("Open of a qcow2: %v\nwant %s, wrapping ErrUnknownFormat and ErrNotVHD", err, want)
	}

	// A fixed VHD's disk may hold an MBR: it is a VHD all the same.
	v := filepath.Join(dir, "fixed.vhd")
	if err := vhd.Create(v, vhd.CreateOptions{Type: vhd.TypeFixed, Size: 1 << 20, ExactSize: true}); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(v, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0x55, 0xaa}, 510); err != nil {
		t.Fatal(err)
	}
	f.Close()
	img, err := Open(v, ReadOnly)
	if err != nil {
		t.Fatalf("a fixed VHD with an MBR: %v", err)
	}
	img.Close()
}

// TestFormatsBehindProbe: the packages above the formats import neither vhd nor
// vhdx (their non-test files, directly): they reach the formats through image and
// probe, the one list of formats.
func TestFormatsBehindProbe(t *testing.T) {
	for _, dir := range []string{"cmd/vhdfs", "chain", "merge", "fs"} {
		pkg, err := build.ImportDir(filepath.Join("..", dir), 0)
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		if len(pkg.GoFiles) == 0 {
			t.Fatalf("%s: no Go files", dir)
		}
		for _, imp := range pkg.Imports {
			if imp == "github.com/vhdfs/vhdfs/vhd" || imp == "github.com/vhdfs/vhdfs/vhdx" {
				t.Errorf("%s imports %s: go through probe or image", dir, imp)
			}
		}
	}
}
