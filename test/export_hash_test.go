package test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestExportHash: export --hash prints, as sha256sum and md5sum do, the digest of the
// whole disk it wrote (holes as zeros) — to a file on stdout, to `-` on stderr, so
// stdout stays the disk's bytes — equal to the tools' digest of the exported raw and,
// for a dynamic base, of qemu-img convert's raw.
func TestExportHash(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "sha256sum")
	requireTool(t, "md5sum")
	forEachFormat(t, func(t *testing.T, format string) {
		// Sparse: 20 small writes over 24 MiB, through three images.
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "24M"}, Writes: 20, Seed: 21})
		base := c.Images[0]
		converted := filepath.Join(t.TempDir(), "base.raw")
		mustRun(t, "qemu-img", "convert", "-f", qemuFormat(base), "-O", "raw", base, converted)
		for _, tc := range []struct{ name, image, raw string }{
			{"chain", c.Top(), exportImage(t, c.Top())},
			{"dynamic base, as qemu-img convert", base, converted},
		} {
			for _, sum := range []string{"sha256", "md5"} {
				want := strings.Fields(mustRun(t, sum+"sum", tc.raw))[0]
				t.Run(tc.name+", "+sum+", to a file", func(t *testing.T) {
					out := filepath.Join(t.TempDir(), "out.raw")
					stdout := mustVhdfs(t, "export", "--hash", sum, tc.image, out)
					if stdout != want+"  "+out+"\n" {
						t.Errorf("export --hash %s printed %q, want %q", sum, stdout, want+"  "+out+"\n")
					}
					if got := strings.Fields(mustRun(t, sum+"sum", out))[0]; got != want {
						t.Errorf("%ssum of the export: %s, want %s", sum, got, want)
					}
				})
				t.Run(tc.name+", "+sum+", to stdout", func(t *testing.T) {
					cmd := exec.Command(vhdfsBin, "export", "--hash", sum, tc.image, "-")
					var stdout, stderr bytes.Buffer
					cmd.Stdout, cmd.Stderr = &stdout, &stderr
					if err := cmd.Run(); err != nil {
						t.Fatalf("export --hash %s -: %v: %s", sum, err, stderr.String())
					}
					if stderr.String() != want+"  -\n" {
						t.Errorf("stderr %q, want %q", stderr.String(), want+"  -\n")
					}
					raw, err := os.ReadFile(tc.raw)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(stdout.Bytes(), raw) {
						t.Errorf("stdout (%d bytes) is not the disk (%d bytes)", stdout.Len(), len(raw))
					}
				})
			}
		}
	})
}

// TestExportOverwrite: export refuses a regular file that is not empty, and leaves
// it as it was; --force overwrites it; an empty file or a new path needs no --force.
func TestExportOverwrite(t *testing.T) {
	c := makeChain(t, chainOptions{Format: "vhd", Depth: 2, Create: []string{"--size", "8M"}, Writes: 5, Seed: 22})
	want := sha256file(t, exportImage(t, c.Top()))
	dir := t.TempDir()
	old := []byte("not a disk, and not to be lost\n")
	for _, tc := range []struct {
		name  string
		held  []byte // nil: no file there
		force bool
		ok    bool
	}{
		{"a file with data, refused", old, false, false},
		{"a file with data, --force", old, true, true},
		{"an empty file", []byte{}, false, true},
		{"a new path", nil, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_")+".raw")
			if tc.held != nil {
				if err := os.WriteFile(out, tc.held, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			args := []string{"export"}
			if tc.force {
				args = append(args, "--force")
			}
			_, stderr, code := vhdfs(t, append(args, c.Top(), out)...)
			if !tc.ok {
				if code != 1 || !strings.Contains(stderr, "--force") {
					t.Errorf("exit %d, stderr %q; want 1 and a word about --force", code, stderr)
				}
				if got, err := os.ReadFile(out); err != nil || !bytes.Equal(got, tc.held) {
					t.Errorf("the file was changed: %q, %v", got, err)
				}
				return
			}
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			if got := sha256file(t, out); got != want {
				t.Errorf("sha256 of the export %s, want %s", got, want)
			}
		})
	}
}
