package test

import (
	"bytes"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// mergeStatus is the part of the control file's JSON the merge tests read.
type mergeStatus struct {
	PID      int    `json:"pid"`
	State    string `json:"state"`
	Progress *struct {
		Done  int64 `json:"done"`
		Total int64 `json:"total"`
	} `json:"progress"`
	Chain []struct {
		Path           string `json:"path"`
		Type           string `json:"type"`
		AllocatedBytes int64  `json:"allocated_bytes"`
	} `json:"chain"`
	Detached []string `json:"detached"`
	Last     *struct {
		Command string `json:"command"`
		Errno   int    `json:"errno"`
		Message string `json:"message"`
	} `json:"last"`
}

func readMergeStatus(t testing.TB, mnt string) mergeStatus {
	t.Helper()
	var st mergeStatus
	b, err := os.ReadFile(filepath.Join(mnt, "control"))
	if err != nil {
		t.Fatalf("read control: %v", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("control JSON: %v\n%s", err, b)
	}
	return st
}

// mountEnv mounts image at a new mount point with extra environment for the mount
// process (a failpoint) and extra mount flags; the mount goes at the end of the test.
func mountEnv(t testing.TB, image string, env []string, flags ...string) string {
	t.Helper()
	return mountEnvWith(t, vhdfsBin, image, env, flags...)
}

// mountEnvWith is mountEnv with another build of vhdfs.
func mountEnvWith(t testing.TB, bin, image string, env []string, flags ...string) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	unmountOnCleanup(t, mnt)
	cmd := exec.Command(bin, append(append([]string{"mount"}, flags...), image, mnt)...)
	cmd.Env = append(os.Environ(), env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("vhdfs mount %s: %v: %s", image, err, out)
	}
	// A test that fails while the merge is paused at a failpoint leaves the mount
	// process waiting on a FIFO; kill it before the unmount (cleanups run last first).
	pid := readMergeStatus(t, mnt).PID
	t.Cleanup(func() {
		if pid > 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	return mnt
}

// control writes one command to the control file and returns the errno (0 for success).
func control(mnt, cmd string) syscall.Errno {
	err := os.WriteFile(filepath.Join(mnt, "control"), []byte(cmd+"\n"), 0)
	var en syscall.Errno
	switch {
	case err == nil:
		return 0
	case errors.As(err, &en):
		return en
	}
	return syscall.EIO
}

func md5Of(b []byte) string {
	s := md5.Sum(b)
	return hex.EncodeToString(s[:])
}

// pausePoint makes the FIFOs for a "POINT:pause=DIR" failpoint and returns the
// environment entry, a function that waits until the merge is at the point, and one
// that lets it go on.
func pausePoint(t testing.TB, point string) (env string, reached, resume func()) {
	t.Helper()
	dir := t.TempDir()
	for _, n := range []string{"reached", "resume"} {
		if err := syscall.Mkfifo(filepath.Join(dir, n), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	reached = func() {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, "reached"))
		if err != nil || strings.TrimSpace(string(b)) != point {
			t.Fatalf("waiting for merge point %s: %q, %v", point, b, err)
		}
	}
	resume = func() {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, "resume"), []byte("go\n"), 0); err != nil {
			t.Fatalf("resume merge: %v", err)
		}
	}
	return "VHDFS_FAILPOINT=" + point + ":pause=" + dir, reached, resume
}

// TestMergeDepths merges depth 1, 2 and 3 of a 4-deep chain into differencing,
// dynamic and fixed targets, reading disk.raw before, during and after.
func TestMergeDepths(t *testing.T) {
	requireTool(t, "vhdimount")
	forEachFormat(t, func(t *testing.T, format string) {
		for _, base := range []string{"dynamic", "fixed"} {
			for depth := 1; depth <= 3; depth++ {
				target := "differencing"
				if depth == 3 {
					target = base
				}
				t.Run(fmt.Sprintf("depth %d into %s (base %s)", depth, target, base), func(t *testing.T) {
					c := makeChain(t, chainOptions{Format: format, Depth: 4, Create: []string{"--size", "24M", "--type", base}, Writes: 25, Seed: uint64(depth) * 7})
					want := md5Of(c.Model())
					top := c.Top()
					// Images[3] is the top; the target is depth levels down.
					targetPath := c.Images[3-depth]
					merged := c.Images[4-depth : 3] // merged away, left on disk
					below := c.Images[:3-depth]     // under the target, untouched
					// The merged-away images are untouched but for the one right above the
					// target, which records the target's interim unique ID.
					untouched := snapshotFiles(t, append(append([]string{}, merged[min(1, len(merged)):]...), below...)...)

					env, reached, resume := pausePoint(t, "copy-start")
					mnt := mountEnv(t, top, []string{env})
					disk := filepath.Join(mnt, "disk.raw")
					if got := md5Of(fileBytes(t, disk)); got != want {
						t.Fatalf("before merge: md5 %s, want %s", got, want)
					}
					done := make(chan syscall.Errno, 1)
					go func() { done <- control(mnt, fmt.Sprintf("merge depth=%d", depth)) }()
					reached()
					if st := readMergeStatus(t, mnt); st.State != "merging" {
						t.Errorf("state during merge is %q, want merging", st.State)
					}
					if got := md5Of(fileBytes(t, disk)); got != want {
						t.Errorf("during merge: md5 %s, want %s", got, want)
					}
					// Another command (the same one would join the running merge).
					if e := control(mnt, "merge from=1 depth=1"); e != syscall.EBUSY {
						t.Errorf("another merge while one runs: errno %v, want EBUSY", e)
					}
					resume()
					if e := <-done; e != 0 {
						t.Fatalf("merge depth=%d: %v: %+v", depth, e, readMergeStatus(t, mnt).Last)
					}
					if got := md5Of(fileBytes(t, disk)); got != want {
						t.Errorf("after merge: md5 %s, want %s", got, want)
					}
					st := readMergeStatus(t, mnt)
					// The new top sits on the target: 4 images less the depth-1 merged away.
					if st.State != "idle" || st.Last == nil || st.Last.Errno != 0 || len(st.Chain) != 5-depth {
						t.Errorf("status after merge: state %s, chain of %d (want %d), last %+v", st.State, len(st.Chain), 5-depth, st.Last)
					}
					if len(st.Chain) > 1 && st.Chain[1].Path != targetPath {
						t.Errorf("parent of the new top is %s, want the target %s", st.Chain[1].Path, targetPath)
					}
					if fmt.Sprint(st.Detached) != fmt.Sprint(reversed(merged)) && len(merged) > 0 {
						t.Errorf("detached %v, want %v", st.Detached, reversed(merged))
					}
					mustVhdfs(t, "umount", mnt)

					assertUnchanged(t, untouched)
					info := vhdfsInfo(t, top)
					if len(info.Layers) != 5-depth || info.Layers[1].Path != targetPath || info.Layers[0].AllocatedBytes != 0 {
						t.Errorf("info after merge: %+v", info)
					}
					assertFileEquals(t, exportImage(t, top), c.Model())
					// libvhdi 20210425 misreads a VHDX child block whose sector bitmap entry
					// is not present (it takes the bitmap from file offset 0), and the fresh
					// top a merge leaves has only such blocks: for VHDX it reads the target,
					// whose view is the same.
					libvhdiImage := top
					if format == "vhdx" {
						libvhdiImage = targetPath
					}
					assertFileEquals(t, vhdimountView(t, libvhdiImage), c.Model())
					if out, errs, code := vhdfs(t, "check", top); code != 0 {
						t.Errorf("check after merge: exit %d\n%s%s", code, out, errs)
					}
				})
			}
		}
	})
}

// vhdimountView mounts image with libvhdi's vhdimount and returns a copy of the view.
func vhdimountView(t testing.TB, image string) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "vhdi")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	unmountOnCleanup(t, mnt)
	mustRun(t, "vhdimount", image, mnt)
	// libvhdi 20210425 numbers the views from the base: vhdi1 is the base alone and
	// the highest number is the whole chain seen from image.
	ents, err := os.ReadDir(mnt)
	if err != nil || len(ents) == 0 {
		t.Fatalf("vhdimount %s: no views: %v", image, err)
	}
	out := filepath.Join(t.TempDir(), "vhdi.raw")
	mustRun(t, "cp", filepath.Join(mnt, fmt.Sprintf("vhdi%d", len(ents))), out)
	mustRun(t, "fusermount3", "-u", mnt)
	return out
}

