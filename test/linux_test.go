package test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// daemonFDs returns what the open descriptors of process pid point at, by number.
func daemonFDs(t testing.TB, pid int) map[int]string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	fds := map[int]string{}
	for _, e := range ents {
		n, _ := strconv.Atoi(e.Name())
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil {
			fds[n] = target
		}
	}
	return fds
}

// checkDaemonFDs checks that the mount process pid holds none of its callers'
// descriptors (stdin, stdout and stderr are /dev/null; no pipe, socket or terminal
// that the test or the processes callers hold) and that its working directory is /.
// It returns a check to call before unmounting: the same files must be open then (a
// leaked handle would lock an image). The process's own pipes (go-fuse's splice
// pool) and anonymous inodes may come and go.
func checkDaemonFDs(t testing.TB, pid int, callers ...int) func() {
	t.Helper()
	theirs := map[string]bool{}
	for _, c := range append(callers, os.Getpid()) {
		for _, target := range daemonFDs(t, c) {
			if strings.HasPrefix(target, "pipe:") || strings.HasPrefix(target, "socket:") || strings.HasPrefix(target, "/dev/pts") || strings.HasPrefix(target, "/dev/tty") {
				theirs[target] = true
			}
		}
	}
	at := daemonFDs(t, pid)
	for fd := 0; fd <= 2; fd++ {
		if at[fd] != "/dev/null" {
			t.Errorf("mount process %d: descriptor %d is %q, want /dev/null", pid, fd, at[fd])
		}
	}
	for fd, target := range at {
		if theirs[target] {
			t.Errorf("mount process %d: descriptor %d is %s, its caller's", pid, fd, target)
		}
	}
	if cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid)); err != nil || cwd != "/" {
		t.Errorf("mount process %d: working directory %q (%v), want /", pid, cwd, err)
	}
	files := func(fds map[int]string) map[int]string {
		out := map[int]string{}
		for fd, target := range fds {
			if strings.HasPrefix(target, "/") {
				out[fd] = target
			}
		}
		return out
	}
	atFiles := files(at)
	return func() {
		t.Helper()
		now := files(daemonFDs(t, pid))
		for fd, target := range now {
			if atFiles[fd] != target {
				t.Errorf("mount process %d: descriptor %d is %s before unmount, %q at mount", pid, fd, target, atFiles[fd])
			}
		}
		for fd, target := range atFiles {
			if _, ok := now[fd]; !ok {
				t.Errorf("mount process %d: descriptor %d (%s) closed since the mount", pid, fd, target)
			}
		}
	}
}

// findmntOptions returns the mount options the kernel shows for dir.
func findmntOptions(t testing.TB, dir string) []string {
	t.Helper()
	return strings.Split(strings.TrimSpace(mustRun(t, "findmnt", "-no", "OPTIONS", dir)), ",")
}

// statOf returns mode bits, owner, group and links of path as "0600 123:45 n1".
func statOf(t testing.TB, path string) string {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%04o %d:%d n%d", st.Mode&0o7777, st.Uid, st.Gid, st.Nlink)
}

