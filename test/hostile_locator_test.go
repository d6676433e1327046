package test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// secretPattern fills the file a locator must not leak: none of its 3-byte pieces
// appears in an honest error message.
const secretPattern = "Zq7Xv9"

// TestHostileLocators: a parent locator that names a device, a FIFO, a symbolic link
// to a FIFO or a regular file that is not a VHD makes `vhdfs info` fail at once with
// one line that names the path and what it is, without opening the device or FIFO
// and without quoting a byte of the file.
func TestHostileLocators(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		code uint32
		// target makes what the locator names in dir and returns its path, the
		// locator's data and a FIFO that must stay unopened ("" for none).
		target func(t *testing.T, dir string) (path string, data []byte, fifo string)
		want   []string
	}{
		{"MacX names a character device", platformMacX, func(t *testing.T, dir string) (string, []byte, string) {
			return "/dev/zero", []byte("file:///dev/zero"), ""
		}, []string{"/dev/zero", "is a character device, not a regular file"}},
		{"W2ku names a character device", platformW2ku, func(t *testing.T, dir string) (string, []byte, string) {
			return "/dev/null", utf16le(`\dev\null`), ""
		}, []string{"/dev/null", "is a character device, not a regular file"}},
		{"W2ku names a FIFO", platformW2ku, func(t *testing.T, dir string) (string, []byte, string) {
			p := filepath.Join(dir, "pipe")
			mkfifo(t, p)
			return p, utf16le(strings.ReplaceAll(p, "/", `\`)), p
		}, []string{"pipe", "is a FIFO, not a regular file"}},
		{"W2ru names a symbolic link to a FIFO", platformW2ru, func(t *testing.T, dir string) (string, []byte, string) {
			p := filepath.Join(dir, "pipe")
			mkfifo(t, p)
			link := filepath.Join(dir, "link.vhd")
			if err := os.Symlink(p, link); err != nil {
				t.Fatal(err)
			}
			return link, utf16le(`.\link.vhd`), p
		}, []string{"link.vhd", "is a symbolic link to a FIFO, not a regular file"}},
		{"MacX names a file that is not a VHD", platformMacX, func(t *testing.T, dir string) (string, []byte, string) {
			p := filepath.Join(dir, "secret")
			if err := os.WriteFile(p, bytes.Repeat([]byte(secretPattern), 1000), 0o600); err != nil {
				t.Fatal(err)
			}
			return p, []byte("file://" + p), ""
		}, []string{"secret", `cookie is not "conectix"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			base, child := filepath.Join(dir, "base.vhd"), filepath.Join(dir, "child.vhd")
			makePair(t, base, child)
			if err := os.Remove(base); err != nil {
				t.Fatal(err)
			}
			target, data, fifo := tc.target(t, dir)
			// The locator goes into the W2ru slot, which has room for any of them.
			l := readLayout(t, child)
			if i := l.locatorIndex(tc.code); i >= 0 && tc.code != platformW2ru {
				patchLocator(t, child, i, locator{})
			}
			i := l.locatorIndex(platformW2ru)
			loc := l.Locators[i]
			loc.Code = tc.code
			patchLocator(t, child, i, loc)
			setLocatorData(t, child, tc.code, data)

			var opened <-chan struct{}
			if fifo != "" {
				opened = blockedWriter(t, fifo)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, vhdfsBin, "info", child)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			if ctx.Err() != nil {
				t.Fatalf("vhdfs info blocked on the locator to %s", target)
			}
			if err == nil {
				t.Fatalf("vhdfs info succeeded:\n%s", stdout.String())
			}
			assertOneLineError(t, stderr.String(), tc.want...)
			for k := 0; k+3 <= len(secretPattern)*2; k++ {
				piece := (secretPattern + secretPattern)[k : k+3]
				if strings.Contains(stderr.String(), piece) {
					t.Errorf("stderr quotes the file's bytes (%q): %s", piece, stderr.String())
					break
				}
			}
			if opened != nil {
				select {
				case <-opened:
					t.Errorf("vhdfs opened the FIFO %s", fifo)
				case <-time.After(100 * time.Millisecond):
				}
			}
		})
	}
}

func mkfifo(t testing.TB, path string) {
	t.Helper()
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
}

// blockedWriter opens the FIFO at path for writing in a goroutine, which blocks until
// a reader opens it; the returned channel is closed when that happens. At the end of
// the test a reader of our own lets the writer go.
func blockedWriter(t testing.TB, path string) <-chan struct{} {
	t.Helper()
	opened := make(chan struct{})
	go func() {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		close(opened)
		if err == nil {
			f.Close()
		}
	}()
	t.Cleanup(func() {
		r, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			t.Errorf("open %s to release its writer: %v", path, err)
			return
		}
		<-opened
		r.Close()
	})
	// Give the writer time to block in open before anything reads.
	time.Sleep(50 * time.Millisecond)
	return opened
}