// TestMergeNearestWins: one sector written in every layer, with a different byte;
// after merging everything into the base, the top's byte is what the disk shows.
func TestMergeNearestWins(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		// Sector 9 everywhere, sector 20+i only in layer i.
		c := makeChain(t, chainOptions{Format: format, Depth: 4, Create: []string{"--size", "8M"}, LayerWrites: func(i int) []write {
			return []write{{9 * 512, bytes.Repeat([]byte{byte(0x10 + i)}, 512)}, {int64(20+i) * 512, bytes.Repeat([]byte{byte(0x20 + i)}, 512)}}
		}})
		mustVhdfs(t, "merge", "--depth", "3", c.Top())
		got := fileBytes(t, exportImage(t, c.Top()))
		if got[9*512] != 0x13 {
			t.Errorf("sector 9 after merge holds %#x, want the top's 0x13", got[9*512])
		}
		assertSameBytes(t, "merged chain", got, c.Model())
		// The base now holds the merged data by itself.
		assertSameBytes(t, "base after merge", fileBytes(t, exportImage(t, c.Images[0])), c.Model())
	})
}

// TestMergeFromWhileWriting merges the middle of a 3-deep chain into the base while a
// writer keeps writing to disk.raw; the writes go on during the merge and are kept.
func TestMergeFromWhileWriting(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "32M"}, Writes: 30, Seed: 3})
		model := c.Model()
		top := c.Top()
		env, reached, resume := pausePoint(t, "copy-start")
		mnt := mountEnv(t, top, []string{env})
		disk := filepath.Join(mnt, "disk.raw")
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		gen := newWriteGen(99, c.Size, 4096, 64<<10)
		var mu sync.Mutex // guards model while the writer runs
		writeSome := func(n int) {
			for range n {
				w := gen.next()
				mu.Lock()
				if _, err := f.WriteAt(w.Data, w.Off); err != nil {
					mu.Unlock()
					t.Errorf("write %v: %v", w, err)
					return
				}
				copy(model[w.Off:], w.Data)
				mu.Unlock()
			}
		}
		writeSome(20)
		done := make(chan syscall.Errno, 1)
		go func() { done <- control(mnt, "merge from=1 depth=1") }()
		reached()
		// The merge is under way and the top takes writes meanwhile.
		writeSome(50)
		stop := make(chan struct{})
		writerDone := make(chan struct{})
		go func() {
			defer close(writerDone)
			for {
				select {
				case <-stop:
					return
				default:
					writeSome(1)
				}
			}
		}()
		resume()
		e := <-done
		close(stop)
		<-writerDone
		if e != 0 {
			t.Fatalf("merge from=1 depth=1: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		writeSome(20)
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		assertSameBytes(t, "disk.raw after merge", fileBytes(t, disk), model)
		st := readMergeStatus(t, mnt)
		if len(st.Chain) != 2 || st.Chain[1].Path != c.Images[0] {
			t.Errorf("chain after merge from=1: %+v", st.Chain)
		}
		f.Close()
		mustVhdfs(t, "umount", mnt)
		info := vhdfsInfo(t, top)
		if len(info.Layers) != 2 || info.Layers[1].Path != c.Images[0] {
			t.Errorf("info after merge from=1: %+v", info.Layers)
		}
		assertFileEquals(t, exportImage(t, top), model)
		if out, errs, code := vhdfs(t, "check", top); code != 0 {
			t.Errorf("check: exit %d\n%s%s", code, out, errs)
		}
	})
}

