package test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ctlDeadline bounds every control command of the matrix: a merge of these small
// chains takes well under a second, a refusal less.
const ctlDeadline = 60 * time.Second

// ctlResult is what one command of the matrix did, from a child process.
type ctlResult struct {
	cmd   string
	errno syscall.Errno
	out   string // a status read's JSON
	err   error  // the child failed otherwise, or ran past the deadline
}

// ctlChild runs one control command (or, for "status", a read of control) from a
// child process, so that a wedged mount holds a child in D state, not the test. Past
// ctlDeadline it kills the mount process pid, which ends the child's request, and
// reports the deadline.
func ctlChild(mnt, cmd string, pid int) ctlResult {
	path := filepath.Join(mnt, "control")
	var c *exec.Cmd
	if cmd == "status" {
		c = exec.Command("cat", path)
	} else {
		// dd writes the line in one write(2), as echo does, and names the errno
		// the write got.
		c = exec.Command("/bin/sh", "-c", `printf '%s\n' "$1" | dd of="$2" bs=4096 status=none`, "sh", cmd, path)
	}
	var out, errb strings.Builder
	c.Stdout, c.Stderr = &out, &errb
	if err := c.Start(); err != nil {
		return ctlResult{cmd: cmd, err: err}
	}
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	select {
	case err := <-done:
		r := ctlResult{cmd: cmd, out: out.String()}
		if err != nil {
			r.errno = errnoOfShell(errb.String())
			if r.errno == 0 {
				r.err = fmt.Errorf("%v: %s", err, errb.String())
			}
		}
		return r
	case <-time.After(ctlDeadline):
		syscall.Kill(pid, syscall.SIGKILL)
		<-done
		return ctlResult{cmd: cmd, err: fmt.Errorf("no answer within %v (mount process killed)", ctlDeadline)}
	}
}

// errnoOfShell maps the shell's message for a failed write to its errno.
func errnoOfShell(msg string) syscall.Errno {
	for _, e := range []syscall.Errno{syscall.EBUSY, syscall.EINVAL, syscall.ECANCELED, syscall.EEXIST, syscall.EROFS,
		syscall.EIO, syscall.EACCES, syscall.EINTR, syscall.ENOSPC, syscall.ENOTCONN} {
		if strings.Contains(strings.ToLower(msg), strings.ToLower(e.Error())) {
			return e
		}
	}
	return 0
}

