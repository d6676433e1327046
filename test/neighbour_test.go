package test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ran is what runWithin saw of a command.
type ran struct {
	stdout, stderr string
	code           int // -1: still running at the deadline
	took           time.Duration
}

// runWithin runs vhdfs and fails the test if it has not ended within d. A command
// stuck on a FUSE file cannot be killed, so past d it is left behind, not waited for.
func runWithin(t *testing.T, d time.Duration, env []string, args ...string) ran {
	t.Helper()
	cmd := exec.Command(vhdfsBin, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		r := ran{stdout: out.String(), stderr: errb.String(), took: time.Since(start)}
		var ee *exec.ExitError
		switch {
		case err == nil:
		case errors.As(err, &ee) && ee.Exited():
			r.code = ee.ExitCode()
		default:
			t.Fatalf("vhdfs %s: %v (stderr: %s)", strings.Join(args, " "), err, r.stderr)
		}
		return r
	case <-time.After(d):
		cmd.Process.Kill()
		t.Errorf("vhdfs %s: still running after %v", strings.Join(args, " "), d)
		return ran{code: -1, took: d}
	}
}

// TestBesideStoppedMount: with a vhdfs mount whose process is stopped (TestMain's
// neighbour), commands on other images finish at once, and the commands that need
// the stopped mount say so, naming its process, instead of hanging.
func TestBesideStoppedMount(t *testing.T) {
	if neighbour.pid == 0 {
		t.Fatal("TestMain started no stopped neighbour")
	}
	const within = 20 * time.Second
	pid := strconv.Itoa(neighbour.pid)
	dir := t.TempDir()
	base := createBase(t, dir, "vhd", 0, "base", "--size", "8M")
	top := createChild(t, base, "top")

	t.Run("merge of an unmounted image", func(t *testing.T) {
		if r := runWithin(t, within, nil, "merge", top); r.code != 0 {
			t.Errorf("exit %d after %v: %s", r.code, r.took, r.stderr)
		}
	})
	t.Run("snapshot of an unmounted image", func(t *testing.T) {
		if r := runWithin(t, within, nil, "snapshot", top, filepath.Join(dir, "snap.vhd")); r.code != 0 {
			t.Errorf("exit %d after %v: %s", r.code, r.took, r.stderr)
		}
	})
	t.Run("info of an unmounted image", func(t *testing.T) {
		if r := runWithin(t, within, nil, "info", top); r.code != 0 {
			t.Errorf("exit %d after %v: %s", r.code, r.took, r.stderr)
		}
	})
	t.Run("merge of the stopped mount's image", func(t *testing.T) {
		r := runWithin(t, within, nil, "merge", neighbour.image)
		if r.code <= 0 {
			t.Fatalf("exit %d after %v, want an error: %s", r.code, r.took, r.stderr)
		}
		assertOneLineError(t, r.stderr, pid, "stopped", neighbour.mnt)
	})
	t.Run("umount of the stopped mount", func(t *testing.T) {
		r := runWithin(t, within, nil, "umount", neighbour.mnt)
		if r.code <= 0 {
			t.Fatalf("exit %d after %v, want an error: %s", r.code, r.took, r.stderr)
		}
		assertOneLineError(t, r.stderr, pid, "stopped")
		if !mountedAt(t, neighbour.mnt) {
			t.Error("umount of a stopped mount unmounted it")
		}
	})
}

// startHolder starts a process in a mount namespace of its own, made after mnt was
// mounted: it keeps a copy of the mount when mnt is unmounted here. It ends with the test.
func startHolder(t *testing.T, mnt string) int {
	t.Helper()
	requireTool(t, "unshare")
	cmd := exec.Command("unshare", "-m", "--propagation", "private", "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	pid := cmd.Process.Pid
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		info, _ := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
		if strings.TrimSpace(string(comm)) == "sleep" && bytes.Contains(info, []byte(" "+mnt+" ")) {
			return pid
		}
		if time.Now().After(deadline) {
			t.Fatalf("the holder %d never showed %s in its mount namespace", pid, mnt)
		}
	}
}

// waitGone waits up to d for process pid to end (or become a zombie); false if not.
func waitGone(pid int, d time.Duration) bool {
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if syscall.Kill(pid, 0) == syscall.ESRCH {
			return true
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err != nil || strings.Contains(string(b), ") Z ") {
			return true
		}
	}
	return false
}

