package test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func chainPaths(st mergeStatus) []string {
	var p []string
	for _, l := range st.Chain {
		p = append(p, l.Path)
	}
	return p
}

// TestSnapshotWhileWriting: `snapshot snap.vhd` through control while fio writes and
// verifies. fio's verification passes; snap.vhd, the old top's file, is frozen from
// the snapshot on (its file and its view); the writes after it are in the live top,
// still at the top's path; snap.vhd is locked for reading only (qemu-img info opens
// it); layers/ and the status show the new chain; and merges afterwards keep the view.
func TestSnapshotWhileWriting(t *testing.T) {
	requireTool(t, "fio")
	requireTool(t, "qemu-img")
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "64M")
		top := createChild(t, base, "top")
		snap := filepath.Join(dir, imageName(format, "snap", true))
		mnt := mountEnv(t, top, nil)
		disk := filepath.Join(mnt, "disk.raw")

		ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
		defer cancel()
		fioJSON := filepath.Join(t.TempDir(), "fio.json")
		fio := exec.CommandContext(ctx, "fio", "--name=w", "--filename="+disk, "--rw=randwrite", "--bs=4k",
			"--offset=0", "--size=16M", "--loops=6", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
			"--verify_backlog=256", "--direct=1", "--ioengine=psync", "--randrepeat=0", "--verify_state_save=0",
			"--output-format=json", "--output="+fioJSON)
		var fioOut bytes.Buffer
		fio.Stdout, fio.Stderr = &fioOut, &fioOut
		if err := fio.Start(); err != nil {
			t.Fatal(err)
		}
		fioDone := make(chan struct{})
		var fioErr error
		go func() { fioErr = fio.Wait(); close(fioDone) }()
		// A failing test stops fio before the unmount (cleanups run last first).
		t.Cleanup(func() { cancel(); <-fioDone })
		// The snapshot goes in once fio's writes have reached the top.
		for delay := time.Millisecond; readMergeStatus(t, mnt).Chain[0].AllocatedBytes == 0; delay = min(2*delay, 50*time.Millisecond) {
			select {
			case <-fioDone:
				t.Fatalf("fio ended before any write reached the top: %v\n%s", fioErr, fioOut.String())
			case <-time.After(delay):
			}
		}
		if e := control(mnt, "snapshot "+filepath.Base(snap)); e != 0 {
			t.Fatalf("snapshot: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		frozen := sha256file(t, snap)
		frozenView := sha256file(t, exportShared(t, snap))
		st := readMergeStatus(t, mnt)
		if want := []string{top, snap, base}; !slices.Equal(chainPaths(st), want) {
			t.Errorf("chain after the snapshot: %v, want %v", chainPaths(st), want)
		}
		// The frozen old top is a reader's now: qemu-img, which refuses an image being
		// written, opens it; the live top it refuses. qemu does not read differencing
		// VHDX: there `vhdfs check`, which takes the same locks as qemu, is the reader
		// (`vhdfs info` of a mounted top asks the mount).
		reader := []string{"qemu-img", "info"}
		if format != "vhd" {
			reader = []string{vhdfsBin, "check"}
		}
		if out, err := exec.Command(reader[0], append(reader[1:], snap)...).CombinedOutput(); err != nil {
			t.Errorf("%s info of the frozen old top: %v: %s", filepath.Base(reader[0]), err, out)
		}
		if out, err := exec.Command(reader[0], append(reader[1:], top)...).CombinedOutput(); err == nil {
			t.Errorf("%s info of the live top succeeded while it is mounted: %s", filepath.Base(reader[0]), out)
		}

		if <-fioDone; fioErr != nil {
			t.Fatalf("fio: %v\n%s", fioErr, fioOut.String())
		}
		var res struct {
			Jobs []struct {
				Error int `json:"error"`
				Write struct {
					IOs int64 `json:"total_ios"`
				} `json:"write"`
			} `json:"jobs"`
		}
		b := fileBytes(t, fioJSON)
		if i := bytes.IndexByte(b, '{'); i > 0 {
			b = b[i:]
		}
		if err := json.Unmarshal(b, &res); err != nil || len(res.Jobs) != 1 || res.Jobs[0].Error != 0 || res.Jobs[0].Write.IOs == 0 {
			t.Fatalf("fio result: %v %+v\n%s", err, res, b)
		}
		if got := sha256file(t, snap); got != frozen {
			t.Errorf("the frozen file changed after the snapshot")
		}
		if got := sha256file(t, exportShared(t, snap)); got != frozenView {
			t.Errorf("the frozen view changed after the snapshot")
		}
		st = readMergeStatus(t, mnt)
		if st.Chain[0].AllocatedBytes == 0 {
			t.Errorf("the live top holds no writes: %+v", st.Chain)
		}
		if names := readDirNames(t, filepath.Join(mnt, "layers")); !slices.Equal(names, []string{"0-top.raw", "1-snap.raw", "2-base.raw"}) {
			t.Errorf("layers/ after the snapshot: %v", names)
		}

		// Refusals: an existing file, no name.
		for _, c := range []struct {
			cmd  string
			want syscall.Errno
		}{
			{"snapshot " + filepath.Base(snap), syscall.EEXIST},
			{"snapshot " + base, syscall.EEXIST},
			{"snapshot", syscall.EINVAL},
		} {
			if e := control(mnt, c.cmd); e != c.want {
				t.Errorf("%q: errno %v, want %v", c.cmd, e, c.want)
			}
		}
		if got := readMergeStatus(t, mnt); len(got.Chain) != 3 {
			t.Errorf("a refused snapshot changed the chain: %v", chainPaths(got))
		}

		// Merging the live top into the frozen one keeps the view.
		want := md5file(t, disk)
		if e := control(mnt, "merge depth=1"); e != 0 {
			t.Fatalf("merge depth=1: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		if got := md5file(t, disk); got != want {
			t.Errorf("disk.raw after merging the live top: md5 %s, want %s", got, want)
		}
		st = readMergeStatus(t, mnt)
		if want := []string{top, snap, base}; !slices.Equal(chainPaths(st), want) || st.Chain[0].AllocatedBytes != 0 {
			t.Errorf("chain after merging the snapshot: %+v, want %v with an empty top", st.Chain, want)
		}
		// A merge from the top always leaves a fresh top, so depth=1 keeps three images;
		// merging the frozen one too gives the chain of two the snapshot began with.
		if e := control(mnt, "merge depth=2"); e != 0 {
			t.Fatalf("merge depth=2: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		if got := md5file(t, disk); got != want {
			t.Errorf("disk.raw after merge depth=2: md5 %s, want %s", got, want)
		}
		if st := readMergeStatus(t, mnt); !slices.Equal(chainPaths(st), []string{top, base}) {
			t.Errorf("chain after merge depth=2: %v, want %v", chainPaths(st), []string{top, base})
		}
		mustVhdfs(t, "umount", mnt)
		if got := md5file(t, exportImage(t, top)); got != want {
			t.Errorf("export after umount: md5 %s, want %s", got, want)
		}
		if out, errs, code := vhdfs(t, "check", top); code != 0 {
			t.Errorf("check: exit %d\n%s%s", code, out, errs)
		}
	})
}

// TestSnapshotReadOnly: a read-only mount refuses a snapshot with EROFS and makes nothing.
func TestSnapshotReadOnly(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "8M")
		mnt := mountEnv(t, base, nil, "-r")
		snap := imageName(format, "snap", true)
		if e := control(mnt, "snapshot "+snap); e != syscall.EROFS {
			t.Errorf("snapshot on a read-only mount: errno %v, want EROFS", e)
		}
		if _, err := os.Stat(filepath.Join(dir, snap)); err == nil {
			t.Errorf("a refused snapshot left snap.vhd")
		}
		mustVhdfs(t, "umount", mnt)
	})
}

