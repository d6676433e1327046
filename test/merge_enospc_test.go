package test

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestMergeENOSPC: the target of a merge fills up its file system. The merge fails,
// the write to control reports EIO on close and the status says why; the view never
// changes, the chain checks clean and exports as before; once there is room, the same
// merge completes.
func TestMergeENOSPC(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tool := range []string{"mkfs.ext4", "losetup", "mount", "umount"} {
			requireTool(t, tool)
		}
		if os.Geteuid() != 0 {
			t.Fatal("mounting an ext4 file system on a loop device needs root")
		}
		small, release := mountSmallExt4(t, 48<<20)

		// The base (64 MiB, dynamic) on the small file system, the top beside the test.
		// 2 MiB blocks, VHD's default: VHDX's 32 MiB would not fit the file system.
		base := createBase(t, small, format, 0, "base", "--size", "64M", "--exact-size", "--block-size", "2M")
		top := filepath.Join(t.TempDir(), imageName(format, "top", true))
		size := virtualSize(t, base)
		model := make([]byte, size)
		rng := rand.New(rand.NewPCG(7001, 7002))
		src := rand.NewChaCha8([32]byte{7, 0, 0, 1})
		randData := func(n int) []byte {
			b := make([]byte, n)
			_, _ = src.Read(b)
			return b
		}
		applyWrites(t, base, model, []write{
			{0, randData(1 << 20)},
			{20<<20 + 512, randData(1<<20 - 1024)},
			{63 << 20, bytes.Repeat([]byte{0x77}, 1<<20)},
		})
		mustVhdfs(t, append([]string{"create", "--parent", base}, childFormatArgs(format, top)...)...)
		// 24 MiB for the base to take: more than the room left below, less than the room
		// there is once the filler is gone. Sector-granular edges and zeros among it.
		ws := []write{{8 << 20, randData(16 << 20)}}
		for i := range 8 {
			off := int64(30+4*i)<<20 + int64(rng.IntN(1<<20))
			ws = append(ws, write{off, randData(1<<20 + rng.IntN(4096))})
		}
		ws = append(ws,
			write{3, []byte("unaligned head")},
			write{20<<20 + 1000, make([]byte, 70000)}, // zeros over the base's data
			write{size - 5, []byte{1, 2, 3, 4, 5}},
		)
		applyWrites(t, top, model, ws)
		want := md5Of(model)

		filler := fillFS(t, small, 8<<20)

		// The merge runs out of room.
		mnt := mountEnv(t, top, nil)
		disk := filepath.Join(mnt, "disk.raw")
		if got := md5Of(fileBytes(t, disk)); got != want {
			t.Fatalf("before the merge: md5 %s, want %s", got, want)
		}
		if e := control(mnt, "merge depth=1"); e != syscall.EIO {
			t.Fatalf("merge onto a full file system: errno %v, want EIO: %+v", e, readMergeStatus(t, mnt).Last)
		}
		st := readMergeStatus(t, mnt)
		if st.Last != nil {
			t.Logf("failed merge: %s", st.Last.Message)
		}
		if st.Last == nil || st.Last.Command != "merge depth=1" || st.Last.Errno != int(syscall.EIO) ||
			!strings.Contains(st.Last.Message, "no space left on device") || !strings.Contains(st.Last.Message, base) {
			t.Errorf("last result after the failed merge: %+v, want errno 5 and a message naming %s and no space", st.Last, base)
		}
		if st.State != "idle" || len(st.Chain) != 2 || len(st.Detached) != 0 {
			t.Errorf("status after the failed merge: state %s, chain %+v, detached %v", st.State, st.Chain, st.Detached)
		}
		if got := md5Of(fileBytes(t, disk)); got != want {
			t.Errorf("after the failed merge: md5 %s, want %s", got, want)
		}
		// The top is the merged layer right above the target: it records the target's
		// interim unique ID (the target changed), nothing else.
		if h, id := sharedInfo(t, top).Layers[0].ParentUniqueID, vhdfsInfo(t, base).Layers[0].UniqueID; h != id {
			t.Errorf("top's parent ID %s, want the target's interim ID %s", h, id)
		}

		// The mount goes on taking writes.
		extra := write{40<<20 + 3000, randData(9000)}
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(extra.Data, extra.Off); err != nil {
			f.Close()
			t.Fatalf("write after the failed merge: %v", err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			t.Fatalf("fsync after the failed merge: %v", err)
		}
		f.Close()
		copy(model[extra.Off:], extra.Data)
		want = md5Of(model)
		if got := md5Of(fileBytes(t, disk)); got != want {
			t.Errorf("after a write: md5 %s, want %s", got, want)
		}
		mustVhdfs(t, "umount", mnt)
		if out, errs, code := vhdfs(t, "check", top); code != 0 {
			t.Errorf("check after the failed merge: exit %d\n%s%s", code, out, errs)
		}
		assertFileEquals(t, exportImage(t, top), model)

		// With room again, the same merge completes.
		if err := os.Remove(filler); err != nil {
			t.Fatal(err)
		}
		mnt = mountEnv(t, top, nil)
		disk = filepath.Join(mnt, "disk.raw")
		if e := control(mnt, "merge depth=1"); e != 0 {
			t.Fatalf("merge with room: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		st = readMergeStatus(t, mnt)
		if st.Last == nil || st.Last.Errno != 0 || len(st.Chain) != 2 || st.Chain[1].Path != base {
			t.Errorf("status after the merge: last %+v, chain %+v", st.Last, st.Chain)
		}
		if got := md5Of(fileBytes(t, disk)); got != want {
			t.Errorf("after the merge: md5 %s, want %s", got, want)
		}
		mustVhdfs(t, "umount", mnt)
		if out, errs, code := vhdfs(t, "check", top); code != 0 {
			t.Errorf("check after the merge: exit %d\n%s%s", code, out, errs)
		}
		if info := vhdfsInfo(t, top); len(info.Layers) != 2 || info.Layers[0].AllocatedBytes != 0 {
			t.Errorf("info after the merge: %+v", info.Layers)
		}
		assertFileEquals(t, exportImage(t, top), model)
		assertFileEquals(t, exportImage(t, base), model) // the base holds it all now
		release()
	})
}

// mountSmallExt4 makes an ext4 file system of size bytes (no blocks reserved for
// root) in a file, attaches it to a loop device and mounts it. It returns the mount
// point and a function that unmounts it and detaches the device; a test that ends
// with either still there fails, and the cleanups undo them.
func mountSmallExt4(t testing.TB, size int64) (dir string, release func()) {
	t.Helper()
	return mountLoopFS(t, size, "ext4", "mkfs.ext4", "-q", "-F", "-m", "0")
}

// mountLoopFS makes a file system of type fstype and size bytes with mkfs (a command
// and its arguments, to which the backing file is added) on a loop device, mounts it,
// and returns where, as mountSmallExt4.
func mountLoopFS(t testing.TB, size int64, fstype string, mkfs ...string) (dir string, release func()) {
	t.Helper()
	tmp := t.TempDir()
	img := filepath.Join(tmp, "small."+fstype)
	dir = filepath.Join(tmp, "fs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	mustRun(t, mkfs[0], append(mkfs[1:], img)...)
	var loop string
	mLoopCleanup(t, &loop)
	loop = strings.TrimSpace(mustRun(t, "losetup", "--find", "--show", img))
	// Registered after the loop's cleanup, so it runs before it; mounts made later
	// (vhdfs on files of this file system) go before both.
	mUmountCleanup(t, dir)
	mustRun(t, "mount", "-t", fstype, loop, dir)
	release = func() {
		t.Helper()
		mustRun(t, "umount", dir)
		mustRun(t, "losetup", "-d", loop)
		loop = ""
	}
	return dir, release
}

// fillFS allocates a file in dir that leaves about leave bytes free, and returns it.
func fillFS(t testing.TB, dir string, leave int64) string {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	avail := int64(st.Bavail) * st.Bsize
	if avail <= leave {
		t.Fatalf("%s has %d bytes free, wanted more than %d", dir, avail, leave)
	}
	p := filepath.Join(dir, "filler")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Fallocate(int(f.Fd()), 0, 0, avail-leave); err != nil {
		t.Fatalf("fallocate %d bytes in %s: %v", avail-leave, p, err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Statfs(dir, &st); err == nil {
		t.Logf("%s: %d bytes free after the filler", dir, int64(st.Bavail)*st.Bsize)
	}
	return p
}
