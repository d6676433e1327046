package test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rpImage makes a 16 MiB dynamic image of format with its first 8 MiB written.
func rpImage(t *testing.T, format string) string {
	t.Helper()
	img := createBase(t, t.TempDir(), format, 0, "a", "--size", "16M")
	mnt := mMountpoint(t)
	mMount(t, img, mnt)
	mustRun(t, "dd", "if=/dev/urandom", "of="+filepath.Join(mnt, "disk.raw"), "bs=1M", "count=8", "conv=notrunc", "status=none")
	mUmount(t, mnt)
	return img
}

// rpForeground runs `vhdfs mount -f [flags] img dir` with its stderr in a file, which
// the test may read while the mount runs; it returns that file's path.
func rpForeground(t *testing.T, img, dir string, flags ...string) string {
	t.Helper()
	return rpForegroundEnv(t, img, dir, nil, flags...)
}

// rpForegroundEnv is rpForeground with env(the stderr file) added to the
// environment (nil: nothing).
func rpForegroundEnv(t *testing.T, img, dir string, env func(stderr *os.File) []string, flags ...string) string {
	t.Helper()
	requireTool(t, "fusermount3")
	logPath := filepath.Join(t.TempDir(), "stderr")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command(vhdfsBin, append(append([]string{"mount", "-f"}, flags...), img, dir)...)
	cmd.Stderr = f
	cmd.Env = mRaceLog(t)
	if env != nil {
		cmd.Env = append(cmd.Env, env(f)...)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Errorf("vhdfs mount -f %s is still running at the end of the test; killing it", dir)
			cmd.Process.Kill()
			<-done
		}
	})
	mCleanupMount(t, dir)
	deadline := time.Now().Add(30 * time.Second)
	for !mountedAt(t, dir) {
		select {
		case <-done:
			t.Fatalf("vhdfs mount -f %s exited before mounting:\n%s", dir, fileBytes(t, logPath))
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("vhdfs mount -f %s: not mounted after 30s", dir)
		}
	}
	return logPath
}

// TestForegroundLogJournal: in the foreground, each log line on stderr has its time,
// unless stderr is the systemd journal's stream (JOURNAL_STREAM names its DEV:INO),
// which adds its own. A process that inherited JOURNAL_STREAM but whose stderr goes
// elsewhere still stamps its lines.
func TestForegroundLogJournal(t *testing.T) {
	img := rpImage(t, "vhd") // logging: the format does not matter
	devIno := func(f *os.File) string {
		var st syscall.Stat_t
		if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino)
	}
	other, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	stamp := regexp.MustCompile(`^vhdfs: \d{4}/\d\d/\d\d \d\d:\d\d:\d\d `)
	for _, tc := range []struct {
		name  string
		env   func(*os.File) []string
		stamp bool
	}{
		{"no journal", func(*os.File) []string { return []string{"JOURNAL_STREAM="} }, true},
		{"stderr is the journal", func(f *os.File) []string { return []string{devIno(f)} }, false},
		{"the journal is another stream", func(*os.File) []string { return []string{devIno(other)} }, true},
		{"JOURNAL_STREAM not DEV:INO", func(*os.File) []string { return []string{"JOURNAL_STREAM=journal"} }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt := mMountpoint(t)
			logPath := rpForegroundEnv(t, img, mnt, tc.env, "-r")
			mUmount(t, mnt) // waits for the process: the log is whole
			log := strings.TrimSpace(string(fileBytes(t, logPath)))
			if !strings.Contains(log, "mounted "+img) {
				t.Fatalf("no mounted line in the log:\n%s", log)
			}
			for _, line := range strings.Split(log, "\n") {
				if stamp.MatchString(line) != tc.stamp || !strings.HasPrefix(line, "vhdfs: ") {
					t.Errorf("line %q: want the time on it %v", line, tc.stamp)
				}
			}
		})
	}
}

// rpReadAheadKB reads the sysfs read-ahead of the mount at dir.
func rpReadAheadKB(t *testing.T, dir string) int {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	major, minor := (st.Dev>>8)&0xfff|(st.Dev>>32)&^0xfff, st.Dev&0xff|(st.Dev>>12)&^0xff
	b, err := os.ReadFile(fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", major, minor))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestMountReadAhead(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("only root may set a mount's read_ahead_kb")
	}
	img := rpImage(t, "vhd") // mount options: the format does not matter
	for _, tc := range []struct {
		name  string
		flags []string
		want  int
	}{
		{"default", nil, 1024},
		{"-o readahead=512", []string{"-r", "-o", "readahead=512"}, 512},
		{"--readahead=2048", []string{"-r", "--readahead=2048"}, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt := mMountpoint(t)
			mMount(t, img, mnt, tc.flags...)
			if got := rpReadAheadKB(t, mnt); got != tc.want {
				t.Errorf("read_ahead_kb of the mount = %d, want %d", got, tc.want)
			}
			mUmount(t, mnt)
		})
	}
}