// TestControlMatrix: every pair of control commands, written at the same time from
// two processes, round after round on one mount: each returns within the deadline
// with one of its documented results, the view of disk.raw never changes, and the
// mount unmounts at the end. Before the control state had one owner, a snapshot
// refused while a merge ran deadlocked the mount.
func TestControlMatrix(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "16M"}, Writes: 8, Seed: 171})
		mnt := mountEnv(t, c.Top(), nil)
		pid := readMergeStatus(t, mnt).PID
		disk := filepath.Join(mnt, "disk.raw")
		model := append([]byte(nil), c.Model()...)
		gen := newWriteGen(172, c.Size, 4096, 512<<10)
		snaps := 0
		snapName := func() string {
			snaps++
			return imageName(format, fmt.Sprintf("s%03d", snaps), true)
		}
		// The documented results of each command.
		allowed := map[string][]syscall.Errno{
			"merge":         {0, syscall.EBUSY, syscall.ECANCELED},
			"merge depth=2": {0, syscall.EBUSY, syscall.EINVAL, syscall.ECANCELED},
			"merge from=1":  {0, syscall.EBUSY, syscall.EINVAL, syscall.ECANCELED},
			"abort":         {0},
			"sync":          {0},
			"snapshot":      {0, syscall.EBUSY},
			"status":        {0},
		}
		cmds := []string{"merge", "merge depth=2", "merge from=1", "abort", "sync", "snapshot", "status"}
		rounds := 0
		for range 2 {
			for i, a := range cmds {
				for _, b := range cmds[i:] {
					rounds++
					// Something for the merges to copy, and a chain deep enough for
					// every merge: snapshots between rounds, one at a time.
					writeRaw(t, disk, model, gen.writes(2))
					for len(readMergeStatus(t, mnt).Chain) < 5 {
						if e := control(mnt, "snapshot "+snapName()); e != 0 {
							t.Fatalf("round %d: snapshot to deepen the chain: %v", rounds, e)
						}
						writeRaw(t, disk, model, gen.writes(1))
					}
					var wg sync.WaitGroup
					res := make([]ctlResult, 2)
					for k, cmd := range []string{a, b} {
						line := cmd
						if cmd == "snapshot" {
							line = "snapshot " + snapName()
						}
						wg.Add(1)
						go func() {
							defer wg.Done()
							res[k] = ctlChild(mnt, line, pid)
						}()
					}
					wg.Wait()
					for k, r := range res {
						cmd := []string{a, b}[k]
						if r.err != nil {
							t.Fatalf("round %d (%s | %s): %s: %v", rounds, a, b, r.cmd, r.err)
						}
						if !slices.Contains(allowed[cmd], r.errno) {
							t.Errorf("round %d (%s | %s): %s: %v, want one of %v", rounds, a, b, r.cmd, r.errno, allowed[cmd])
						}
						if cmd == "status" {
							var st mergeStatus
							if err := json.Unmarshal([]byte(r.out), &st); err != nil || st.PID != pid {
								t.Errorf("round %d: status: %v, %q", rounds, err, r.out)
							}
						}
					}
					if a == b && a == "merge" && res[0].errno != 0 && res[1].errno != 0 {
						t.Errorf("round %d: two merges at once: neither ran (%v, %v)", rounds, res[0].errno, res[1].errno)
					}
					if st := readMergeStatus(t, mnt); st.State != "idle" {
						t.Errorf("round %d: state %q after both commands returned, want idle", rounds, st.State)
					}
					if got := fileBytes(t, disk); md5Of(got) != md5Of(model) {
						t.Fatalf("round %d (%s | %s): disk.raw changed", rounds, a, b)
					}
				}
			}
		}
		top := readMergeStatus(t, mnt).Chain[0].Path
		mustVhdfs(t, "umount", mnt)
		waitDead(t, pid)
		mCheck(t, top)
	})
}