// TestMountHelper: `mount -t fuse.vhdfs` and an fstab line (through `mount -T`)
// run vhdfs the way mount.fuse3 does (`vhdfs IMAGE MNT -o OPTS`), with the generic
// and systemd options ignored and vhdfs's own ones applied. mount(8) gives its
// helpers no PATH, so mount.fuse3's shell looks vhdfs up in the default one: the
// mounts run in a mount namespace of their own where the test binary sits in
// /usr/local/sbin.
func TestMountHelper(t *testing.T) {
	requireTool(t, "mount.fuse3")
	forEachFormat(t, func(t *testing.T, format string) {
		ro := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 4, Seed: 111})
		rw := makeChain(t, chainOptions{Format: format, Depth: 1, Create: []string{"--size", "8M"}, Writes: 4, Seed: 112})
		dir := t.TempDir()
		bin := filepath.Join(dir, "bin")
		m1, m2 := filepath.Join(dir, "m1"), filepath.Join(dir, "m2")
		for _, d := range []string{bin, m1, m2} {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Symlink(vhdfsBin, filepath.Join(bin, "vhdfs")); err != nil {
			t.Fatal(err)
		}
		fstab := filepath.Join(dir, "fstab")
		line := fmt.Sprintf("%s %s fuse.vhdfs rw,noauto,nofail,_netdev,x-systemd.automount,x-systemd.idle-timeout=30,uid=321,umask=077 0 0\n", rw.Top(), m2)
		if err := os.WriteFile(fstab, []byte(line), 0o644); err != nil {
			t.Fatal(err)
		}
		script := `set -e
trap 'for m in "$M1" "$M2"; do if mountpoint -q "$m"; then vhdfs umount "$m" || fusermount3 -u -z "$m"; fi; done' EXIT
mount --bind "$BIN" /usr/local/sbin
mount -t fuse.vhdfs -o ro,allow_other,noauto,nofail,_netdev,x-systemd.automount,uid=123,gid=45 "$RO" "$M1"
mount -T "$FSTAB" "$M2"
for m in "$M1" "$M2"; do
	echo "type $(findmnt -no FSTYPE "$m")"
	echo "options $(findmnt -no OPTIONS "$m")"
	echo "disk $(stat -c '%a %u:%g' "$m/disk.raw")"
	echo "pid $(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$m/control")"
	n=$(basename "$(findmnt -no SOURCE "$m")")
	cmp "$m/disk.raw" "$m/layers/0-${n%.*}.raw"
done
echo ready
read go
vhdfs umount "$M1"
vhdfs umount "$M2"
echo unmounted
`
		cmd := exec.Command("/bin/sh", "-c", script)
		cmd.Env = append(os.Environ(), "BIN="+bin, "M1="+m1, "M2="+m2, "RO="+ro.Top(), "FSTAB="+fstab)
		cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var pids []int
		t.Cleanup(func() {
			for _, pid := range pids {
				syscall.Kill(pid, syscall.SIGKILL) // the namespace, and its mounts, end with them
			}
		})
		sc := bufio.NewScanner(stdout)
		var got []string
		for sc.Scan() && sc.Text() != "ready" {
			got = append(got, sc.Text())
			if p, ok := strings.CutPrefix(sc.Text(), "pid "); ok {
				if pid, err := strconv.Atoi(p); err == nil {
					pids = append(pids, pid)
				}
			}
		}
		var checks []func()
		for _, pid := range pids {
			checks = append(checks, checkDaemonFDs(t, pid, cmd.Process.Pid))
		}
		for _, c := range checks {
			c()
		}
		io.WriteString(stdin, "go\n")
		stdin.Close()
		rest, _ := io.ReadAll(stdout)
		if err := cmd.Wait(); err != nil || strings.TrimSpace(string(rest)) != "unmounted" {
			t.Fatalf("mount -t fuse.vhdfs / mount -T: %v\nstdout: %s\n%s\nstderr: %s", err, strings.Join(got, "\n"), rest, stderr.String())
		}
		if len(pids) != 2 {
			t.Fatalf("mount process IDs: %v\n%s", pids, strings.Join(got, "\n"))
		}
		want := map[int][]string{0: {"ro", "allow_other"}, 1: {"rw"}}
		disks := []string{"444 123:45", "600 321:0"}
		for i := range 2 {
			lines := got[i*4 : i*4+4]
			if lines[0] != "type fuse.vhdfs" {
				t.Errorf("mount %d: %s, want fuse.vhdfs", i+1, lines[0])
			}
			opts := strings.Split(strings.TrimPrefix(lines[1], "options "), ",")
			for _, w := range want[i] {
				if !slices.Contains(opts, w) {
					t.Errorf("mount %d: options %v lack %s", i+1, opts, w)
				}
			}
			if i == 1 && slices.Contains(opts, "ro") {
				t.Errorf("fstab mount: options %v, want rw", opts)
			}
			if lines[2] != "disk "+disks[i] {
				t.Errorf("mount %d: disk.raw %s, want %s", i+1, lines[2], disks[i])
			}
		}
		for _, pid := range pids {
			waitDead(t, pid)
		}
		mCheck(t, ro.Top())
		mCheck(t, rw.Top())
	})
}