// TestMountReadsLogNothing: 1 MiB O_DIRECT reads leave no line in the mount's log
// (go-fuse 2.12.1 logged a failed splice for each).
func TestMountReadsLogNothing(t *testing.T) {
	requireTool(t, "dd")
	forEachFormat(t, func(t *testing.T, format string) {
		img := rpImage(t, format)
		mnt := mMountpoint(t)
		logPath := rpForeground(t, img, mnt, "-r")
		mustRun(t, "dd", "if="+filepath.Join(mnt, "disk.raw"), "of=/dev/null", "iflag=direct", "bs=1M", "status=none")
		mustRun(t, "dd", "if="+filepath.Join(mnt, "disk.raw"), "of=/dev/null", "bs=1M", "status=none")
		mUmount(t, mnt)
		for _, line := range strings.Split(strings.TrimSpace(string(fileBytes(t, logPath))), "\n") {
			if !strings.Contains(line, "mounted") {
				t.Errorf("mount log has a line besides (un)mounted: %q", line)
			}
		}
	})
}

// TestMountDirectIO: with direct_io every read of disk.raw reaches vhdfs, the second
// as much as the first; without it the second comes from the page cache.
func TestMountDirectIO(t *testing.T) {
	img := rpImage(t, "vhd") // a mount option: the format does not matter
	for _, tc := range []struct {
		name      string
		flags     []string
		secondHit bool // the second read reaches vhdfs
	}{
		{"page cache", nil, false},
		{"-o direct_io", []string{"-o", "direct_io"}, true},
		{"--direct-io", []string{"--direct-io"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt := mMountpoint(t)
			logPath := rpForeground(t, img, mnt, append([]string{"-r", "--debug"}, tc.flags...)...)
			disk := filepath.Join(mnt, "disk.raw")
			reads := func() int { return strings.Count(string(fileBytes(t, logPath)), ": READ ") }
			before := reads()
			mustRun(t, "dd", "if="+disk, "of=/dev/null", "bs=64K", "status=none")
			first := reads() - before
			mustRun(t, "dd", "if="+disk, "of=/dev/null", "bs=64K", "status=none")
			second := reads() - before - first
			mUmount(t, mnt)
			if first == 0 {
				t.Fatalf("the first read of disk.raw sent no READ to vhdfs")
			}
			if tc.secondHit && second < first {
				t.Errorf("the second read sent %d READs, the first %d: disk.raw was cached", second, first)
			}
			if !tc.secondHit && second != 0 {
				t.Errorf("the second read sent %d READs: disk.raw was not cached", second)
			}
		})
	}
}

// TestSystemdNotify: under a unit of Type=notify (NOTIFY_SOCKET set), `vhdfs mount -f`
// says READY=1 once disk.raw is served, not before, and STOPPING=1 when it is
// unmounted.
func TestSystemdNotify(t *testing.T) {
	img := rpImage(t, "vhd") // the format does not matter
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	msgs := make(chan string, 16)
	go func() {
		defer close(msgs)
		buf := make([]byte, 4096)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	next := func(what string) string {
		t.Helper()
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatalf("the notify socket closed while waiting for %s", what)
			}
			return m
		case <-time.After(30 * time.Second):
			t.Fatalf("no %s from vhdfs mount -f after 30 s", what)
		}
		return ""
	}
	mnt := mMountpoint(t)
	mCleanupMount(t, mnt)
	cmd := exec.Command(vhdfsBin, "mount", "-f", "-r", img, mnt)
	cmd.Env = append(mRaceLog(t), "NOTIFY_SOCKET="+sock)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var waitErr error
	done := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Errorf("vhdfs mount -f %s is still running at the end of the test; killing it", mnt)
			cmd.Process.Kill()
			<-done
		}
	})
	ready := next("READY=1")
	if !strings.Contains(ready, "READY=1") || !strings.Contains(ready, "STATUS=serving "+img+" on "+mnt) {
		t.Fatalf("first notification %q, want READY=1 and a STATUS naming the image and %s", ready, mnt)
	}
	// Ready means served: disk.raw reads now, without waiting.
	if _, err := os.Stat(filepath.Join(mnt, "disk.raw")); err != nil {
		t.Fatalf("READY=1 before the mount serves: %v", err)
	}
	mUmount(t, mnt)
	if m := next("STOPPING=1"); !strings.Contains(m, "STOPPING=1") {
		t.Errorf("notification after umount %q, want STOPPING=1", m)
	}
	select {
	case <-done:
		if waitErr != nil {
			t.Errorf("vhdfs mount -f: %v", waitErr)
		}
	case <-time.After(30 * time.Second):
		t.Errorf("vhdfs mount -f still runs 30 s after umount")
	}
}
