package vhdx

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// qemuPendingLog makes qemu leave a log entry pending: qemu-io writes 1 MiB of 0x5a
// at 0 of a new dynamic image, and gdb kills it at the first write of a BAT sector
// (the only writes whose first byte is 6, FULLY_PRESENT), after the entry that
// carries that sector is durable in the log and before qemu applies it.
func qemuPendingLog(t *testing.T) string {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io", "gdb"} {
		needTool(t, tool)
	}
	p := filepath.Join(t.TempDir(), "qemu.vhdx")
	run(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic,block_size=1M", p, "8M")
	out, _ := exec.Command("gdb", "-q", "-batch", "-ex", "set pagination off", "-ex", "catch syscall pwrite64",
		"-ex", "condition 1 *(unsigned char*)$rsi == 6", "-ex", "run", "-ex", "kill",
		"--args", "qemu-io", "-f", "vhdx", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 5M 4k", p).CombinedOutput()
	if !bytes.Contains(out, []byte("Catchpoint 1")) {
		t.Skipf("gdb did not stop qemu-io at a BAT write:\n%s", out)
	}
	return p
}

// TestLogQemuPending: a log entry qemu left pending replays, read-only and into the
// file, to the disk qemu shows once it has replayed it itself.
func TestLogQemuPending(t *testing.T) {
	p := qemuPendingLog(t)
	want := make([]byte, 8*MiB)
	copy(want, fill(MiB, 0x5a))

	view := func(p string, writable bool) []byte {
		t.Helper()
		img, err := Open(p, writable)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		if img.LogReplayed() != 1 {
			t.Errorf("writable=%v: replayed %d entries, want qemu's 1", writable, img.LogReplayed())
		}
		b := make([]byte, img.Size())
		if _, err := img.ReadAt(b, 0); err != nil && err != io.EOF {
			t.Fatal(err)
		}
		return b
	}
	copyFile := func(name string) string {
		t.Helper()
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		c := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(c, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return c
	}
	qemuView := func(p string) []byte {
		t.Helper()
		raw := filepath.Join(t.TempDir(), "x.raw")
		run(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", p, raw)
		b, err := os.ReadFile(raw)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	ours := copyFile("ours.vhdx")
	if !bytes.Equal(view(ours, false), want) {
		t.Error("the read-only view of qemu's pending log is not the disk qemu wrote")
	}
	if !bytes.Equal(view(ours, true), want) {
		t.Error("the view after replaying qemu's pending log is not the disk qemu wrote")
	}
	if !bytes.Equal(qemuView(ours), want) {
		t.Error("qemu reads the file we replayed its log into differently")
	}
	theirs := copyFile("theirs.vhdx")
	run(t, "qemu-img", "check", "-q", "-r", "all", "-f", "vhdx", theirs)
	if !bytes.Equal(qemuView(theirs), want) {
		t.Error("qemu's own replay differs from the disk it wrote")
	}
}
