package test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Regressions of the issue the image locks and merge identity checks close: each test
// failed before them (run with VHDFS_TEST_BIN set to a binary of an older commit).

// statusSays reports whether the control file's last command says one of words.
func statusSays(t testing.TB, mnt string, words ...string) (bool, string) {
	t.Helper()
	st := mStatus(t, mnt)
	if st.Last == nil {
		return false, "no last command"
	}
	msg := st.Last.Error + " " + st.Last.Message
	for _, w := range words {
		if strings.Contains(msg, w) {
			return true, msg
		}
	}
	return false, msg
}

// TestSafeSharedParent (item 1): two mounts of two children of one base; a merge in
// one would rewrite the base under the other, so it fails on the lock; the base cannot
// be mounted for writing, and no snapshot can be made of a top mounted for writing.
func TestSafeSharedParent(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "16M"}, Writes: 10, Seed: 31})
		base, top1 := c.Images[0], c.Images[1]
		top2 := createChild(t, base, "top2")
		model2 := bytes.Clone(c.Views[0])
		applyWrites(t, top2, model2, newWriteGen(32, c.Size, 4096, 256<<10).writes(10))

		mntA := mountEnv(t, top1, nil)
		mntB := mountEnv(t, top2, nil)
		diskA := filepath.Join(mntA, "disk.raw")
		assertFileEquals(t, diskA, c.Model())
		snap := snapshotFiles(t, c.Dir)
		if e := control(mntB, "merge depth=1"); e == 0 {
			t.Errorf("merge of %s into %s succeeded while %s, a mount of %s, reads %s", top2, base, mntA, top1, base)
		} else if ok, msg := statusSays(t, mntB, "lock"); !ok {
			t.Errorf("failed merge (%v): the control file does not mention the lock: %s", e, msg)
		}
		assertFileEquals(t, diskA, c.Model())
		assertFileEquals(t, filepath.Join(mntB, "disk.raw"), model2)

		mnt := mMountpoint(t)
		mCleanupMount(t, mnt)
		if _, errs, code := vhdfs(t, "mount", base, mnt); code == 0 || mountedAt(t, mnt) {
			t.Errorf("vhdfs mount %s beside a mount of its child: exit %d, mounted %v", base, code, mountedAt(t, mnt))
		} else if !strings.Contains(errs, "does not allow writing") || !strings.Contains(errs, base) {
			t.Errorf("vhdfs mount %s refused without naming the base and the lock: %s", base, errs)
		}

		child := filepath.Join(c.Dir, imageName(format, "snap", true))
		if _, errs, code := vhdfs(t, append([]string{"create", "--parent", top1}, childFormatArgs(format, child)...)...); code == 0 {
			t.Errorf("vhdfs create --parent %s succeeded while it is mounted for writing", top1)
		} else if !strings.Contains(errs, "locked for writing") || !strings.Contains(errs, top1) {
			t.Errorf("vhdfs create --parent %s refused without naming the top and the lock: %s", top1, errs)
		}
		assertUnchanged(t, snap)

		mustVhdfs(t, "umount", mntA)
		mustVhdfs(t, "umount", mntB)
		assertFileEquals(t, exportImage(t, top1), c.Model())
		assertFileEquals(t, exportImage(t, top2), model2)
	})
}