// TestUmountHeldElsewhere: when another mount namespace keeps a copy of the mount,
// `vhdfs umount` syncs, unmounts here and says within seconds who holds the mount;
// `vhdfs umount --abort` then ends the mount process, as SIGTERM does on its own.
// What was written and synced (by fsync, or by umount's sync) is in the image.
func TestUmountHeldElsewhere(t *testing.T) {
	for _, how := range []string{"umount then --abort", "SIGTERM"} {
		t.Run(how, func(t *testing.T) {
			dir := t.TempDir()
			img := createBase(t, dir, "vhd", 0, "base", "--size", "8M")
			mnt := mountEnv(t, img, nil)
			pid := readMergeStatus(t, mnt).PID
			model := make([]byte, 1<<20)
			rand.Read(model)
			f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(model, 1<<20); err != nil {
				t.Fatal(err)
			}
			if how == "SIGTERM" {
				if err := f.Sync(); err != nil {
					t.Fatal(err)
				}
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			holder := startHolder(t, mnt)

			if how == "SIGTERM" {
				if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
				if !waitGone(pid, 10*time.Second) {
					t.Fatalf("mount process %d still runs 10s after SIGTERM", pid)
				}
			} else {
				r := runWithin(t, 20*time.Second, nil, "umount", mnt)
				if r.code <= 0 {
					t.Fatalf("umount with the mount held elsewhere: exit %d after %v, want an error: %s", r.code, r.took, r.stderr)
				}
				assertOneLineError(t, r.stderr, strconv.Itoa(holder), strconv.Itoa(pid), "umount --abort")
				if mountedAt(t, mnt) {
					t.Errorf("%s is still mounted here", mnt)
				}
				r = runWithin(t, 10*time.Second, nil, "umount", "--abort", mnt)
				if r.code != 0 {
					t.Errorf("umount --abort: exit %d after %v: %s", r.code, r.took, r.stderr)
				}
				if !waitGone(pid, time.Second) {
					t.Fatalf("mount process %d still runs after umount --abort", pid)
				}
			}
			info, _ := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", holder))
			if !bytes.Contains(info, []byte(" "+mnt+" ")) {
				t.Errorf("the holder lost its copy of the mount: the test no longer tests a mount held elsewhere")
			}
			out := filepath.Join(dir, "out.raw")
			mustRun(t, "qemu-img", "convert", "-O", "raw", img, out)
			if got := fileBytes(t, out); !bytes.Equal(got[1<<20:2<<20], model) {
				t.Error("the image lacks data written and synced before the end of the mount")
			}
		})
	}
}

// TestMergeThroughMountThatStops: `vhdfs merge` through a mount whose process stops
// while the merge runs there gives up once the status stops answering, naming the
// process, instead of waiting with it; continued, the mount finishes the merge.
func TestMergeThroughMountThatStops(t *testing.T) {
	dir := t.TempDir()
	base := createBase(t, dir, "vhd", 0, "base", "--size", "8M")
	top := createChild(t, base, "top")
	env, _, resume := pausePoint(t, "copy-start")
	pauseDir := env[strings.Index(env, "pause=")+len("pause="):]
	mnt := mountEnv(t, top, []string{env})
	pid := readMergeStatus(t, mnt).PID

	res := make(chan ran, 1)
	go func() { res <- runWithin(t, 20*time.Second, []string{"VHDFS_WAIT_TIMEOUT=2s"}, "merge", top) }()
	// The merge reaches the pause in the mount, unless the command never gets there
	// (the goroutine then stays blocked on the FIFO, and touches nothing of t).
	inMerge := make(chan string, 1)
	go func() {
		b, err := os.ReadFile(filepath.Join(pauseDir, "reached"))
		inMerge <- fmt.Sprintf("%s%v", bytes.TrimSpace(b), err)
	}()
	select {
	case got := <-inMerge:
		if got != "copy-start<nil>" {
			t.Fatalf("waiting for merge point copy-start: %s", got)
		}
	case r := <-res:
		t.Fatalf("the merge never reached the mount: exit %d after %v: %s", r.code, r.took, r.stderr)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	continued := false
	cont := func() {
		if !continued {
			continued = true
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}
	t.Cleanup(cont)
	r := <-res
	cont()
	resume()
	if r.code <= 0 {
		t.Fatalf("merge through a stopped mount: exit %d after %v, want an error: %s", r.code, r.took, r.stderr)
	}
	if lines := strings.Split(strings.TrimSpace(r.stderr), "\n"); !strings.Contains(lines[len(lines)-1], strconv.Itoa(pid)) ||
		!strings.Contains(lines[len(lines)-1], "stopped") {
		t.Errorf("the last line does not say that mount process %d is stopped: %q", pid, r.stderr)
	}
	waitState(t, mnt, "idle")
	if st := readMergeStatus(t, mnt); st.Last == nil || st.Last.Command != "merge depth=1" || st.Last.Errno != 0 {
		t.Errorf("the mount's merge after SIGCONT: %+v", st.Last)
	}
	mustVhdfs(t, "umount", mnt)
}
