package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestControlRetry: after EINTR, a write of the same merge command from a new open
// joins the running merge and returns its result; after the merge ended, it gets
// that result once instead of starting the merge again (even when the merge left the
// chain too short for the command); another merge command gets EBUSY while one runs.
func TestControlRetry(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 5, Create: []string{"--size", "16M"}, Writes: 10, Seed: 63})
		want := md5Of(c.Model())
		env, reached, resume := pausePoint(t, "copy-half")
		mnt := mountEnv(t, c.Top(), []string{env})
		disk := filepath.Join(mnt, "disk.raw")
		const cmd = "merge from=1 depth=1"
		chainLen := func(want int) {
			t.Helper()
			if st := readMergeStatus(t, mnt); len(st.Chain) != want || st.State != "idle" {
				t.Fatalf("chain of %d, state %s; want %d, idle", len(st.Chain), st.State, want)
			}
		}
		retry := func() chan syscall.Errno {
			ch := make(chan syscall.Errno, 1)
			go func() { ch <- control(mnt, cmd) }()
			return ch
		}
		result := func(ch chan syscall.Errno, what string) syscall.Errno {
			t.Helper()
			select {
			case e := <-ch:
				return e
			case <-time.After(time.Minute): // a failure, not a synchronisation
				t.Fatalf("%s: no answer (a second merge paused at the failpoint?)", what)
				return 0
			}
		}

		// Joins the running merge.
		interruptedWrite(t, mnt, cmd, reached)
		joined := retry()
		if e := control(mnt, "merge depth=1"); e != syscall.EBUSY {
			t.Errorf("another merge while one runs: errno %v, want EBUSY", e)
		}
		select {
		case e := <-joined:
			t.Fatalf("the retry returned %v while the merge was paused; want it to wait", e)
		default:
		}
		resume()
		if e := result(joined, "retry during the merge"); e != 0 {
			t.Fatalf("retry during the merge: errno %v, want 0", e)
		}
		chainLen(4)

		// A new write of the same command, not a retry (the result was taken), starts a
		// new merge.
		again := retry()
		reached()
		resume()
		if e := result(again, "new merge"); e != 0 {
			t.Fatalf("new merge: errno %v", e)
		}
		chainLen(3)

		// Comes after the merge ended: its result, no second merge, although the merge
		// left a chain too short for the command to run again.
		interruptedWrite(t, mnt, cmd, reached)
		resume()
		waitState(t, mnt, "idle")
		if e := result(retry(), "retry after the merge"); e != 0 {
			t.Fatalf("retry after the merge: errno %v, want 0", e)
		}
		chainLen(2)

		// The result is taken: the same command now is a new merge, which this chain is
		// too short for.
		if e := control(mnt, cmd); e != syscall.EINVAL {
			t.Fatalf("the same command once its result was taken: errno %v, want EINVAL", e)
		}
		if got := md5Of(fileBytes(t, disk)); got != want {
			t.Errorf("after the merges: md5 %s, want %s", got, want)
		}
		mustVhdfs(t, "umount", mnt)
		mCheck(t, c.Top())
	})
}

// readmeRetryLoop returns the shell loop the README gives for writing a merge
// command from a script.
func readmeRetryLoop(t *testing.T) string {
	t.Helper()
	b := fileBytes(t, filepath.Join(moduleRoot, "README.md"))
	m := regexp.MustCompile("(?s)```\n(err=\\$\\(mktemp\\)\nuntil echo .*?\ndone\n)```").FindSubmatch(b)
	if m == nil {
		t.Fatal("README.md has no retry loop for the control file")
	}
	return string(m[1])
}

// TestControlScriptLoop runs the README's retry loop 50 times, in bash with
// background children whose SIGCHLD interrupts the write: every merge completes
// exactly once (the chain loses one layer per run) and the view never changes.
func TestControlScriptLoop(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		const runs = 50
		c := makeChain(t, chainOptions{Format: format, Depth: runs + 2, Create: []string{"--size", "8M"}, Writes: 2, MaxLen: 64 << 10, Seed: 64})
		want := md5Of(c.Model())
		mnt := mountEnv(t, c.Top(), nil)
		loop := readmeRetryLoop(t)
		loop = strings.ReplaceAll(loop, "/mnt/x", mnt)
		loop = strings.ReplaceAll(loop, "merge depth=2", "merge from=1 depth=1")
		script := "for d in 0.001 0.003 0.005 0.01 0.02 0.04; do sleep $d & done\n" + loop
		retries := 0
		tmp := t.TempDir() // for the loop's mktemp
		for i := range runs {
			sh := exec.Command("bash", "-x", "-c", script)
			sh.Env = append(os.Environ(), "TMPDIR="+tmp)
			var errb strings.Builder
			sh.Stderr = &errb
			if err := sh.Run(); err != nil {
				t.Fatalf("run %d: %v\n%s", i, err, errb.String())
			}
			retries += strings.Count(errb.String(), "+ grep -q 'Interrupted system call'")
			if st := readMergeStatus(t, mnt); len(st.Chain) != runs+1-i || st.State != "idle" {
				t.Fatalf("after run %d: chain of %d, state %s; want %d, idle\n%s", i, len(st.Chain), st.State, runs+1-i, errb.String())
			}
		}
		t.Logf("%d runs, %d writes interrupted and retried", runs, retries)
		if got := md5Of(fileBytes(t, filepath.Join(mnt, "disk.raw"))); got != want {
			t.Errorf("after %d merges: md5 %s, want %s", runs, got, want)
		}
		mustVhdfs(t, "umount", mnt)
		mCheck(t, c.Top())
	})
}

// interruptedWrite runs `echo cmd > mnt/control` in bash, waits until reached
// reports the merge paused, and interrupts the write with a SIGCHLD: bash fails with
// EINTR and exits while the merge goes on.
func interruptedWrite(t *testing.T, mnt, cmd string, reached func()) {
	t.Helper()
	sh := exec.Command("bash", "-c", fmt.Sprintf("echo '%s' > %s/control", cmd, mnt))
	var errb strings.Builder
	sh.Stderr = &errb
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	reached()
	if err := sh.Process.Signal(syscall.SIGCHLD); err != nil {
		t.Fatal(err)
	}
	if err := sh.Wait(); err == nil || !strings.Contains(errb.String(), "Interrupted system call") {
		t.Fatalf("bash writing %q, interrupted: %v, stderr %q; want EINTR", cmd, err, errb.String())
	}
}

// waitState polls the control file until the state is want.
func waitState(t *testing.T, mnt, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for readMergeStatus(t, mnt).State != want {
		if time.Now().After(deadline) {
			t.Fatalf("state never became %s", want)
		}
		runtime.Gosched()
	}
}
