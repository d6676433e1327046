// Package test holds the end-to-end tests of vhdfs: they build the real binary once,
// run it as a child process on images made by vhdfs itself, by qemu-img and by hand,
// and compare what it shows with independent readers (qemu-img, libvhdi) and with an
// in-test model of the disk.
package test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// testVersion is stamped into the binary so `vhdfs version` can be checked exactly.
const testVersion = "e2e-test"

// cmdTimeout bounds every child process; a hang fails the test instead of stalling it.
const cmdTimeout = 2 * time.Minute

var (
	vhdfsBin   string // the binary TestMain built
	moduleRoot string // the directory holding go.mod
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	root, err := findModuleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "test:", err)
		return 1
	}
	moduleRoot = root
	dir, err := os.MkdirTemp("", "vhdfs-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "test:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if bin := os.Getenv("VHDFS_TEST_BIN"); bin != "" {
		// A binary built elsewhere (an older commit, to see a regression test fail).
		vhdfsBin = bin
	} else {
		vhdfsBin = filepath.Join(dir, "vhdfs")
		args := []string{"build", "-ldflags", "-X main.Version=" + testVersion, "-o", vhdfsBin}
		if raceEnabled {
			// The tests run the binary's concurrent code (export workers): race-check it too.
			args = append(args, "-race")
		}
		cmd := exec.Command(goTool(), append(args, "./cmd/vhdfs")...)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "test: go build ./cmd/vhdfs: %v\n%s", err, out)
			return 1
		}
	}
	stop, err := startStoppedNeighbour(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test: the stopped neighbour mount:", err)
		return 1
	}
	defer stop()
	return m.Run()
}

// neighbour is a vhdfs mount whose process is stopped (SIGSTOP) for the whole run,
// as a wedged mount of someone else's would be: no command on another image may
// touch it, and the suite must pass beside it.
var neighbour struct {
	image, mnt string
	pid        int
}

// startStoppedNeighbour mounts a small image of its own under dir and stops the
// mount process. stop continues it, unmounts it and waits for its end. A guard
// process does it, at stop or when the test binary dies without running stop (a
// timeout's panic): it waits for the end of a pipe only this process holds.
func startStoppedNeighbour(dir string) (stop func(), err error) {
	image := filepath.Join(dir, "neighbour.vhd")
	mnt := filepath.Join(dir, "neighbour")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		return nil, err
	}
	if out, err := exec.Command(vhdfsBin, "create", "--size", "8M", image).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("create: %v: %s", err, out)
	}
	if out, err := exec.Command(vhdfsBin, "mount", image, mnt).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("mount: %v: %s", err, out)
	}
	unmount := func() { exec.Command("fusermount3", "-u", mnt).Run() }
	b, err := os.ReadFile(filepath.Join(mnt, "control"))
	var st struct {
		PID int `json:"pid"`
	}
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	if err == nil && st.PID <= 0 {
		err = fmt.Errorf("no pid in the status: %s", b)
	}
	if err != nil {
		unmount()
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		unmount()
		return nil, err
	}
	// A reader that was waiting on the stopped mount may still hold a file of it
	// open for a moment after SIGCONT: the unmount is tried again for ten seconds,
	// then done lazily.
	guard := exec.Command("sh", "-c", `read x; kill -CONT "$1" 2>/dev/null
i=0
while grep -qs " $2 fuse.vhdfs " /proc/self/mounts && [ $i -lt 40 ]; do
	fusermount3 -u "$2" 2>/dev/null || sleep 0.25
	i=$((i+1))
done
fusermount3 -u -z "$2" 2>/dev/null
exit 0`, "guard", strconv.Itoa(st.PID), mnt)
	guard.Stdin = r
	if err := guard.Start(); err != nil {
		r.Close()
		w.Close()
		unmount()
		return nil, err
	}
	r.Close()
	if err := syscall.Kill(st.PID, syscall.SIGSTOP); err != nil {
		w.Close()
		guard.Wait()
		return nil, err
	}
	neighbour.image, neighbour.mnt, neighbour.pid = image, mnt, st.PID
	return func() {
		w.Close() // the guard continues the process and unmounts it
		guard.Wait()
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if err := syscall.Kill(st.PID, 0); err != nil {
				return
			}
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", st.PID)); err == nil && strings.Contains(string(b), ") Z ") {
				return
			}
		}
		fmt.Fprintf(os.Stderr, "test: the neighbour mount process %d did not end\n", st.PID)
	}, nil
}

var (
	plainOnce sync.Once
	plainBin  string
	plainErr  error
)

// plainBinary returns vhdfs built without the race detector, for the tests that
// measure memory or time: the detector multiplies both. Under a plain test run it is
// the binary under test.
func plainBinary(t testing.TB) string {
	t.Helper()
	if !raceEnabled {
		return vhdfsBin
	}
	plainOnce.Do(func() {
		plainBin = filepath.Join(filepath.Dir(vhdfsBin), "vhdfs-plain")
		cmd := exec.Command(goTool(), "build", "-ldflags", "-X main.Version="+testVersion, "-o", plainBin, "./cmd/vhdfs")
		cmd.Dir = moduleRoot
		if out, err := cmd.CombinedOutput(); err != nil {
			plainErr = fmt.Errorf("go build: %v: %s", err, out)
		}
	})
	if plainErr != nil {
		t.Fatal(plainErr)
	}
	return plainBin
}

