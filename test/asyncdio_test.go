package test

import (
	"bufio"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestAsyncDirectIO: the mount takes the kernel's ASYNC_DIO (the INIT reply in the
// debug log says so), so one program's O_DIRECT requests reach vhdfs together; fio
// with libaio at queue depth 32, reading and writing 4 KiB at random with crc32c
// verification, passes through a merge from=1 and a merge from the top. Without
// ASYNC_DIO the kernel sends such requests one at a time (13-18k IOPS at QD 32 on
// the test machine, against 66-74k with it).
func TestAsyncDirectIO(t *testing.T) {
	requireTool(t, "fio")
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "64M"}, Writes: 8, Seed: 211})

		// The INIT exchange, from a debug mount of the same chain.
		mnt := mMountpoint(t)
		cmd := exec.Command(vhdfsBin, "mount", "--debug", "-f", c.Top(), mnt)
		stderr, err := cmd.StderrPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		reply := make(chan string, 1)
		go func() {
			sc := bufio.NewScanner(stderr)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			sent := false
			for sc.Scan() {
				// go-fuse logs the kernel's INIT as "rx N: INIT ..." and its answer as
				// "tx N: OK, {7.x Ra ... FLAGS ... MaxPages ...}".
				if line := sc.Text(); !sent && strings.Contains(line, " tx ") && strings.Contains(line, "MaxPages") {
					reply <- line
					sent = true
				}
			}
			if !sent {
				close(reply)
			}
		}()
		var line string
		select {
		case line = <-reply:
		case <-time.After(30 * time.Second):
		}
		mCleanupMount(t, mnt)
		if mountedAt(t, mnt) {
			mustVhdfs(t, "umount", mnt)
		}
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if !strings.Contains(line, "ASYNC_DIO") {
			t.Errorf("the INIT reply does not take ASYNC_DIO: %q", line)
		}

		// Many direct requests in flight, through two merges.
		mnt = mountEnv(t, c.Top(), nil)
		disk := filepath.Join(mnt, "disk.raw")
		fio := exec.Command("fio", "--name=aio", "--filename="+disk, "--rw=randrw", "--bs=4k", "--iodepth=32",
			"--ioengine=libaio", "--direct=1", "--size=16M", "--offset=32M", "--loops=6", "--randrepeat=0",
			"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=512", "--verify_state_save=0")
		var out strings.Builder
		fio.Stdout, fio.Stderr = &out, &out
		if err := fio.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- fio.Wait() }()
		for _, m := range []string{"merge from=1", "merge"} {
			if e := control(mnt, m); e != 0 {
				fio.Process.Kill()
				<-done
				t.Fatalf("%s during fio: %v: %+v", m, e, readMergeStatus(t, mnt).Last)
			}
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("fio at queue depth 32 through the merges: %v\n%s", err, out.String())
			}
		case <-time.After(cmdTimeout):
			fio.Process.Kill()
			<-done
			t.Fatalf("fio did not finish within %v:\n%s", cmdTimeout, out.String())
		}
		if st := readMergeStatus(t, mnt); len(st.Chain) != 2 {
			t.Errorf("chain after the merges: %d images, want 2", len(st.Chain))
		}
		top := readMergeStatus(t, mnt).Chain[0].Path
		mustVhdfs(t, "umount", mnt)
		mCheck(t, top)
	})
}
