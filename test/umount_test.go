package test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// resultFiles are the places a mount process pid may leave its final error.
func resultFiles(pid int) []string {
	name := fmt.Sprintf("%d.err", pid)
	ps := []string{filepath.Join("/run/vhdfs", name)}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		ps = append(ps, filepath.Join(d, "vhdfs", name))
	}
	return ps
}

// TestUmountFinalFlushError: when the mount process's final flush fails, `vhdfs
// umount` unmounts, exits 1 and prints the error in one line, and leaves no result
// file behind.
func TestUmountFinalFlushError(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 3, Seed: 61})
		mnt := mountEnv(t, c.Top(), []string{"VHDFS_FAILPOINT=close:fail"})
		pid := readMergeStatus(t, mnt).PID
		mustRun(t, "dd", "if=/dev/urandom", "of="+filepath.Join(mnt, "disk.raw"), "bs=4096", "count=8", "conv=notrunc")
		_, errs, code := vhdfs(t, "umount", mnt)
		if code != 1 {
			t.Errorf("umount after a failed final flush: exit %d, want 1 (stderr %q)", code, errs)
		}
		assertOneLineError(t, errs, mnt, "final flush", "injected failure at close")
		if mountedAt(t, mnt) {
			t.Errorf("%s is still mounted", mnt)
		}
		for _, p := range resultFiles(pid) {
			if _, err := os.Stat(p); err == nil {
				t.Errorf("%s is left behind", p)
			}
		}
		mCheck(t, c.Top())
	})
}

// TestUmountRunningMerge: `vhdfs umount` of a mount whose merge runs (its writer gone
// after EINTR, as a script's is) refuses in one line naming the merge; with --abort
// it aborts the merge, waits and unmounts, and the chain is as it was.
func TestUmountRunningMerge(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "16M"}, Writes: 20, Seed: 62})
		// The merged layers stay as they were, but for the one right above the target,
		// which records the target's interim ID; the target took copies the chain ignores.
		files := snapshotFiles(t, c.Images[2:]...)
		env, reached, resume := pausePoint(t, "copy-half")
		mnt := mountEnv(t, c.Top(), []string{env})
		interruptedWrite(t, mnt, "merge depth=2", reached)

		_, errs, code := vhdfs(t, "umount", mnt)
		if code != 1 {
			t.Errorf("umount during a merge: exit %d, want 1", code)
		}
		assertOneLineError(t, errs, `"merge depth=2" is running`, "abort", "vhdfs umount --abort")
		if !mountedAt(t, mnt) {
			t.Fatal("umount during a merge unmounted it")
		}
		if st := readMergeStatus(t, mnt); st.State != "merging" {
			t.Fatalf("state %s after the refused umount, want merging", st.State)
		}

		done := make(chan string, 1)
		go func() {
			out, errs, code := vhdfs(t, "umount", "--abort", mnt)
			done <- fmt.Sprintf("exit %d\n%s%s", code, out, errs)
		}()
		waitState(t, mnt, "aborting")
		resume()
		if got := <-done; got != "exit 0\n" {
			t.Errorf("umount --abort: %s", got)
		}
		if mountedAt(t, mnt) {
			t.Fatalf("%s is still mounted after umount --abort", mnt)
		}
		assertUnchanged(t, files)
		mCheck(t, c.Top())
		assertFileEquals(t, exportImage(t, c.Top()), c.Model())
	})
}