// findModuleRoot walks up from the test's directory to the one holding go.mod.
func findModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the test directory")
		}
		dir = parent
	}
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if root := os.Getenv("GOROOT"); root != "" {
		return filepath.Join(root, "bin", "go")
	}
	return "go"
}

// run runs a program and returns its stdout, stderr and exit code. A program that
// cannot be started, or is killed by a signal or the timeout, fails the test.
func run(t testing.TB, name string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.Exited():
		code = ee.ExitCode()
	default:
		t.Fatalf("%s %s: %v (stderr: %s)", name, strings.Join(args, " "), err, errb.String())
	}
	return out.String(), errb.String(), code
}

// mustRun runs a program that must succeed and returns its stdout.
func mustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, errs, code := run(t, name, args...)
	if code != 0 {
		t.Fatalf("%s %s: exit %d\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), code, out, errs)
	}
	return out
}

// vhdfs runs the binary under test.
func vhdfs(t testing.TB, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	return run(t, vhdfsBin, args...)
}

// mustVhdfs runs the binary under test, which must succeed, and returns its stdout.
func mustVhdfs(t testing.TB, args ...string) string {
	t.Helper()
	return mustRun(t, vhdfsBin, args...)
}

// requireTool fails the test when an external program is missing: the tests never
// skip for want of a tool, `make deps` installs them all.
func requireTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s is not installed: run make deps", name)
	}
}

// fileBytes returns the contents of a file.
func fileBytes(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// md5file returns the hex MD5 of a file's contents.
func md5file(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := md5.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func sha256file(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// fileSnapshot records the SHA-256 of files: "absent" for a missing file and "dir"
// for a directory, whose files are entries of their own.
type fileSnapshot struct {
	roots []string
	sums  map[string]string
}

// snapshotFiles records the contents of files; a directory stands for every file
// under it, so a file that appears in it later shows up as a change too.
func snapshotFiles(t testing.TB, paths ...string) fileSnapshot {
	t.Helper()
	snap := fileSnapshot{roots: paths, sums: map[string]string{}}
	for _, p := range paths {
		st, err := os.Lstat(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			snap.sums[p] = "absent"
		case err != nil:
			t.Fatal(err)
		case st.IsDir():
			err := filepath.WalkDir(p, func(q string, d fs.DirEntry, err error) error {
				if err != nil {
					return err
				}
				if d.IsDir() {
					snap.sums[q] = "dir"
				} else {
					snap.sums[q] = sha256file(t, q)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		default:
			snap.sums[p] = sha256file(t, p)
		}
	}
	return snap
}

// assertUnchanged fails the test for every file whose contents differ from snap,
// and every file that appeared in or vanished from a snapshotted directory.
func assertUnchanged(t testing.TB, snap fileSnapshot) {
	t.Helper()
	now := snapshotFiles(t, snap.roots...)
	var diffs []string
	for p, v := range snap.sums {
		if w, ok := now.sums[p]; !ok {
			diffs = append(diffs, p+": gone")
		} else if w != v {
			diffs = append(diffs, fmt.Sprintf("%s: changed (%s → %s)", p, short(v), short(w)))
		}
	}
	for p := range now.sums {
		if _, ok := snap.sums[p]; !ok {
			diffs = append(diffs, p+": appeared")
		}
	}
	sort.Strings(diffs)
	for _, d := range diffs {
		t.Error(d)
	}
}

func short(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	return s
}

// assertOneLineError checks the stderr of a failed command: exactly one line, no
// panic or goroutine dump, and every want substring in it.
func assertOneLineError(t testing.TB, stderr string, want ...string) {
	t.Helper()
	if strings.Contains(stderr, "panic") || strings.Contains(stderr, "goroutine ") {
		t.Errorf("stderr holds a panic:\n%s", stderr)
		return
	}
	lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
	if len(lines) != 1 || lines[0] == "" || !strings.HasSuffix(stderr, "\n") {
		t.Errorf("stderr is %d lines, want exactly one:\n%s", len(lines), stderr)
	}
	for _, w := range want {
		if !strings.Contains(stderr, w) {
			t.Errorf("stderr %q does not contain %q", strings.TrimSpace(stderr), w)
		}
	}
}

// mountedAt reports whether dir is a mount point, from /proc/self/mountinfo.
func mountedAt(t testing.TB, dir string) bool {
	t.Helper()
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && unescapeMountinfo(fields[4]) == abs {
			return true
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return false
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of mountinfo fields.
func unescapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			ok := true
			for _, d := range s[i+1 : i+4] {
				if d < '0' || d > '7' {
					ok = false
					break
				}
				c = c*8 + byte(d-'0')
			}
			if ok {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountOnCleanup unmounts dir with fusermount3 when the test ends and fails the
// test if a mount is still there afterwards.
func unmountOnCleanup(t testing.TB, dir string) {
	t.Helper()
	t.Cleanup(func() {
		if mountedAt(t, dir) {
			if out, err := exec.Command("fusermount3", "-u", dir).CombinedOutput(); err != nil {
				t.Errorf("fusermount3 -u %s: %v: %s", dir, err, out)
			}
		}
		if mountedAt(t, dir) {
			t.Errorf("%s is still mounted after the test", dir)
		}
	})
}