// TestMergeKilled kills the mount process at points of a merge; the chain then mounts
// with the same view, and the same merge completes with the same result.
func TestMergeKilled(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		// need is the chain length the command needs; after a kill past the re-link the
		// chain is already the merged one, and the merge cannot (and need not) run again.
		cases := []struct {
			point, cmd string
			need       int
			base       string // type of the base: dynamic unless said
		}{
			{"copy-start", "merge depth=2", 3, ""},
			{"copy-half", "merge depth=2", 3, ""},
			{"copy-done", "merge depth=1", 2, ""},
			{"push", "merge depth=2", 3, ""},
			{"relink-before", "merge depth=1", 2, ""},
			{"relink-parent", "merge depth=2", 3, ""},
			{"relink-id", "merge depth=1", 2, ""},
			{"relink-target", "merge depth=2", 3, ""},
			{"relink-after", "merge depth=1", 2, ""},
			{"copy-half", "merge from=1 depth=1", 3, ""},
			{"relink-before", "merge from=1 depth=1", 3, ""},
			{"relink-parent", "merge from=1 depth=1", 3, ""},
			{"relink-target", "merge from=1 depth=1", 3, ""},
			{"relink-after", "merge from=1 depth=1", 3, ""},
			{"relink-parent", "merge depth=2", 3, "fixed"},
			{"relink-target", "merge from=1 depth=1", 3, "fixed"},
		}
		for _, tc := range cases {
			name := tc.cmd + " killed at " + tc.point
			if tc.base != "" {
				name += " into " + tc.base
			}
			t.Run(name, func(t *testing.T) {
				create := []string{"--size", "24M"}
				if tc.base != "" {
					create = append(create, "--type", tc.base)
				}
				c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: create, Writes: 25, Seed: 11})
				want := md5Of(c.Model())
				top := c.Top()
				// Outside the mount: a child of the top (it must stay valid: the image that
				// replaces a merged top keeps its identity), a sibling of the target and the
				// images merged away (they must become detectably invalid).
				from, depth := 0, 2
				if tc.cmd == "merge depth=1" {
					depth = 1
				} else if tc.cmd == "merge from=1 depth=1" {
					from, depth = 1, 1
				}
				target := c.Images[len(c.Images)-1-from-depth]
				child := createChild(t, top, "child")
				sibling := createChild(t, target, "sibling")
				var mergedAway []string
				for k := from; k < from+depth; k++ {
					if k > 0 {
						mergedAway = append(mergedAway, c.Images[len(c.Images)-1-k])
					}
				}
				mnt := mountEnv(t, top, []string{"VHDFS_FAILPOINT=" + tc.point + ":kill"})
				pid := readMergeStatus(t, mnt).PID
				if e := control(mnt, tc.cmd); e == 0 {
					t.Fatalf("%s succeeded although the mount process was to die at %s", tc.cmd, tc.point)
				}
				waitDead(t, pid)
				mustRun(t, "fusermount3", "-u", mnt)

				// Killed inside the journaled re-link, the chain on disk is between shapes:
				// check says so and points to the repair; readers refuse it; the next
				// writer (here the mount) completes it.
				inRelink := strings.HasPrefix(tc.point, "relink-") && tc.point != "relink-after"
				out, errs, code := vhdfs(t, "check", top)
				switch {
				case inRelink && (code != 3 || !strings.Contains(errs, "vhdfs-journal") || !strings.Contains(errs, "--repair")):
					t.Fatalf("check after kill at %s: exit %d, want 3 naming the journal and --repair\n%s%s", tc.point, code, out, errs)
				case !inRelink && code != 0:
					t.Fatalf("check after kill at %s: exit %d\n%s%s", tc.point, code, out, errs)
				}
				if inRelink {
					if _, errs, code := vhdfs(t, "info", top); code != 1 || !strings.Contains(errs, "interrupted") {
						t.Errorf("info of a chain with a pending re-link: exit %d, %s; want a refusal", code, errs)
					}
				}
				mnt2 := mountEnv(t, top, nil)
				if out, errs, code := vhdfs(t, "check", "-U", top); code != 0 || strings.Contains(out+errs, "journal") {
					t.Errorf("check once mounted again after kill at %s: exit %d\n%s%s", tc.point, code, out, errs)
				}
				if got := md5Of(fileBytes(t, filepath.Join(mnt2, "disk.raw"))); got != want {
					t.Fatalf("view after kill at %s: md5 %s, want %s", tc.point, got, want)
				}
				n := len(readMergeStatus(t, mnt2).Chain)
				switch {
				case n >= tc.need:
					if e := control(mnt2, tc.cmd); e != 0 {
						t.Fatalf("%s again: %v: %+v", tc.cmd, e, readMergeStatus(t, mnt2).Last)
					}
				case !strings.HasPrefix(tc.point, "relink-"):
					// From relink-before on the journal rolls the merge forward.
					t.Fatalf("killed at %s, the chain is already %d images long", tc.point, n)
				}
				if got := md5Of(fileBytes(t, filepath.Join(mnt2, "disk.raw"))); got != want {
					t.Errorf("view after the merge ran again: md5 %s, want %s", got, want)
				}
				mustVhdfs(t, "umount", mnt2)
				assertFileEquals(t, exportImage(t, top), c.Model())
				if out, errs, code := vhdfs(t, "check", top); code != 0 {
					t.Errorf("check after the merge ran again: exit %d\n%s%s", code, out, errs)
				}
				assertFileEquals(t, exportImage(t, child), c.Model())
				for _, p := range append([]string{sibling}, mergedAway...) {
					if _, errs, code := vhdfs(t, "info", p); code != 1 || !strings.Contains(errs, "no longer valid") {
						t.Errorf("info %s (a sibling of the target or merged away): exit %d, %q; want a refusal saying it is no longer valid", filepath.Base(p), code, errs)
					}
				}
				if st := readDirNames(t, c.Dir); len(st) != len(c.Images)+2 {
					t.Errorf("files left beside the chain: %v", st)
				}
			})
		}
	})
}

