package test

import (
	"bytes"
	"fmt"
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

// TestSnapshotCommandOnMount: `vhdfs snapshot TOP NEW` of a top mounted read-write
// has the mount freeze the top as NEW (its status shows the chain top, NEW, base: qemu
// follows no differencing VHD or VHDX), and what is written afterwards lands in the
// live top, not in NEW. A NEW in another directory, or one that exists, is refused in
// one line and nothing changes.
func TestSnapshotCommandOnMount(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "8M")
		top := createChild(t, base, "top")
		mnt := mountEnv(t, top, nil)
		disk := filepath.Join(mnt, "disk.raw")
		before := bytes.Repeat([]byte("before the snapshot\n"), 1000)
		if err := os.WriteFile(disk, before, 0); err != nil {
			t.Fatal(err)
		}
		snap := filepath.Join(dir, imageName(format, "snap", true))

		elsewhere := filepath.Join(t.TempDir(), imageName(format, "snap", true))
		_, errs, code := vhdfs(t, "snapshot", top, elsewhere)
		if code == 0 {
			t.Fatalf("snapshot into another directory through the mount succeeded")
		}
		assertOneLineError(t, errs, mnt, dir)
		if _, err := os.Stat(elsewhere); err == nil {
			t.Errorf("the refused snapshot made %s", elsewhere)
		}

		out, errs, code := vhdfs(t, "snapshot", top, snap)
		if code != 0 {
			t.Fatalf("vhdfs snapshot of a mounted top: exit %d\n%s%s", code, out, errs)
		}
		if !strings.Contains(errs, mnt) || !strings.Contains(out, snap) {
			t.Errorf("snapshot does not say it went through %s and made %s: %q %q", mnt, snap, out, errs)
		}
		if want := []string{top, snap, base}; !slices.Equal(chainPaths(readMergeStatus(t, mnt)), want) {
			t.Errorf("the mount's chain after the snapshot: %v, want %v", chainPaths(readMergeStatus(t, mnt)), want)
		}
		if _, errs, code := vhdfs(t, "snapshot", top, snap); code == 0 || !strings.Contains(errs, "exists") {
			t.Errorf("snapshot onto the existing %s: exit %d, %q", snap, code, errs)
		}

		after := bytes.Repeat([]byte("after the snapshot\n"), 1000)
		f, err := os.OpenFile(disk, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(after, 4<<20); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		mustVhdfs(t, "umount", mnt)
		// The name mounted stays the live disk; snap is the state at the snapshot.
		if got := fileBytes(t, exportImage(t, top)); !bytes.Equal(got[:len(before)], before) || !bytes.Equal(got[4<<20:4<<20+len(after)], after) {
			t.Errorf("the view of the live top %s lacks what was written before or after the snapshot", top)
		}
		if got := fileBytes(t, exportImage(t, snap)); !bytes.Equal(got[:len(before)], before) || bytes.Equal(got[4<<20:4<<20+len(after)], after) {
			t.Errorf("the frozen %s: want what was written before the snapshot and not what was written after", snap)
		}
	})
}

// TestMountedImageCommands: info of a top mounted read-write shows the chain the
// mount has open; check, check --repair and relink of it, and relink of its base,
// fail in one line naming the mount point and the way out, and change nothing.
func TestMountedImageCommands(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "8M")
		top := createChild(t, base, "top")
		mnt := mountEnv(t, top, nil)
		pid := strconv.Itoa(readMergeStatus(t, mnt).PID)
		files := snapshotFiles(t, base, top)

		info := vhdfsInfo(t, top)
		if len(info.Layers) != 2 || info.Layers[0].Path != top || info.Layers[1].Path != base {
			t.Errorf("info --json of the mounted top: %+v", info)
		}
		out, errs, code := vhdfs(t, "info", top)
		if code != 0 || !strings.Contains(out, base) || !strings.Contains(errs, mnt) {
			t.Errorf("info of the mounted top: exit %d\n%s%s", code, out, errs)
		}
		for _, c := range []struct {
			image string
			args  []string
		}{
			{top, []string{"check", top}},
			{top, []string{"check", "--repair", top}},
			{top, []string{"relink", top, base}},
			{base, []string{"relink", base, base}},
		} {
			_, errs, code := vhdfs(t, c.args...)
			if code == 0 {
				t.Errorf("vhdfs %s of a mounted image succeeded", strings.Join(c.args, " "))
				continue
			}
			assertOneLineError(t, errs, c.image, mnt, pid, "vhdfs umount "+mnt)
		}
		if out, errs, code := vhdfs(t, "check", "-U", top); code != 0 {
			t.Errorf("check -U of the mounted top: exit %d\n%s%s", code, out, errs)
		}
		assertUnchanged(t, files)
		mustVhdfs(t, "umount", mnt)
	})
}

