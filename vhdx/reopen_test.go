package vhdx

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestReopen: Reopen opens the same file through its descriptor, even after a
// rename, with a lock joint with the first handle's; OpenForceShare reads an image a
// writer holds; a writable reopen of an image whose log was replayed only in memory
// is refused and writes nothing.
func TestReopen(t *testing.T) {
	b := newBuilder(8*MiB, MiB)
	b.states[1], b.data[1] = FullyPresent, pattern(MiB, 3)
	p := writeFile(t, b.build())

	ro, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	q := filepath.Join(t.TempDir(), "moved.vhdx")
	if err := os.Rename(p, q); err != nil {
		t.Fatal(err)
	}
	wi, err := ro.Reopen(true) // a merge writing into a parent its chain holds
	if err != nil {
		t.Fatal(err)
	}
	w := wi.(*Image)
	if !w.Writable() || w.Name() != p || w.Format() != "vhdx" {
		t.Errorf("reopened: writable %v, name %s, format %s", w.Writable(), w.Name(), w.Format())
	}
	if d1, i1 := ro.FileID(); func() bool { d2, i2 := w.FileID(); return d1 != d2 || i1 != i2 }() {
		t.Error("the reopened handle has another file")
	}
	if _, err := w.WriteAt(fill(4096, 9), MiB); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(q, true); !errors.Is(err, ErrLocked) {
		t.Errorf("a second writer beside the reopened one: %v, want ErrLocked", err)
	}
	if _, err := exec.LookPath("qemu-io"); err == nil {
		if out, err := exec.Command("qemu-io", "-f", "vhdx", "-r", "-c", "read 0 512", q).CombinedOutput(); err == nil || !bytes.Contains(out, []byte("lock")) {
			t.Errorf("qemu-io read an image the reopened handle writes:\n%s", out)
		}
	}
	fs, err := OpenForceShare(q)
	if err != nil {
		t.Fatalf("OpenForceShare beside a writer: %v", err)
	}
	got := make([]byte, 4096)
	if _, err := fs.ReadAt(got, MiB); err != nil || !bytes.Equal(got, fill(4096, 9)) {
		t.Errorf("OpenForceShare reads % x…, %v", got[:4], err)
	}
	if fs.Writable() {
		t.Error("OpenForceShare is writable")
	}
	fr, err := fs.Reopen(false)
	if err != nil {
		t.Fatalf("read-only reopen of a force-share handle: %v", err)
	}
	fr.Close()
	fs.Close()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w2, err := Open(q, true) // the reopened writer's lock is gone
	if err != nil {
		t.Fatalf("a writer after the reopened one closed: %v", err)
	}
	w2.Close()
	r2, err := ro.Reopen(false)
	if err != nil {
		t.Fatal(err)
	}
	r2.Close()
}

func TestReopenPendingLog(t *testing.T) {
	f, _, _ := logImage(t)
	p := writeFile(t, f)
	before := fileSum(t, p)
	ro, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if w, err := ro.Reopen(true); !errors.Is(err, ErrUnsupported) {
		if err == nil {
			w.Close()
		}
		t.Errorf("writable reopen with a pending log: %v, want ErrUnsupported", err)
	}
	r, err := ro.Reopen(false)
	if err != nil {
		t.Fatal(err)
	}
	if r.(*Image).LogReplayed() != 2 {
		t.Errorf("read-only reopen replayed %d entries, want 2", r.(*Image).LogReplayed())
	}
	r.Close()
	if fileSum(t, p) != before {
		t.Error("the file changed")
	}
}