// readDirNames lists the names in dir.
func readDirNames(t testing.TB, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

// TestMergeAbort aborts a merge halfway: the write reports ECANCELED, the chain is as it
// was, and the same merge then completes.
func TestMergeAbort(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "24M"}, Writes: 25, Seed: 5})
		want := md5Of(c.Model())
		top := c.Top()
		env, reached, resume := pausePoint(t, "copy-half")
		mnt := mountEnv(t, top, []string{env})
		done := make(chan syscall.Errno, 1)
		go func() { done <- control(mnt, "merge depth=2") }()
		reached()
		// A lookup of control first: the kernel may reuse a name looked up in the same
		// jiffy, and the last lookup then was the merge's, whose inode its write holds.
		if st := readMergeStatus(t, mnt); st.State != "merging" {
			t.Fatalf("state %q at copy-half, want merging", st.State)
		}
		aborted := make(chan syscall.Errno, 1)
		go func() { aborted <- control(mnt, "abort") }()
		// Once abort has cancelled the merge the state says "aborting"; only then may the
		// paused merge go on (else it could complete and the assertions below fail).
		deadline := time.Now().Add(10 * time.Second)
		for readMergeStatus(t, mnt).State != "aborting" {
			if time.Now().After(deadline) {
				t.Fatal("state never became aborting")
			}
			runtime.Gosched()
		}
		resume()
		if e := <-aborted; e != 0 {
			t.Errorf("abort: %v", e)
		}
		if e := <-done; e != syscall.ECANCELED {
			t.Errorf("aborted merge write: errno %v, want ECANCELED", e)
		}
		st := readMergeStatus(t, mnt)
		if st.State != "idle" || len(st.Chain) != 3 {
			t.Fatalf("after abort: state %s, chain of %d, want idle and 3", st.State, len(st.Chain))
		}
		if got := md5Of(fileBytes(t, filepath.Join(mnt, "disk.raw"))); got != want {
			t.Fatalf("after abort: md5 %s, want %s", got, want)
		}
		// The failpoint still pauses the merge run again there.
		go func() { done <- control(mnt, "merge depth=2") }()
		reached()
		resume()
		if e := <-done; e != 0 {
			t.Fatalf("merge after abort: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		if got := md5Of(fileBytes(t, filepath.Join(mnt, "disk.raw"))); got != want {
			t.Errorf("after merge: md5 %s, want %s", got, want)
		}
		mustVhdfs(t, "umount", mnt)
		assertFileEquals(t, exportImage(t, top), c.Model())
	})
}

