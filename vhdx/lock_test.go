package vhdx

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestLockAndIdentity: images are locked with qemu's protocol (a second writer in
// this process and a qemu-io writer beside a reader are refused), and FileID,
// SameFile and AllocatedBytes describe the open file.
func TestLockAndIdentity(t *testing.T) {
	b := newBuilder(8*MiB, MiB)
	b.states[0], b.data[0] = FullyPresent, fill(512, 1)
	b.states[5], b.data[5] = FullyPresent, fill(512, 2)
	b.states[6] = Zero
	p := writeFile(t, b.build())
	w, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(p, true); !errors.Is(err, ErrLocked) {
		t.Errorf("a second writer: %v, want ErrLocked", err)
	}
	w.Close()
	r, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := exec.LookPath("qemu-io"); err == nil {
		if out, err := exec.Command("qemu-io", "-f", "vhdx", "-c", "write 0 512", p).CombinedOutput(); err == nil {
			t.Errorf("qemu-io wrote an image opened for reading:\n%s", out)
		}
	}
	if got := r.AllocatedBytes(); got != 2*MiB {
		t.Errorf("AllocatedBytes = %d, want 2 MiB", got)
	}
	if err := r.SameFile(p); err != nil {
		t.Error(err)
	}
	q := filepath.Join(t.TempDir(), "other.vhdx")
	if err := os.Rename(p, q); err != nil {
		t.Fatal(err)
	}
	if err := r.SameFile(q); err != nil {
		t.Errorf("after a rename: %v", err)
	}
	if err := os.WriteFile(p, b.build(), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := r.SameFile(p); err == nil {
		t.Error("SameFile accepts a replaced file")
	}
	if dev, ino := r.FileID(); dev == 0 && ino == 0 {
		t.Error("FileID is zero")
	}
	if _, err := Open(filepath.Dir(p), false); !errors.Is(err, ErrNotVHDX) {
		t.Errorf("a directory: %v", err)
	}
}
