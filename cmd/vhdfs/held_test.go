package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// holdOpen starts a process that has path open as its descriptor 3+extra (after
// extra descriptors of /dev/null) until the test ends, and returns its pid.
func holdOpen(t *testing.T, path string, extra int) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("sleep", "600")
	for i := 0; i < extra; i++ {
		n, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		defer n.Close()
		cmd.ExtraFiles = append(cmd.ExtraFiles, n)
	}
	cmd.ExtraFiles = append(cmd.ExtraFiles, f)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd.Process.Pid
}

// TestBusyHoldersSymlink: a process holding a file under a directory is named when
// the directory is given through a symbolic link (its descriptor's link names the
// resolved path).
func TestBusyHoldersSymlink(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "real")
	os.Mkdir(real, 0o755)
	file := filepath.Join(real, "disk.raw")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	pid := holdOpen(t, file, 0)
	want := fmt.Sprintf("pid %d (sleep) has %s open", pid, file)
	for _, mnt := range []string{real, link, link + "/"} {
		if got := busyHolders(mnt); !strings.Contains(got, want) {
			t.Errorf("busyHolders(%s) = %q, want it to say %q", mnt, got, want)
		}
	}
}

// TestBusyHoldersBounded: at most maxFdsRead descriptors of a process are read (a
// holder past them is not named, and the message says the reading was cut), and
// none after the deadline.
func TestBusyHoldersBounded(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	pid := holdOpen(t, file, 20) // file is its descriptor 23
	proc := fmt.Sprintf("/proc/%d", pid)

	links, stopped, cut := fdLinks(proc, time.Now().Add(time.Minute))
	if stopped || cut || len(links) < 24 || links[23] != file {
		t.Errorf("fdLinks(%s) = %q, stopped %v, cut %v; want descriptor 23 %s", proc, links, stopped, cut, file)
	}
	if links, stopped, _ := fdLinks(proc, time.Now().Add(-time.Second)); !stopped || len(links) != 0 {
		t.Errorf("fdLinks after the deadline read %d links, stopped %v", len(links), stopped)
	}

	defer func(n int) { maxFdsRead = n }(maxFdsRead)
	maxFdsRead = 8
	links, stopped, cut = fdLinks(proc, time.Now().Add(time.Minute))
	if stopped || !cut || len(links) != 8 {
		t.Errorf("fdLinks(%s) with maxFdsRead 8 = %d links, stopped %v, cut %v", proc, len(links), stopped, cut)
	}
	if got := busyHolders(dir); got != "" {
		t.Errorf("busyHolders(%s) with maxFdsRead 8 = %q: read past descriptor 8", dir, got)
	}
	maxFdsRead = 1 << 16
	if got, want := busyHolders(dir), fmt.Sprintf("pid %d (sleep) has %s open", pid, file); !strings.Contains(got, want) {
		t.Errorf("busyHolders(%s) = %q, want it to say %q", dir, got, want)
	}
}