// reversed returns the paths in the opposite order (top first, as the chain lists them).
func reversed(p []string) []string {
	out := make([]string, len(p))
	for i, s := range p {
		out[len(p)-1-i] = s
	}
	return out
}

// waitDead waits until process pid has died (gone, or a zombie nobody reaped yet).
func waitDead(t testing.TB, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return
		}
		// A zombie leader may still have threads holding its files (and with them
		// its image locks): dead means the leader is a zombie and no thread is left.
		if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) && b[i+2] == 'Z' {
			if tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid)); err != nil || len(tasks) <= 1 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d still running: %s", pid, b)
		}
		runtime.Gosched()
	}
}

// TestUmountAfterKill: `vhdfs umount` of a mount whose process was killed removes the
// dead mount instead of failing on it.
func TestUmountAfterKill(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 5, Seed: 2})
		mnt := mountEnv(t, c.Top(), nil)
		pid := readMergeStatus(t, mnt).PID
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		waitDead(t, pid)
		mustVhdfs(t, "umount", mnt)
		if mountedAt(t, mnt) {
			t.Fatalf("%s still mounted after vhdfs umount", mnt)
		}
		if out, errs, code := vhdfs(t, "check", c.Top()); code != 0 {
			t.Errorf("check after kill: exit %d\n%s%s", code, out, errs)
		}
	})
}