// TestSafeQemuAndMount (item 2): qemu-io and a vhdfs mount refuse each other's writes
// to one image, whichever opened it first.
func TestSafeQemuAndMount(t *testing.T) {
	requireTool(t, "qemu-io")
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		l := createBase(t, dir, format, 0, "l", "--size", "16M")
		qemuIOWrite(t, l, []qemuWrite{{0x11, 0, 1 << 20}})
		model := make([]byte, virtualSize(t, l))
		copy(model, fill(1<<20, 0x11))

		t.Run("qemu-io write beside a mount", func(t *testing.T) {
			mnt := mountEnv(t, l, nil)
			snap := snapshotFiles(t, l)
			out, errs, code := run(t, "qemu-io", "-f", qemuFormat(l), "-c", "write -P 0x42 8M 2M", l)
			if code == 0 && strings.Contains(out, "wrote") {
				t.Errorf("qemu-io wrote into %s while it is mounted: %s", l, out)
				copy(model[8<<20:], fill(2<<20, 0x42))
			} else if !strings.Contains(errs, "Failed to get") {
				t.Errorf("qemu-io refused without the lock message: exit %d: %s%s", code, out, errs)
			}
			assertUnchanged(t, snap)
			assertFileEquals(t, filepath.Join(mnt, "disk.raw"), model)
			mustVhdfs(t, "umount", mnt)
		})

		t.Run("mount beside qemu-io writing", func(t *testing.T) {
			release := holdQemu(t, l, "write -P 0x43 4M 64k", "wrote 65536/65536")
			copy(model[4<<20:], fill(64<<10, 0x43))
			mnt := mMountpoint(t)
			mCleanupMount(t, mnt)
			_, errs, code := vhdfs(t, "mount", l, mnt)
			if code == 0 || mountedAt(t, mnt) {
				t.Errorf("vhdfs mount %s while qemu-io writes it: exit %d, mounted %v", l, code, mountedAt(t, mnt))
				vhdfs(t, "umount", mnt)
			} else {
				assertOneLineError(t, errs, l, "locked for writing by another process (qemu-io, pid")
			}
			release()
			assertFileEquals(t, exportImage(t, l), model)
		})
	})
}

// TestSafeMergeMiddleKeepsChild (item 3): an offline merge of the middle image of
// base ← mid ← top into base leaves top valid and showing the same disk.
func TestSafeMergeMiddleKeepsChild(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "16M"}, Writes: 10, Seed: 33})
		mid, top := c.Images[1], c.Images[2]
		before := fileBytes(t, exportImage(t, top))
		assertSameBytes(t, "export before the merge", before, c.Model())
		mustVhdfs(t, "merge", mid)
		if info := vhdfsInfo(t, top); len(info.Layers) != 3 {
			t.Errorf("vhdfs info %s after merging %s: %d layers, want 3", top, mid, len(info.Layers))
		}
		assertFileEquals(t, exportImage(t, top), before)
		assertFileEquals(t, exportImage(t, mid), c.Views[1])
		mCheck(t, top)
	})
}

// TestSafeMergedAwayImagesRefused (item 4): after `merge --depth 2` of
// base ← snap1 ← snap2 ← snap3, the image merged away (snap2) and another child of the
// target (side) are no longer valid: check and mount say so instead of showing a
// disk that mixes the merged target with stale data.
func TestSafeMergedAwayImagesRefused(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 4, Create: []string{"--size", "16M"}, Writes: 8, Seed: 34})
		snap1, snap2, snap3 := c.Images[1], c.Images[2], c.Images[3]
		side := createChild(t, snap1, "side")
		mustVhdfs(t, "merge", "--depth", "2", snap3)
		assertFileEquals(t, exportImage(t, snap3), c.Model())
		for _, img := range []string{snap2, side} {
			if out, errs, code := vhdfs(t, "check", img); code != 3 || !strings.Contains(out+errs, "no longer valid") {
				t.Errorf("vhdfs check %s after the merge: exit %d, want 3 saying \"no longer valid\"\n%s%s", img, code, out, errs)
			}
			mnt := mMountpoint(t)
			mCleanupMount(t, mnt)
			if _, errs, code := vhdfs(t, "mount", "-r", img, mnt); code == 0 || !strings.Contains(errs, "no longer valid") {
				t.Errorf("vhdfs mount -r %s after the merge: exit %d, want a refusal saying \"no longer valid\": %s", img, code, errs)
				if mountedAt(t, mnt) {
					vhdfs(t, "umount", mnt)
				}
			}
		}
	})
}

