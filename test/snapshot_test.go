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
// verifies. fio's verification passes; the old top is frozen from the snapshot on (its
// file and its view); the writes after it are in the new top; the old top is locked
// for reading only (qemu-img info opens it); layers/ and the status show the new
// chain; and a merge of the snapshot afterwards keeps the view.
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
		frozen := sha256file(t, top)
		frozenView := sha256file(t, exportShared(t, top))
		st := readMergeStatus(t, mnt)
		if want := []string{snap, top, base}; !slices.Equal(chainPaths(st), want) {
			t.Errorf("chain after the snapshot: %v, want %v", chainPaths(st), want)
		}
		// The old top is a reader's now: qemu-img, which refuses an image being written,
		// opens it; the new top it refuses. qemu does not read differencing VHDX:
		// there `vhdfs check`, which takes the same locks as qemu, is the reader
		// (`vhdfs info` of a mounted top asks the mount).
		reader := []string{"qemu-img", "info"}
		if format != "vhd" {
			reader = []string{vhdfsBin, "check"}
		}
		if out, err := exec.Command(reader[0], append(reader[1:], top)...).CombinedOutput(); err != nil {
			t.Errorf("%s info of the old top: %v: %s", filepath.Base(reader[0]), err, out)
		}
		if out, err := exec.Command(reader[0], append(reader[1:], snap)...).CombinedOutput(); err == nil {
			t.Errorf("%s info of the new top succeeded while it is mounted: %s", filepath.Base(reader[0]), out)
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
		if got := sha256file(t, top); got != frozen {
			t.Errorf("the old top's file changed after the snapshot")
		}
		if got := sha256file(t, exportShared(t, top)); got != frozenView {
			t.Errorf("the old top's view changed after the snapshot")
		}
		st = readMergeStatus(t, mnt)
		if st.Chain[0].AllocatedBytes == 0 {
			t.Errorf("the new top holds no writes: %+v", st.Chain)
		}
		if names := readDirNames(t, filepath.Join(mnt, "layers")); !slices.Equal(names, []string{"0-snap.raw", "1-top.raw", "2-base.raw"}) {
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

		// Merging the snapshot into the old top keeps the view.
		want := md5file(t, disk)
		if e := control(mnt, "merge depth=1"); e != 0 {
			t.Fatalf("merge depth=1: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		if got := md5file(t, disk); got != want {
			t.Errorf("disk.raw after merging the snapshot: md5 %s, want %s", got, want)
		}
		st = readMergeStatus(t, mnt)
		if want := []string{snap, top, base}; !slices.Equal(chainPaths(st), want) || st.Chain[0].AllocatedBytes != 0 {
			t.Errorf("chain after merging the snapshot: %+v, want %v with an empty top", st.Chain, want)
		}
		// A merge from the top always leaves a fresh top, so depth=1 keeps three images;
		// merging the old top too gives the chain of two the snapshot began with.
		if e := control(mnt, "merge depth=2"); e != 0 {
			t.Fatalf("merge depth=2: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		if got := md5file(t, disk); got != want {
			t.Errorf("disk.raw after merge depth=2: md5 %s, want %s", got, want)
		}
		if st := readMergeStatus(t, mnt); !slices.Equal(chainPaths(st), []string{snap, base}) {
			t.Errorf("chain after merge depth=2: %v, want %v", chainPaths(st), []string{snap, base})
		}
		mustVhdfs(t, "umount", mnt)
		if got := md5file(t, exportImage(t, snap)); got != want {
			t.Errorf("export after umount: md5 %s, want %s", got, want)
		}
		if out, errs, code := vhdfs(t, "check", snap); code != 0 {
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

// TestSnapshotOffline: `vhdfs snapshot IMAGE NEW` makes NEW on IMAGE and says so; it
// refuses an existing NEW. (A mounted top's snapshot is its mount's to make: see
// TestSnapshotCommandOnMount.)
func TestSnapshotOffline(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "8M")
		snap := filepath.Join(dir, imageName(format, "snap", true))
		out := mustVhdfs(t, "snapshot", base, snap)
		if !strings.Contains(out, snap) || !strings.Contains(out, "differencing image on "+base) {
			t.Errorf("snapshot output: %q", out)
		}
		if info := vhdfsInfo(t, snap); len(info.Layers) != 2 || info.Layers[1].Path != base {
			t.Errorf("info of the snapshot: %+v", info)
		}
		if _, errs, code := vhdfs(t, "snapshot", base, snap); code != 1 || !strings.Contains(errs, "exists") {
			t.Errorf("snapshot onto an existing file: exit %d, %q", code, errs)
		}
	})
}
