package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/internal/imagelock"
)

// writeTestRecord stores r in dir as a mount process would.
func writeTestRecord(t *testing.T, dir string, r mountRecord) string {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, fmt.Sprintf("%d.json", r.PID))
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// selfRecord is a record of this process as the mount process of image.
func selfRecord(t *testing.T, image string) mountRecord {
	t.Helper()
	rec, err := newRecord(image, "/nonexistent/mnt", "0:999", false)
	if err != nil {
		t.Fatal(err)
	}
	return *rec
}

// startSleep starts a process that is not vhdfs and ends it at the end of the test.
func startSleep(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

func TestReadRecords(t *testing.T) {
	image := filepath.Join(t.TempDir(), "top.vhd")
	if err := os.WriteFile(image, []byte("image"), 0o600); err != nil {
		t.Fatal(err)
	}
	live := selfRecord(t, image)

	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	sleeper := startSleep(t)
	sleepStart, err := procStart(sleeper.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name   string
		mutate func(r *mountRecord)
		keep   bool
	}{
		{"the live process that wrote it", func(r *mountRecord) {}, true},
		{"a dead pid", func(r *mountRecord) { r.PID = dead.Process.Pid }, false},
		{"a reused pid: another start time", func(r *mountRecord) { r.Start++ }, false},
		{"a live pid that is not vhdfs", func(r *mountRecord) {
			r.PID, r.Start = sleeper.Process.Pid, sleepStart
		}, false},
		{"another program at the pid", func(r *mountRecord) { r.Exe = "/usr/bin/sleep" }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			r := live
			tc.mutate(&r)
			p := writeTestRecord(t, dir, r)
			got := readRecords([]string{dir})
			if tc.keep != (len(got) == 1) {
				t.Fatalf("readRecords: %d records, want kept=%v", len(got), tc.keep)
			}
			if _, err := os.Stat(p); tc.keep != (err == nil) {
				t.Errorf("record file present: %v, want %v (a stale record is removed)", err == nil, tc.keep)
			}
		})
	}
	t.Run("a record under another pid's name", func(t *testing.T) {
		dir := t.TempDir()
		b, _ := json.Marshal(live)
		if err := os.WriteFile(filepath.Join(dir, "1.json"), b, 0o600); err != nil {
			t.Fatal(err)
		}
		if got := readRecords([]string{dir}); len(got) != 0 {
			t.Errorf("a record named for pid 1 holding pid %d was taken", live.PID)
		}
	})
}

func TestFindMount(t *testing.T) {
	dir := t.TempDir()
	image := filepath.Join(dir, "top.vhd")
	other := filepath.Join(dir, "other.vhd")
	for _, p := range []string{image, other} {
		if err := os.WriteFile(p, []byte("image"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(t.TempDir(), "link.vhd")
	if err := os.Symlink(image, link); err != nil {
		t.Fatal(err)
	}
	hard := filepath.Join(dir, "hard.vhd")
	if err := os.Link(image, hard); err != nil {
		t.Fatal(err)
	}
	records := t.TempDir()
	rec := selfRecord(t, image)
	writeTestRecord(t, records, rec)

	find := func(p string) *mountRecord {
		t.Helper()
		r, err := findMountIn([]string{records}, p)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	// Without a lock or a descriptor on the image, the record alone proves nothing.
	if r := find(image); r != nil {
		t.Errorf("a record of a process that does not hold the image was taken")
	}

	// As a mount process: the top open for writing, locked as imagelock does.
	f, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := imagelock.Acquire(f, image, imagelock.Writer)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Release()
	for _, tc := range []struct{ name, path string }{
		{"the path it was mounted by", image},
		{"a symlink", link},
		{"a hard link", hard},
		{"a path with ..", filepath.Join(dir, "..", filepath.Base(dir), "top.vhd")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if r := find(tc.path); r == nil || r.PID != os.Getpid() {
				t.Errorf("findMount(%s) = %+v, want this process's record", tc.path, r)
			}
		})
	}
	if r := find(other); r != nil {
		t.Errorf("findMount of an image nobody mounted found %+v", r)
	}
	// A missing image is mounted nowhere: the caller's open of it names it.
	if r, err := findMountIn([]string{records}, filepath.Join(dir, "missing.vhd")); r != nil || err != nil {
		t.Errorf("findMount of a missing image: %+v, %v; want nil, nil", r, err)
	}
	// Any other error names the image.
	loop := filepath.Join(dir, "loop.vhd")
	if err := os.Symlink(loop, loop); err != nil {
		t.Fatal(err)
	}
	if _, err := findMountIn([]string{records}, loop); err == nil || !strings.Contains(err.Error(), loop) {
		t.Errorf("findMount of a symbolic link loop: %v; want an error naming %s", err, loop)
	}
}