// TestSafeMergeFiles (item 5): a merge in a mount writes only the files the chain has
// open: not a file put in place of the parent, and not in place of a symlink.
func TestSafeMergeFiles(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		t.Run("parent replaced", func(t *testing.T) {
			c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "16M"}, Writes: 8, Seed: 35})
			base, top := c.Images[0], c.Images[1]
			other := createBase(t, t.TempDir(), format, 0, "other", "--size", "16M")
			applyWrites(t, other, make([]byte, c.Size), newWriteGen(36, c.Size, 4096, 256<<10).writes(8))
			mnt := mountEnv(t, top, nil)
			orig := filepath.Join(c.Dir, "base.orig"+filepath.Ext(base))
			if err := os.Rename(base, orig); err != nil {
				t.Fatal(err)
			}
			copyFile(t, other, base)
			snap := snapshotFiles(t, base, orig)
			if e := control(mnt, "merge depth=1"); e == 0 {
				t.Errorf("merge succeeded although %s was replaced", base)
			} else if ok, msg := statusSays(t, mnt, "moved", "replaced"); !ok {
				t.Errorf("failed merge (%v): the control file does not say the parent was moved or replaced: %s", e, msg)
			}
			assertUnchanged(t, snap)
			assertSameBytes(t, "the copy of other.vhd at base.vhd", fileBytes(t, base), fileBytes(t, other))
			assertFileEquals(t, filepath.Join(mnt, "disk.raw"), c.Model())
			mustVhdfs(t, "umount", mnt)
		})

		t.Run("symlinked top", func(t *testing.T) {
			dir := t.TempDir()
			c := makeChainIn(t, mkdir(t, filepath.Join(dir, "real")), chainOptions{Format: format, Depth: 2, Create: []string{"--size", "16M"}, Writes: 8, Seed: 37})
			link := filepath.Join(dir, imageName(format, "top", true))
			if err := os.Symlink(filepath.Join("real", filepath.Base(c.Top())), link); err != nil {
				t.Fatal(err)
			}
			mnt := mountEnv(t, link, nil)
			if e := control(mnt, "merge depth=1"); e != 0 {
				t.Fatalf("merge depth=1 through the link: %v: %+v", e, mStatus(t, mnt).Last)
			}
			if st, err := os.Lstat(link); err != nil || st.Mode()&os.ModeSymlink == 0 {
				t.Errorf("%s after the merge: %v, %v; want the symlink", link, st.Mode(), err)
			}
			assertFileEquals(t, filepath.Join(mnt, "disk.raw"), c.Model())
			mustVhdfs(t, "umount", mnt)
			assertFileEquals(t, exportImage(t, link), c.Model())
			assertFileEquals(t, exportImage(t, c.Top()), c.Model())
			mCheck(t, link)
		})
	})
}

func mkdir(t testing.TB, dir string) string {
	t.Helper()
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestSafeLockedParentIsFinal: a parent that another process holds is a refusal, not a
// reason to try the next locator. A copy of a chain (here a backup) still records the
// original's absolute path; with the copy's base held by qemu-io for writing, a merge
// of the copy's top used the original base instead, and wrote into it.
func TestSafeLockedParentIsFinal(t *testing.T) {
	requireTool(t, "qemu-io")
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "16M"}, Writes: 8, Seed: 38})
		dir := t.TempDir()
		for _, img := range c.Images {
			copyFile(t, img, filepath.Join(dir, filepath.Base(img)))
		}
		base, top := filepath.Join(dir, filepath.Base(c.Images[0])), filepath.Join(dir, filepath.Base(c.Images[1]))
		if info := vhdfsInfo(t, top); info.Layers[1].Path != base {
			t.Fatalf("the copy's parent is %s, want %s", info.Layers[1].Path, base)
		}
		release := holdQemu(t, base, "write -P 0x42 8M 64k", "wrote 65536/65536")
		defer release()
		original := snapshotFiles(t, c.Dir)
		for _, args := range [][]string{{"merge", top}, {"export", top, filepath.Join(t.TempDir(), "x.raw")}} {
			if _, errs, code := vhdfs(t, args...); code == 0 || !strings.Contains(errs, base) || !strings.Contains(errs, "locked for writing") {
				t.Errorf("vhdfs %s while qemu-io writes %s: exit %d, want a refusal naming it: %s", args[0], base, code, errs)
			}
		}
		assertUnchanged(t, original)
	})
}