// TestSnapshotOffline: `vhdfs snapshot IMAGE NEW` freezes IMAGE as NEW and keeps IMAGE
// as the live top on it, and says so; it refuses an existing NEW. (A mounted top's
// snapshot is its mount's to make: see TestSnapshotCommandOnMount.)
func TestSnapshotOffline(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "8M")
		snap := filepath.Join(dir, imageName(format, "snap", true))
		out := mustVhdfs(t, "snapshot", base, snap)
		if !strings.Contains(out, snap+": the state of "+base+", frozen") || !strings.Contains(out, base+" stays the live top") {
			t.Errorf("snapshot output: %q", out)
		}
		if info := vhdfsInfo(t, base); len(info.Layers) != 2 || info.Layers[0].Path != base || info.Layers[1].Path != snap || info.Layers[0].Type != "differencing" {
			t.Errorf("info of the top after the snapshot: %+v", info)
		}
		if info := vhdfsInfo(t, snap); len(info.Layers) != 1 || info.Layers[0].Type != "dynamic" {
			t.Errorf("info of the snapshot: %+v", info)
		}
		before := snapshotFiles(t, base, snap)
		if _, errs, code := vhdfs(t, "snapshot", base, snap); code != 1 || !strings.Contains(errs, "exists") {
			t.Errorf("snapshot onto an existing file: exit %d, %q", code, errs)
		}
		assertUnchanged(t, before)
	})
}