// TestMountOwnerAndMode: disk.raw, control and layers/ take the owner and mode bits
// of the top image (layers/ and a read-only mount without the write bits), or those
// uid=, gid= and umask= give; chmod and chown fail with EPERM; a 0600 image stays
// unreadable to another user under allow_other; the kernel's ro flag follows -r.
func TestMountOwnerAndMode(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 4, Seed: 113})
		if err := os.Chown(c.Top(), 123, 45); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(c.Top(), 0o600); err != nil {
			t.Fatal(err)
		}
		layer := filepath.Join("layers", mLayerName(0, c.Top()))
		for _, tc := range []struct {
			name  string
			flags []string
			want  map[string]string // by path in the mount
			ro    bool
		}{
			{"the image's", nil, map[string]string{
				".": "0700 123:45 n4", "disk.raw": "0600 123:45 n1", "control": "0600 123:45 n1",
				"layers": "0500 123:45 n2", layer: "0400 123:45 n1"}, false},
			{"read-only", []string{"-r"}, map[string]string{"disk.raw": "0400 123:45 n1", "control": "0400 123:45 n1"}, true},
			{"-o ro", []string{"-o", "ro"}, map[string]string{"disk.raw": "0400 123:45 n1"}, true},
			{"uid and gid", []string{"-o", "uid=7,gid=8"}, map[string]string{"disk.raw": "0600 7:8 n1", "layers": "0500 7:8 n2"}, false},
			{"umask", []string{"-o", "umask=027"}, map[string]string{
				".": "0750 123:45 n4", "disk.raw": "0640 123:45 n1", "layers": "0550 123:45 n2", layer: "0440 123:45 n1"}, false},
			{"all three as flags", []string{"--uid=0", "--gid=0", "--umask=022"}, map[string]string{"disk.raw": "0644 0:0 n1"}, false},
		} {
			t.Run(tc.name, func(t *testing.T) {
				mnt := mountEnv(t, c.Top(), nil, tc.flags...)
				check := checkDaemonFDs(t, readMergeStatus(t, mnt).PID)
				for p, w := range tc.want {
					if got := statOf(t, filepath.Join(mnt, p)); got != w {
						t.Errorf("%s: %s, want %s", p, got, w)
					}
				}
				if opts := findmntOptions(t, mnt); slices.Contains(opts, "ro") != tc.ro {
					t.Errorf("findmnt options %v, want ro=%v", opts, tc.ro)
				}
				for _, p := range []string{"disk.raw", "control", "layers", layer, "."} {
					// On a read-only mount the kernel answers EROFS before asking vhdfs.
					refused := func(err error) bool { return errors.Is(err, syscall.EPERM) || tc.ro && errors.Is(err, syscall.EROFS) }
					if err := os.Chmod(filepath.Join(mnt, p), 0o666); !refused(err) {
						t.Errorf("chmod %s: %v, want EPERM", p, err)
					}
					if err := os.Chown(filepath.Join(mnt, p), 1, 1); !refused(err) {
						t.Errorf("chown %s: %v, want EPERM", p, err)
					}
				}
				check()
				mustVhdfs(t, "umount", mnt)
			})
		}
		t.Run("0600 under allow_other", func(t *testing.T) {
			mnt := mountEnv(t, c.Top(), nil, "-o", "allow_other")
			for d := filepath.Dir(mnt); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
				if err := os.Chmod(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			cmd := exec.Command("head", "-c", "512", filepath.Join(mnt, "disk.raw"))
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "ermission denied") {
				t.Errorf("another user reading a 0600 image's disk.raw: %q, %v; want permission denied", out, err)
			}
			mustVhdfs(t, "umount", mnt)
		})
		mCheck(t, c.Top())
	})
}