// TestUmountBusyNamesHolders: umount of a mount kept busy by a loop device on its
// disk.raw, or by a process with disk.raw open, fails in one line naming /dev/loopN,
// or that process's pid, and leaves it mounted; once they are gone, umount works.
func TestUmountBusyNamesHolders(t *testing.T) {
	requireTool(t, "losetup")
	dir := t.TempDir()
	img := createBase(t, dir, "vhd", 0, "base", "--size", "8M")
	mnt := mountEnv(t, img, nil)
	disk := filepath.Join(mnt, "disk.raw")

	loop := strings.TrimSpace(mustRun(t, "losetup", "-r", "-f", "--show", disk))
	detached := false
	detach := func() {
		if !detached {
			detached = true
			mustRun(t, "losetup", "-d", loop)
		}
	}
	t.Cleanup(detach)
	r := runWithin(t, 20*time.Second, nil, "umount", mnt)
	if r.code <= 0 {
		t.Fatalf("umount with %s on disk.raw: exit %d: %s", loop, r.code, r.stderr)
	}
	assertOneLineError(t, r.stderr, loop, disk)
	detach()

	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	holder := exec.Command("sleep", "600")
	holder.Stdin = f
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	waited := false
	end := func() {
		if !waited {
			waited = true
			holder.Process.Kill()
			holder.Wait()
		}
	}
	t.Cleanup(end)
	r = runWithin(t, 20*time.Second, nil, "umount", mnt)
	if r.code <= 0 {
		t.Fatalf("umount with pid %d holding disk.raw: exit %d: %s", holder.Process.Pid, r.code, r.stderr)
	}
	assertOneLineError(t, r.stderr, fmt.Sprintf("pid %d (sleep)", holder.Process.Pid), disk)
	if !mountedAt(t, mnt) {
		t.Fatalf("%s was unmounted by the failed umount", mnt)
	}
	end()
	mustVhdfs(t, "umount", mnt)
}

// TestMergeClientMountKilled: `vhdfs merge` through a mount whose process is killed
// (SIGKILL) mid-merge says that the mount process ended, that the chain is intact
// and what to do; done so (umount, mount, merge), the merge completes and the view
// is what was written.
func TestMergeClientMountKilled(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "8M")
		top := createChild(t, base, "top")
		env, reached, _ := pausePoint(t, "copy-start")
		mnt := mountEnv(t, top, []string{env})
		data := bytes.Repeat([]byte("written before the merge\n"), 4000)
		if err := os.WriteFile(filepath.Join(mnt, "disk.raw"), data, 0); err != nil {
			t.Fatal(err)
		}
		want := md5file(t, filepath.Join(mnt, "disk.raw"))
		pid := readMergeStatus(t, mnt).PID

		res := make(chan ran, 1)
		go func() { res <- runWithin(t, 20*time.Second, nil, "merge", top) }()
		reached() // the merge waits in the mount at copy-start
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		r := <-res
		if r.code <= 0 {
			t.Fatalf("merge through a killed mount: exit %d: %s", r.code, r.stderr)
		}
		lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
		last := lines[len(lines)-1]
		for _, w := range []string{fmt.Sprintf("the mount process (pid %d) ended", pid), "the chain is intact", "vhdfs umount " + mnt, "repeat the merge"} {
			if !strings.Contains(last, w) {
				t.Errorf("the last line %q does not say %q", last, w)
			}
		}
		waitDead(t, pid)
		mustVhdfs(t, "umount", mnt)
		if out, errs, code := vhdfs(t, "check", top); code != 0 {
			t.Errorf("check after the kill: exit %d\n%s%s", code, out, errs)
		}
		mnt2 := mountEnv(t, top, nil)
		mustVhdfs(t, "merge", top)
		if got := md5file(t, filepath.Join(mnt2, "disk.raw")); got != want {
			t.Errorf("disk.raw after the repeated merge: md5 %s, want %s", got, want)
		}
		mustVhdfs(t, "umount", mnt2)
	})
}

// TestMissingImageNamed: snapshot, merge and resize of an image that does not exist
// (looked up first among the mounts) fail in one line naming it, and make nothing.
func TestMissingImageNamed(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.vhd")
	for _, args := range [][]string{
		{"snapshot", missing, filepath.Join(dir, "new.vhd")},
		{"merge", missing},
		{"resize", missing, "16M"},
		{"snapshot", filepath.Join(dir, "nodir", "missing.vhdx"), filepath.Join(dir, "new.vhdx")},
	} {
		_, errs, code := vhdfs(t, args...)
		if code == 0 {
			t.Errorf("vhdfs %s succeeded", strings.Join(args, " "))
			continue
		}
		assertOneLineError(t, errs, args[1], "no such file")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("the failed commands left %v in %s", entries, dir)
	}
}