// TestSnapshotKeepsName: the name you work with stays the live disk (issue 20). A
// mount of TOP writes A, `snapshot NEW` through control, writes B, unmounts; TOP
// mounted again shows A and B, and names NEW as its parent; NEW alone shows A and
// not B. A child made of TOP before an offline `vhdfs snapshot TOP NEW2` is refused
// through TOP afterwards, and opens through NEW2 once `vhdfs relink` points it there,
// showing what TOP held then, not what TOP is given later.
func TestSnapshotKeepsName(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "16M")
		top := createChild(t, base, "top")
		frozen := filepath.Join(dir, imageName(format, "frozen", true))
		size := virtualSize(t, top)
		model := make([]byte, size)
		gen := newWriteGen(2001, size, 512, 256<<10)

		mnt := mountEnv(t, top, nil)
		disk := filepath.Join(mnt, "disk.raw")
		writeRaw(t, disk, model, gen.writes(8)) // A
		modelA := bytes.Clone(model)
		if e := control(mnt, "snapshot "+filepath.Base(frozen)); e != 0 {
			t.Fatalf("snapshot: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		st := readMergeStatus(t, mnt)
		if want := []string{top, frozen, base}; !slices.Equal(chainPaths(st), want) {
			t.Errorf("chain after the snapshot: %v, want %v", chainPaths(st), want)
		}
		if st.Last == nil || !strings.Contains(st.Last.Message, top+" stays the live top") {
			t.Errorf("the snapshot's message: %+v", st.Last)
		}
		writeRaw(t, disk, model, gen.writes(8)) // B
		if bytes.Equal(model, modelA) {
			t.Fatal("B changed nothing")
		}
		assertSameBytes(t, "disk.raw after B", fileBytes(t, disk), model)
		mustVhdfs(t, "umount", mnt)

		mnt = mountEnv(t, top, nil)
		assertSameBytes(t, "TOP mounted again", fileBytes(t, filepath.Join(mnt, "disk.raw")), model)
		mustVhdfs(t, "umount", mnt)
		info := vhdfsInfo(t, top)
		if len(info.Layers) != 3 || info.Layers[0].Path != top || info.Layers[1].Path != frozen || info.Layers[2].Path != base {
			t.Errorf("info of TOP: %+v", info)
		}
		assertSameBytes(t, "NEW exported alone", fileBytes(t, exportImage(t, frozen)), modelA)
		for _, p := range []string{top, frozen} {
			if out, errs, code := vhdfs(t, "check", p); code != 0 {
				t.Errorf("check %s: exit %d\n%s%s", p, code, out, errs)
			}
		}

		// Offline, with a child of TOP made before.
		child := createChild(t, top, "child")
		frozen2 := filepath.Join(dir, imageName(format, "frozen2", true))
		mustVhdfs(t, "snapshot", top, frozen2)
		if _, errs, code := vhdfs(t, "info", child); code == 0 || !strings.Contains(errs, "unique ID") {
			t.Errorf("info of TOP's old child through the live TOP: exit %d, %q", code, errs)
		}
		mustVhdfs(t, "relink", child, frozen2)
		if info := vhdfsInfo(t, child); len(info.Layers) != 4 || info.Layers[1].Path != frozen2 || info.Layers[2].Path != frozen {
			t.Errorf("info of the relinked child: %+v", info)
		}
		mnt = mountEnv(t, top, nil)
		modelB := bytes.Clone(model)
		writeRaw(t, filepath.Join(mnt, "disk.raw"), model, gen.writes(4)) // C
		mustVhdfs(t, "umount", mnt)
		assertSameBytes(t, "TOP's old child after relink", fileBytes(t, exportImage(t, child)), modelB)
		assertSameBytes(t, "TOP after the offline snapshot", fileBytes(t, exportImage(t, top)), model)
		mCheck(t, child)
		mCheck(t, top)
	})
}

