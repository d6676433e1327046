package fileio

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestOpenRegular: regular files and links to them open; devices, FIFOs, links to
// them and directories are refused with their type named, and a FIFO is never
// opened (a writer waiting for a reader stays blocked).
func TestOpenRegular(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	writeFile(t, file, []byte("data"))
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	link := func(name, to string) string {
		p := filepath.Join(dir, name)
		if err := os.Symlink(to, p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	opened := make(chan struct{})
	go func() {
		if f, err := os.OpenFile(fifo, os.O_WRONLY, 0); err == nil {
			f.Close()
		}
		close(opened)
	}()
	t.Cleanup(func() {
		if r, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0); err == nil {
			<-opened
			r.Close()
		}
	})
	time.Sleep(20 * time.Millisecond) // let the writer block in open

	for _, tc := range []struct {
		name, path string
		want       string // "" for success
	}{
		{"regular file", file, ""},
		{"link to a regular file", link("lfile", "file"), ""},
		{"link to a link to a regular file", link("llfile", "lfile"), ""},
		{"character device", "/dev/null", "/dev/null: is a character device, not a regular file"},
		{"FIFO", fifo, "fifo: is a FIFO, not a regular file"},
		{"link to a FIFO", link("lfifo", "fifo"), "lfifo: is a symbolic link to a FIFO, not a regular file"},
		{"link to a device", link("ldev", "/dev/zero"), "ldev: is a symbolic link to a character device, not a regular file"},
		{"directory", dir, "is a directory, not a regular file"},
		{"missing file", filepath.Join(dir, "missing"), "no such file"},
		{"dangling link", link("ldangling", "missing"), "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := OpenRegular(tc.path, os.O_RDONLY|syscall.O_NONBLOCK)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				f.Close()
				return
			}
			if err == nil {
				f.Close()
				t.Fatalf("%s opened", tc.path)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			if !errors.Is(err, ErrNotRegular) && !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("error %q wraps neither ErrNotRegular nor fs.ErrNotExist", err)
			}
			if err := CheckRegular(tc.path); err == nil {
				t.Errorf("CheckRegular(%s) passes", tc.path)
			}
		})
	}
	select {
	case <-opened:
		t.Error("the FIFO was opened")
	case <-time.After(50 * time.Millisecond):
	}
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}
