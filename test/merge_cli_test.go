package test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestMergeCommandOnMount: `vhdfs merge` of the top of a chain mounted read-write
// drives that mount's control file and returns its result; -p draws the bar although
// stdout is a pipe, and the bar's end (100%) is drawn once, offline as through a mount.
func TestMergeCommandOnMount(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "32M")
		top := createChild(t, base, "top")
		mnt := mountEnv(t, top, nil)
		disk := filepath.Join(mnt, "disk.raw")
		f, err := os.OpenFile(disk, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		chunk := []byte(strings.Repeat("vhdfs merge through the mount\n", 4096))
		for off := int64(0); off < 16<<20; off += 1 << 20 {
			if _, err := f.WriteAt(chunk, off); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		want := md5file(t, disk)

		// A depth the chain does not have is a usage error, found before the mount is asked.
		if _, errs, code := vhdfs(t, "merge", "--depth", "5", top); code != 2 {
			t.Errorf("merge --depth 5 of a mounted chain of 2: exit %d, want 2: %s", code, errs)
		}
		out, errs, code := vhdfs(t, "merge", "-p", top)
		if code != 0 {
			t.Fatalf("vhdfs merge -p of a mounted top: exit %d\nstdout %s\nstderr %s", code, out, errs)
		}
		if !strings.Contains(errs, mnt) {
			t.Errorf("merge does not say it goes through the mount at %s: %q", mnt, errs)
		}
		if n := strings.Count(errs, "100.0%"); n != 1 {
			t.Errorf("the bar shows 100%% %d times, want once: %q", n, errs)
		}
		// The size merged is said in units, with the bytes in brackets.
		if !mergedRE(base).MatchString(out) {
			t.Errorf("stdout %q does not match %s", out, mergedRE(base))
		}
		st := readMergeStatus(t, mnt)
		if st.Last == nil || st.Last.Command != "merge depth=1" || st.Last.Errno != 0 || !strings.Contains(out, st.Last.Message) || st.Last.Message == "" {
			t.Errorf("stdout %q, want the merge's result %+v", out, st.Last)
		}
		if got := md5file(t, disk); got != want {
			t.Errorf("disk.raw after the merge: md5 %s, want %s", got, want)
		}
		if len(st.Chain) != 2 || st.Chain[1].Path != base {
			t.Errorf("chain after the merge: %+v", st.Chain)
		}
		mustVhdfs(t, "umount", mnt)

		// Offline, the same bar: one 100%.
		top2 := createChild(t, top, "top2")
		out, errs, code = vhdfs(t, "merge", "--depth", "2", "--progress", top2)
		if code != 0 {
			t.Fatalf("offline merge: exit %d\n%s%s", code, out, errs)
		}
		if n := strings.Count(errs, "100.0%"); n != 1 {
			t.Errorf("offline: the bar shows 100%% %d times, want once: %q", n, errs)
		}
		if !strings.HasPrefix(out, "merged 0 bytes into "+base+";") {
			t.Errorf("offline: stdout %q, want the merge of nothing into %s", out, base)
		}
		if got := md5file(t, exportImage(t, top2)); got != want {
			t.Errorf("view after the offline merge: md5 %s, want %s", got, want)
		}
	})
}

// mergedRE matches merge's result line for a merge into target.
func mergedRE(target string) *regexp.Regexp {
	return regexp.MustCompile(`^merged \d+\.\d [KMGT]iB \(\d+ bytes\) into ` + regexp.QuoteMeta(target) + `[;\n]`)
}

// TestMergeCommandOnMountInterrupted: Ctrl-C on a `vhdfs merge` that drives a mount
// aborts the mount's merge, as it stops an offline one: exit 1, the chain as it was.
func TestMergeCommandOnMountInterrupted(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "16M")
		top := createChild(t, base, "top")
		env, reached, resume := pausePoint(t, "copy-start")
		mnt := mountEnv(t, top, []string{env})
		if err := os.WriteFile(filepath.Join(mnt, "disk.raw"), []byte("written before the merge"), 0); err != nil {
			t.Fatal(err)
		}
		want := md5file(t, filepath.Join(mnt, "disk.raw"))
		cmd := exec.Command(vhdfsBin, "merge", top)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		waited := false
		t.Cleanup(func() {
			if !waited {
				cmd.Process.Kill()
				cmd.Wait()
			}
		})
		reached()
		if err := cmd.Process.Signal(os.Interrupt); err != nil {
			t.Fatal(err)
		}
		for delay := time.Millisecond; readMergeStatus(t, mnt).State != "aborting"; delay = min(2*delay, 50*time.Millisecond) {
			time.Sleep(delay) // polling for the abort to arrive, not a synchronisation by itself
		}
		resume()
		err := cmd.Wait()
		waited = true
		if code := cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(stderr.String(), "interrupted") {
			t.Errorf("interrupted merge: %v, exit %d, %q", err, code, stderr.String())
		}
		st := readMergeStatus(t, mnt)
		if st.State != "idle" || len(st.Chain) != 2 || st.Chain[0].Path != top {
			t.Errorf("status after the abort: %+v", st)
		}
		if got := md5file(t, filepath.Join(mnt, "disk.raw")); got != want {
			t.Errorf("disk.raw after the abort: md5 %s, want %s", got, want)
		}
		mustVhdfs(t, "umount", mnt)
	})
}
