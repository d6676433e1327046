package test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestExportToStdout: `vhdfs export IMAGE - | sha256sum` hashes the chain's view (as
// an export to a file and, for a dynamic base, qemu-img convert see it), and makes no
// file named "-"; -p draws the bar on stderr, ending once at 100%.
func TestExportToStdout(t *testing.T) {
	requireTool(t, "qemu-img")
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "24M"}, Writes: 20, Seed: 11})
		want := fmt.Sprintf("%x", sha256.Sum256(c.Model()))
		base := c.Images[0]
		converted := filepath.Join(t.TempDir(), "base.raw")
		mustRun(t, "qemu-img", "convert", "-f", qemuFormat(base), "-O", "raw", base, converted)
		for _, tc := range []struct {
			name, image, want string
		}{
			{"chain, as the model", c.Top(), want},
			{"chain, as a file export", c.Top(), sha256file(t, exportImage(t, c.Top()))},
			{"dynamic base, as qemu-img convert", base, sha256file(t, converted)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				cwd := t.TempDir()
				cmd := exec.Command("bash", "-c", `set -o pipefail; "$0" export -p "$1" - | sha256sum`, vhdfsBin, tc.image)
				cmd.Dir = cwd
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				out, err := cmd.Output()
				if err != nil {
					t.Fatalf("export - | sha256sum: %v: %s", err, stderr.String())
				}
				if got := strings.Fields(string(out)); len(got) == 0 || got[0] != tc.want {
					t.Errorf("sha256 of export -: %q, want %s", out, tc.want)
				}
				if _, err := os.Stat(filepath.Join(cwd, "-")); err == nil {
					t.Errorf("export - made a file named -")
				}
				if n := strings.Count(stderr.String(), "100.0%"); n != 1 {
					t.Errorf("the bar shows 100%% %d times, want once: %q", n, stderr.String())
				}
			})
		}
	})
}

// TestExportToLoopDevice: export to a block device writes the view over whatever the
// device held (zeros too), without truncating it, and --hash digests the view; a device smaller than the image is
// refused and left alone.
func TestExportToLoopDevice(t *testing.T) {
	requireTool(t, "losetup")
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "24M"}, Writes: 20, Seed: 12})
		model := c.Model()
		dir := t.TempDir()
		attach := func(name string, size int) (string, string) {
			t.Helper()
			backing := filepath.Join(dir, name)
			// Not zeros: the export must overwrite the device's old bytes.
			if err := os.WriteFile(backing, bytes.Repeat([]byte{0xa5}, size), 0o600); err != nil {
				t.Fatal(err)
			}
			dev := strings.TrimSpace(mustRun(t, "losetup", "-f", "--show", backing))
			return backing, dev
		}
		detach := func(dev *string) {
			t.Helper()
			if out, err := exec.Command("losetup", "-d", *dev).CombinedOutput(); err != nil {
				t.Errorf("losetup -d %s: %v: %s", *dev, err, out)
			}
			*dev = ""
		}

		backing, dev := attach("big", len(model)+1<<20)
		mLoopCleanup(t, &dev)
		// --hash: the digest of the disk, not of the device past it.
		if out, want := mustVhdfs(t, "export", "--hash", "sha256", c.Top(), dev), fmt.Sprintf("%x  %s\n", sha256.Sum256(model), dev); out != want {
			t.Errorf("export --hash to a device printed %q, want %q", out, want)
		}
		detach(&dev)
		got := fileBytes(t, backing)
		if len(got) != len(model)+1<<20 {
			t.Fatalf("the device's file is %d bytes, want %d (untouched past the image)", len(got), len(model)+1<<20)
		}
		if !bytes.Equal(got[:len(model)], model) {
			t.Errorf("the device's first %d bytes differ from the chain's view", len(model))
		}
		if !bytes.Equal(got[len(model):], bytes.Repeat([]byte{0xa5}, 1<<20)) {
			t.Errorf("the bytes past the image changed")
		}

		small, sdev := attach("small", len(model)-1<<20)
		mLoopCleanup(t, &sdev)
		if _, errs, code := vhdfs(t, "export", c.Top(), sdev); code != 1 || !strings.Contains(errs, "smaller") {
			t.Errorf("export to a smaller device: exit %d, %q", code, errs)
		}
		detach(&sdev)
		if !bytes.Equal(fileBytes(t, small), bytes.Repeat([]byte{0xa5}, len(model)-1<<20)) {
			t.Errorf("a refused export changed the smaller device")
		}
	})
}

// TestExportToClosedPipe: when the reader of the pipe goes away (`| head -c 1`),
// export ends as a plain writer does in a shell pipeline, killed by SIGPIPE (status
// 141 under pipefail), without an error message.
func TestExportToClosedPipe(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "24M"}, Writes: 20, Seed: 12})
		cmd := exec.Command("bash", "-c", `set -o pipefail; "$0" export "$1" - | head -c 1 >/dev/null`, vhdfsBin, c.Top())
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 128+int(syscall.SIGPIPE) {
			t.Errorf("export - | head -c 1: %v, want exit status %d (SIGPIPE)", err, 128+int(syscall.SIGPIPE))
		}
		if stderr.Len() != 0 {
			t.Errorf("export - | head -c 1 said %q, want nothing", stderr.String())
		}
	})
}