// TestControlAuthority: uid=, gid= and umask= give others disk.raw, never control,
// which stays the top image's owner's; a snapshot is made only beside the top image,
// as a new file (never over one, never through a symlink), owned like the top and
// with its mode, and named for the chain's format.
func TestControlAuthority(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 4, Seed: 173})
		for d := c.Dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
			if err := os.Chmod(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		// The top and its directory are user 123's: the snapshots below, written by
		// root, are made with that user's authority (TestControlOwnerAuthority).
		for _, p := range []string{c.Top(), c.Dir} {
			if err := os.Chown(p, 123, 45); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Chmod(c.Top(), 0o640); err != nil {
			t.Fatal(err)
		}
		mnt := mountEnv(t, c.Top(), nil, "-o", "allow_other,uid=65534,gid=65534")
		for d := filepath.Dir(mnt); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
			if err := os.Chmod(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if got := statOf(t, filepath.Join(mnt, "control")); got != "0640 123:45 n1" {
			t.Errorf("control: %s, want the top image's 0640 123:45 n1", got)
		}
		asNobody := func(script string, args ...string) (string, error) {
			cmd := exec.Command("/bin/sh", append([]string{"-c", script, "sh"}, args...)...)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		// The uid= user reads and writes disk.raw ...
		if out, err := asNobody(`printf 'nobody was here' | dd of="$1" bs=512 seek=3 conv=notrunc status=none && head -c 1551 "$1" | tail -c 15`, filepath.Join(mnt, "disk.raw")); err != nil || out != "nobody was here" {
			t.Errorf("uid= user writing and reading disk.raw: %q, %v", out, err)
		}
		// ... and may start no command.
		outside := filepath.Join(t.TempDir(), "x.vhd")
		for _, cmd := range []string{"snapshot " + outside, "merge", "sync"} {
			if out, err := asNobody(`printf '%s\n' "$1" > "$2"`, cmd, filepath.Join(mnt, "control")); err == nil || !strings.Contains(out, "ermission denied") {
				t.Errorf("uid= user writing %q to control: %v %q, want permission denied", cmd, err, out)
			}
		}
		if _, err := os.Lstat(outside); err == nil {
			t.Errorf("the uid= user's snapshot made %s", outside)
		}
		// Root's snapshot names: only beside the top, only new files.
		other := t.TempDir()
		victim := filepath.Join(c.Dir, "victim")
		if err := os.WriteFile(victim, []byte("keep me"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(other, "through-link"+filepath.Ext(c.Top())), filepath.Join(c.Dir, "link"+filepath.Ext(c.Top()))); err != nil {
			t.Fatal(err)
		}
		wrong := map[string]string{"vhd": "x.vhdx", "vhdx": "x.vhd"}[format]
		for _, tc := range []struct {
			name string
			want syscall.Errno
		}{
			{filepath.Join(other, "x"+filepath.Ext(c.Top())), syscall.EINVAL},
			{"../x" + filepath.Ext(c.Top()), syscall.EINVAL},
			{"sub/x" + filepath.Ext(c.Top()), syscall.EINVAL},
			{"victim", syscall.EEXIST},
			{"link" + filepath.Ext(c.Top()), syscall.EEXIST},
			{wrong, syscall.EINVAL},
			{"..", syscall.EINVAL},
		} {
			if e := control(mnt, "snapshot "+tc.name); e != tc.want {
				t.Errorf("snapshot %s: %v, want %v (%+v)", tc.name, e, tc.want, readMergeStatus(t, mnt).Last)
			}
		}
		if b, err := os.ReadFile(victim); err != nil || string(b) != "keep me" {
			t.Errorf("victim after the refused snapshot: %q, %v", b, err)
		}
		if ents, _ := os.ReadDir(other); len(ents) != 0 {
			t.Errorf("refused snapshots made files in %s: %v", other, ents)
		}
		if len(readMergeStatus(t, mnt).Chain) != 2 {
			t.Fatalf("a refused snapshot changed the chain: %+v", readMergeStatus(t, mnt).Chain)
		}
		// A path that names the top's own directory is taken for its base name.
		snap := filepath.Join(c.Dir, imageName(format, "snap", true))
		if e := control(mnt, "snapshot "+snap); e != 0 {
			t.Fatalf("snapshot %s: %v (%+v)", snap, e, readMergeStatus(t, mnt).Last)
		}
		if got := statOf(t, snap); got != "0640 123:45 n1" {
			t.Errorf("the snapshot: %s, want the top's 0640 123:45 n1", got)
		}
		mustVhdfs(t, "umount", mnt)
		mCheck(t, snap)
	})
}

// TestWriteProtected: an image file with no write bits is evidence: root's plain
// mount, and a mount as mount(8) runs it (with rw), are read-only, with one line,
// and writes change nothing; -o force_rw mounts it read-write. merge, relink and
// check --repair refuse to write such a file unless --force-rw.
func TestWriteProtected(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 4, Seed: 174})
		for _, p := range c.Images {
			if err := os.Chmod(p, 0o444); err != nil {
				t.Fatal(err)
			}
		}
		before := snapshotFiles(t, c.Images...)
		for _, tc := range []struct {
			name string
			args func(mnt string) []string
		}{
			{"vhdfs mount", func(mnt string) []string { return []string{"mount", c.Top(), mnt} }},
			{"as mount.fuse3 runs it", func(mnt string) []string { return []string{c.Top(), mnt, "-o", "rw,noauto,dev,suid"} }},
		} {
			t.Run(tc.name, func(t *testing.T) {
				mnt := mMountpoint(t)
				unmountOnCleanup(t, mnt)
				_, errs, code := vhdfs(t, tc.args(mnt)...)
				if code != 0 {
					t.Fatalf("mount: exit %d: %s", code, errs)
				}
				assertOneLineError(t, errs, c.Top(), "no write bits", "read-only", "force_rw")
				if opts := findmntOptions(t, mnt); !slices.Contains(opts, "ro") {
					t.Errorf("findmnt options %v, want ro", opts)
				}
				f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_WRONLY, 0)
				if err == nil {
					_, err = f.WriteAt([]byte("changed"), 0)
					f.Close()
				}
				if err == nil {
					t.Errorf("a write to disk.raw of a write-protected image succeeded")
				}
				mustVhdfs(t, "umount", mnt)
				assertUnchanged(t, before)
			})
		}
		for _, args := range [][]string{
			{"merge", c.Top()},
			{"relink", c.Top(), c.Images[0]},
			{"check", "--repair", c.Top()},
		} {
			_, errs, code := vhdfs(t, args...)
			if args[0] == "check" {
				// Nothing to repair: check writes nothing, and says the chain is fine.
				if code != 0 {
					t.Errorf("%v: exit %d: %s", args, code, errs)
				}
				continue
			}
			if code == 0 || !strings.Contains(errs, "no write bits") || !strings.Contains(errs, "--force-rw") {
				t.Errorf("%v on write-protected images: exit %d, %q; want a refusal naming --force-rw", args, code, errs)
			}
			assertUnchanged(t, before)
		}
		// Said explicitly, the same images are written.
		mnt := mMountpoint(t)
		unmountOnCleanup(t, mnt)
		mustVhdfs(t, "mount", "-o", "force_rw", c.Top(), mnt)
		if opts := findmntOptions(t, mnt); slices.Contains(opts, "ro") {
			t.Errorf("-o force_rw: findmnt options %v, want rw", opts)
		}
		model := append([]byte(nil), c.Model()...)
		writeRaw(t, filepath.Join(mnt, "disk.raw"), model, []write{{Off: 4096, Data: []byte("force_rw wrote this")}})
		mustVhdfs(t, "umount", mnt)
		mustVhdfs(t, "merge", "--force-rw", c.Top())
		if got := mMountRead(t, c.Top()); md5Of(got) != md5Of(model) {
			t.Errorf("after the forced write and merge: the chain does not read as the model")
		}
		// A writable top on a write-protected target: the mount is read-write, and a
		// merge into the target is refused as a write to a read-only file (EROFS),
		// with the reason in the status.
		if err := os.Chmod(c.Top(), 0o644); err != nil {
			t.Fatal(err)
		}
		mustVhdfs(t, "mount", c.Top(), mnt)
		writeRaw(t, filepath.Join(mnt, "disk.raw"), model, []write{{Off: 8192, Data: []byte("into the top")}})
		target := snapshotFiles(t, c.Images[0])
		if e := control(mnt, "merge"); e != syscall.EROFS {
			t.Errorf("merge into a write-protected target: %v, want EROFS (%+v)", e, readMergeStatus(t, mnt).Last)
		}
		if last := readMergeStatus(t, mnt).Last; !strings.Contains(fmt.Sprint(last), "no write bits") {
			t.Errorf("the status after the refused merge: %+v, want the reason", last)
		}
		mustVhdfs(t, "umount", mnt)
		assertUnchanged(t, target)
		if got := mMountRead(t, c.Top()); md5Of(got) != md5Of(model) {
			t.Errorf("after the refused merge: the chain does not read as the model")
		}
	})
}

