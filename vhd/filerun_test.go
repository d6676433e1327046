package vhd

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestCopyFrom(t *testing.T) {
	dir := t.TempDir()
	srcPath := filepath.Join(dir, "src")
	data := bytes.Repeat([]byte("vhdfs-cfr"), 8192)[:64<<10]
	if err := os.WriteFile(srcPath, append(make([]byte, 4096), data...), 0o644); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(srcPath)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	for _, tc := range []struct {
		name     string
		typ      DiskType
		prewrite bool // allocate the block first
		wantErr  error
	}{
		{"fixed: in place", TypeFixed, false, nil},
		{"dynamic, unallocated block", TypeDynamic, false, ErrNotInPlace},
		{"dynamic, allocated block", TypeDynamic, true, nil},
		{"differencing, unallocated block: allocated", TypeDifferencing, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "a.vhd")
			opts := CreateOptions{Type: tc.typ, Size: 4 << 20, ExactSize: true, BlockSize: 1 << 20}
			if tc.typ == TypeDifferencing {
				pp := filepath.Join(t.TempDir(), "parent.vhd")
				if err := Create(pp, CreateOptions{Type: TypeDynamic, Size: 4 << 20, ExactSize: true}); err != nil {
					t.Fatal(err)
				}
				parent, err := Open(pp, false)
				if err != nil {
					t.Fatal(err)
				}
				defer parent.Close()
				opts = CreateOptions{Type: TypeDifferencing, Parent: parent, ParentPath: pp, BlockSize: 1 << 20}
			}
			if err := Create(p, opts); err != nil {
				t.Fatal(err)
			}
			img, err := Open(p, true)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			const off = 1<<20 + 8192
			if tc.prewrite {
				if _, err := img.WriteAt([]byte{1: 1, 511: 0}, 1<<20); err != nil {
					t.Fatal(err)
				}
			}
			k, err := img.CopyFrom(src, 4096, off, int64(len(data)))
			if !errors.Is(err, tc.wantErr) || tc.wantErr == nil && err != nil {
				t.Fatalf("CopyFrom = %d, %v; want error %v", k, err, tc.wantErr)
			}
			if tc.wantErr != nil {
				if k != 0 {
					t.Errorf("CopyFrom copied %d bytes with an error", k)
				}
				return
			}
			if k != int64(len(data)) {
				t.Fatalf("CopyFrom copied %d bytes, want %d", k, len(data))
			}
			if err := img.Sync(); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(data))
			if _, err := img.ReadAt(got, off); err != nil || !bytes.Equal(got, data) {
				t.Errorf("read back after CopyFrom differs (%v)", err)
			}
			if n, present, err := img.Run(off, int64(len(data))); err != nil || !present || n != int64(len(data)) {
				t.Errorf("Run after CopyFrom = %d, %v, %v; want all present", n, present, err)
			}
			want := int64(1<<20 - 8192) // the rest of block 1
			if tc.typ == TypeFixed {
				want = 4<<20 - off // the rest of the disk
			}
			f, foff, n, ok := img.FileRun(off, 8<<20)
			if !ok || f == nil || n != want {
				t.Errorf("FileRun = %v, %d, %d, %v; want %d bytes", f != nil, foff, n, ok, want)
			}
		})
	}
}
