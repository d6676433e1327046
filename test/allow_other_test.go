package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestMountAllowOther: with --allow-other another user can read disk.raw but the mode
// bits (0644, owned by the mounting user) keep it from writing disk.raw or control.
func TestMountAllowOther(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		if os.Getuid() != 0 {
			t.Fatal("this test runs as root, to act as another user")
		}
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 5, Seed: 4})
		before := snapshotFiles(t, c.Files()...)
		mnt := mountEnv(t, c.Top(), nil, "--allow-other")
		// The user must reach the mount point: open up the temporary folders above it
		// (the mounted root is 0755 already).
		for d := filepath.Dir(mnt); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
			if err := os.Chmod(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		asNobody := func(script string) (string, error) {
			cmd := exec.Command("/bin/sh", "-c", script)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		disk := filepath.Join(mnt, "disk.raw")
		if out, err := asNobody("head -c 4096 " + disk + " | wc -c"); err != nil || strings.TrimSpace(out) != "4096" {
			t.Fatalf("another user reading disk.raw: %q, %v", out, err)
		}
		for _, f := range []string{disk, filepath.Join(mnt, "control")} {
			if out, err := asNobody("printf sync > " + f); err == nil || !strings.Contains(out, "ermission denied") {
				t.Errorf("another user writing %s: %q, %v; want permission denied", f, out, err)
			}
		}
		mustVhdfs(t, "umount", mnt)
		assertUnchanged(t, before)
	})
}