// TestSnapshotKilled kills the mount process at each step of `snapshot NEW` on disk.
// The chain then checks clean and reads as before, even before it is mounted again;
// mounted again (its mount completes or undoes the snapshot), TOP shows the same
// data, nothing of the snapshot is left but NEW when the fresh top had taken TOP's
// name (NEW then shows the same data alone), and the same snapshot can be taken.
func TestSnapshotKilled(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, point := range []string{"snapshot-journal", "snapshot-made", "snapshot-linked", "snapshot-renamed"} {
			t.Run(point, func(t *testing.T) {
				c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 6, Seed: 2002})
				top := c.Top()
				frozen := filepath.Join(c.Dir, imageName(format, "frozen", true))
				before := readDirNames(t, c.Dir)
				mnt := mountEnv(t, top, []string{"VHDFS_FAILPOINT=" + point + ":kill"})
				pid := readMergeStatus(t, mnt).PID
				if e := control(mnt, "snapshot "+filepath.Base(frozen)); e == 0 {
					t.Fatalf("the snapshot succeeded although the mount process was to die at %s", point)
				}
				waitDead(t, pid)
				mustRun(t, "fusermount3", "-u", mnt)

				// Valid at every step: readers and check take the chain as it is.
				if out, errs, code := vhdfs(t, "check", top); code != 0 {
					t.Fatalf("check after the kill: exit %d\n%s%s", code, out, errs)
				}
				assertFileEquals(t, exportImage(t, top), c.Model())

				mnt2 := mountEnv(t, top, nil)
				assertSameBytes(t, "TOP mounted again", fileBytes(t, filepath.Join(mnt2, "disk.raw")), c.Model())
				done := point == "snapshot-renamed"
				want := append([]string{}, before...)
				if done {
					want = append(want, filepath.Base(frozen))
					slices.Sort(want)
				}
				if got := readDirNames(t, c.Dir); !slices.Equal(got, want) {
					t.Errorf("files after the recovery: %v, want %v", got, want)
				}
				n := len(c.Images)
				if done {
					n++
				}
				if st := readMergeStatus(t, mnt2); len(st.Chain) != n || st.Chain[0].Path != top {
					t.Errorf("chain after the recovery: %v, want %d images under %s", chainPaths(st), n, top)
				}
				if done {
					assertFileEquals(t, exportShared(t, frozen), c.Model())
				} else if e := control(mnt2, "snapshot "+filepath.Base(frozen)); e != 0 {
					t.Errorf("the same snapshot again: %v: %+v", e, readMergeStatus(t, mnt2).Last)
				}
				mustVhdfs(t, "umount", mnt2)
				mCheck(t, top)
				assertFileEquals(t, exportImage(t, frozen), c.Model())
			})
		}
	})
}