// writeRaw writes ws into the raw file at path (a mount's disk.raw), fsyncs it, and
// applies the same writes to model.
func writeRaw(t testing.TB, path string, model []byte, ws []write) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, w := range ws {
		if _, err := f.WriteAt(w.Data, w.Off); err != nil {
			t.Fatalf("%s: write %v: %v", path, w, err)
		}
		copy(model[w.Off:], w.Data)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync %s: %v", path, err)
	}
}

// TestControlOwnerAuthority: a merge or snapshot written to control acts with the top
// image owner's authority, not the root mount process's: the owner of the top (who
// may write control) gets nothing done that the owner could not do. A link the owner
// puts where the merge writes its journal reaches no other file; a merge into a
// parent the owner cannot write is refused and changes nothing; a snapshot in a
// directory the owner cannot write is refused; one in the owner's directory is the
// owner's.
func TestControlOwnerAuthority(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		const user = 65534
		root := t.TempDir()
		for d := root; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
			if err := os.Chmod(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		mkdir := func(name string, uid int) string {
			d := filepath.Join(root, name)
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(d, uid, uid); err != nil {
				t.Fatal(err)
			}
			return d
		}
		shared, home := mkdir("shared", 0), mkdir("home", user)
		base := createBase(t, shared, format, 0, "base", "--size", "8M")
		top := filepath.Join(home, imageName(format, "top", true))
		mustVhdfs(t, append([]string{"create", "--parent", base}, childFormatArgs(format, top)...)...)
		if err := os.Chown(top, user, user); err != nil {
			t.Fatal(err)
		}
		victim := filepath.Join(shared, "victim")
		if err := os.WriteFile(victim, []byte("root's secret"), 0o600); err != nil {
			t.Fatal(err)
		}
		mnt := mountEnv(t, top, nil, "--allow-other")
		for d := filepath.Dir(mnt); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
			if err := os.Chmod(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		asUser := func(script string, args ...string) (string, error) {
			cmd := exec.Command("/bin/sh", append([]string{"-c", script, "sh"}, args...)...)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: user, Gid: user}}
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		st, err := os.Stat(filepath.Join(mnt, "disk.raw"))
		if err != nil {
			t.Fatal(err)
		}
		model := make([]byte, st.Size())
		if out, err := asUser(`printf 'written by the owner' | dd of="$1" bs=512 seek=8 conv=notrunc status=none`, filepath.Join(mnt, "disk.raw")); err != nil {
			t.Fatalf("the owner writing disk.raw: %v %s", err, out)
		}
		copy(model[4096:], "written by the owner")
		before := snapshotFiles(t, base, victim)
		journalTmp := top + ".vhdfs-journal.tmp"
		if err := os.Symlink(victim, journalTmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(journalTmp, user, user); err != nil {
			t.Fatal(err)
		}
		ctl := filepath.Join(mnt, "control")
		out, err := asUser(`printf 'merge\n' > "$1"`, ctl)
		if err == nil {
			t.Errorf("the owner's merge into root's parent succeeded: %s", out)
		}
		assertUnchanged(t, before)
		if st := readMergeStatus(t, mnt); len(st.Chain) != 2 || st.Last == nil || !strings.Contains(st.Last.Message, "permission denied") {
			t.Errorf("after the refused merge: chain %+v, last %+v; want the chain of two and a message naming the denied permission", st.Chain, st.Last)
		}
		// A snapshot where the owner may not create files: refused.
		if out, err := asUser(`printf 'snapshot %s\n' "$2" > "$1"`, ctl, filepath.Join(shared, "evil.conf")); err == nil {
			t.Errorf("the owner's snapshot in root's directory succeeded: %s", out)
		}
		// Root's snapshot of the owner's chain is made in the owner's directory, as
		// the owner.
		snap := filepath.Join(home, imageName(format, "snap", true))
		if out, err := asUser(`printf 'snapshot %s\n' "$2" > "$1"`, ctl, filepath.Base(snap)); err != nil {
			t.Fatalf("the owner's snapshot in its directory: %v %s (%+v)", err, out, readMergeStatus(t, mnt).Last)
		}
		if got := statOf(t, snap); !strings.HasSuffix(got, fmt.Sprintf("%d:%d n1", user, user)) {
			t.Errorf("the snapshot: %s, want the owner's", got)
		}
		if got := fileBytes(t, filepath.Join(mnt, "disk.raw")); md5Of(got) != md5Of(model) {
			t.Errorf("disk.raw changed")
		}
		mustVhdfs(t, "umount", mnt)
		assertUnchanged(t, before)
	})
}