// TestMountReadOnlyMedia: an image on a read-only file system mounts read-only, with
// one warning line, as ntfs-3g does, and the kernel's ro flag.
func TestMountReadOnlyMedia(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 4, Seed: 114})
		ro := filepath.Join(t.TempDir(), "ro")
		if err := os.Mkdir(ro, 0o755); err != nil {
			t.Fatal(err)
		}
		mustRun(t, "mount", "--bind", c.Dir, ro)
		t.Cleanup(func() {
			if out, err := exec.Command("umount", ro).CombinedOutput(); err != nil {
				t.Errorf("umount %s: %v: %s", ro, err, out)
			}
		})
		mustRun(t, "mount", "-o", "remount,bind,ro", ro)
		mnt := mMountpoint(t)
		unmountOnCleanup(t, mnt)
		top := filepath.Join(ro, filepath.Base(c.Top()))
		out, errs, code := vhdfs(t, "mount", top, mnt)
		if code != 0 {
			t.Fatalf("mount of an image on read-only media: exit %d: %s%s", code, out, errs)
		}
		assertOneLineError(t, errs, "warning", top, "read-only file system", "mounting read-only")
		if opts := findmntOptions(t, mnt); !slices.Contains(opts, "ro") {
			t.Errorf("findmnt options %v, want ro", opts)
		}
		assertSameBytes(t, "disk.raw", fileBytes(t, filepath.Join(mnt, "disk.raw")), c.Model())
		mustVhdfs(t, "umount", mnt)
	})
}

// TestMountDaemon: the background process holds none of its caller's descriptors
// (`vhdfs mount ... 2>&1 | cat` returns), sits in /, refuses a non-empty mount
// point unless nonempty, tells a startup failure's cause (fusermount3's words), and
// `--debug` (which implies -f) keeps serving after its stderr's reader is gone.
func TestMountDaemon(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 4, Seed: 115})
		t.Run("piped", func(t *testing.T) {
			mnt := mMountpoint(t)
			unmountOnCleanup(t, mnt)
			cmd := exec.Command("/bin/sh", "-c", `"$0" mount "$1" "$2" 2>&1 | cat`, vhdfsBin, c.Top(), mnt)
			if out, err := cmd.CombinedOutput(); err != nil || len(out) != 0 {
				t.Fatalf("vhdfs mount | cat: %q, %v", out, err)
			}
			pid := readMergeStatus(t, mnt).PID
			check := checkDaemonFDs(t, pid)
			assertSameBytes(t, "disk.raw", fileBytes(t, filepath.Join(mnt, "disk.raw")), c.Model())
			check()
			mustVhdfs(t, "umount", mnt)
		})
		t.Run("non-empty mount point", func(t *testing.T) {
			mnt := mMountpoint(t)
			unmountOnCleanup(t, mnt)
			if err := os.WriteFile(filepath.Join(mnt, "file"), nil, 0o644); err != nil {
				t.Fatal(err)
			}
			_, errs, code := vhdfs(t, "mount", c.Top(), mnt)
			if code != 1 {
				t.Errorf("mount on a non-empty directory: exit %d, want 1", code)
			}
			assertOneLineError(t, errs, mnt, "not empty", "nonempty")
			mustVhdfs(t, "mount", "-o", "nonempty", c.Top(), mnt)
			mustVhdfs(t, "umount", mnt)
		})
		t.Run("fusermount3's reason", func(t *testing.T) {
			// Another user, on a mount point it may not write: fusermount3 refuses, and
			// says why only on its stderr. The image is the user's to read, not to write.
			dir := t.TempDir()
			os.Chmod(dir, 0o755)
			for d := filepath.Dir(dir); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
				os.Chmod(d, 0o755)
			}
			if err := os.Chmod(filepath.Dir(vhdfsBin), 0o755); err != nil {
				t.Fatal(err)
			}
			mnt := filepath.Join(dir, "mnt")
			if err := os.Mkdir(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			unmountOnCleanup(t, mnt)
			img := createBase(t, dir, format, 0, "a", "--size", "1M")
			os.Chmod(img, 0o644)
			cmd := exec.Command(vhdfsBin, "mount", img, mnt)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			cmd.Env = append(os.Environ(), "XDG_RUNTIME_DIR=")
			var stderr strings.Builder
			cmd.Stderr = &stderr
			err := cmd.Run()
			if err == nil {
				t.Fatalf("another user mounting on root's directory succeeded")
			}
			lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
			if len(lines) != 2 || !strings.Contains(lines[0], "warning") || !strings.Contains(lines[0], "mounting read-only") ||
				!strings.Contains(lines[1], "fusermount3:") {
				t.Errorf("stderr, want the read-only warning, then the error with fusermount3's reason:\n%s", stderr.String())
			}
		})
		t.Run("debug output closed", func(t *testing.T) {
			mnt := mMountpoint(t)
			unmountOnCleanup(t, mnt)
			cmd := exec.Command("/bin/sh", "-c", `"$0" mount --debug "$1" "$2" 2>&1 | head -c 200`, vhdfsBin, c.Top(), mnt)
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// head has its 200 bytes once the mount serves requests; then only the mount
			// process, in the foreground, keeps the pipeline going.
			if _, err := io.ReadFull(out, make([]byte, 200)); err != nil {
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatalf("reading 200 bytes of debug output: %v", err)
			}
			done := make(chan error, 1)
			go func() {
				io.Copy(io.Discard, out)
				done <- cmd.Wait()
			}()
			// The -f process says nothing when it is ready: wait for the mount.
			deadline := time.Now().Add(30 * time.Second)
			for delay := time.Millisecond; !mountedAt(t, mnt); delay = min(2*delay, 50*time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("vhdfs mount --debug: not mounted after 30s")
				}
				time.Sleep(delay)
			}
			pid := readMergeStatus(t, mnt).PID
			for i := 0; i < 3; i++ {
				assertSameBytes(t, "disk.raw", fileBytes(t, filepath.Join(mnt, "disk.raw")), c.Model())
			}
			if err := syscall.Kill(pid, 0); err != nil {
				t.Fatalf("mount process died once its stderr was gone: %v", err)
			}
			mustVhdfs(t, "umount", mnt)
			if err := <-done; err != nil {
				t.Errorf("vhdfs mount --debug | head: %v", err)
			}
		})
		mCheck(t, c.Top())
	})
}

// TestUmountAborted: `vhdfs umount` removes a mount whose connection was aborted
// (ECONNABORTED, not ENOTCONN), as it does a mount whose process died.
func TestUmountAborted(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		conns := "/sys/fs/fuse/connections"
		if _, err := os.Stat(filepath.Join(conns, "..", "connections")); err != nil {
			t.Fatal(err)
		}
		if ents, _ := os.ReadDir(conns); len(ents) == 0 && !mountedAt(t, conns) {
			mustRun(t, "mount", "-t", "fusectl", "fusectl", conns)
			t.Cleanup(func() { exec.Command("umount", conns).Run() })
		}
		c := makeChain(t, chainOptions{Format: format, Depth: 1, Create: []string{"--size", "8M"}, Writes: 2, Seed: 116})
		mnt := mountEnv(t, c.Top(), nil)
		pid := readMergeStatus(t, mnt).PID
		var st syscall.Stat_t
		if err := syscall.Stat(mnt, &st); err != nil {
			t.Fatal(err)
		}
		abort := filepath.Join(conns, strconv.FormatUint(uint64(st.Dev&0xff|(st.Dev>>12)&0xfff00), 10), "abort")
		if err := os.WriteFile(abort, []byte("1"), 0); err != nil {
			t.Fatal(err)
		}
		_, err := os.ReadFile(filepath.Join(mnt, "control"))
		if !errors.Is(err, syscall.ECONNABORTED) && !errors.Is(err, syscall.ENOTCONN) {
			t.Fatalf("control after the abort: %v, want ECONNABORTED", err)
		}
		t.Logf("control after the abort: %v", err)
		mustVhdfs(t, "umount", mnt)
		if mountedAt(t, mnt) {
			t.Fatalf("%s still mounted after vhdfs umount", mnt)
		}
		waitDead(t, pid)
		mCheck(t, c.Top())
	})
}
