package test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// requireSmallExt4 fails the test unless it can make and mount a small ext4.
func requireSmallExt4(t testing.TB) {
	t.Helper()
	for _, tool := range []string{"mkfs.ext4", "losetup", "mount", "umount"} {
		requireTool(t, tool)
	}
	if os.Geteuid() != 0 {
		t.Fatal("mounting an ext4 file system on a loop device needs root")
	}
}

// TestWriteENOSPC: a write into a new block of an image whose file system has no room
// for the block fails with ENOSPC at write(2), not at a later flush; writes into
// blocks that exist go on working, and the image stays valid.
func TestWriteENOSPC(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		requireSmallExt4(t)
		small, release := mountSmallExt4(t, 32<<20)
		// 2 MiB blocks (VHD's default; VHDX's would be 32 MiB, as much as the file system).
		img := createBase(t, small, format, 0, "disk", "--size", "64M", "--exact-size", "--block-size", "2M")
		model := make([]byte, virtualSize(t, img))
		applyWrites(t, img, model, []write{{0, bytes.Repeat([]byte{0x5a}, 1<<20)}})
		filler := fillFS(t, small, 1<<20) // less than a 2 MiB block

		mnt := mountEnv(t, img, nil)
		disk := filepath.Join(mnt, "disk.raw")
		_, errs, code := run(t, "dd", "if=/dev/urandom", "of="+disk, "bs=4096", "count=1", "seek=4096", "conv=notrunc,fsync")
		if code == 0 || !strings.Contains(errs, "No space left on device") {
			t.Errorf("dd into a new block of a full file system: exit %d, stderr %q; want No space left on device", code, errs)
		}
		// The block that exists takes writes.
		mustRun(t, "dd", "if=/dev/zero", "of="+disk, "bs=4096", "count=4", "seek=16", "conv=notrunc,fsync")
		clear(model[16*4096 : 20*4096])
		if out, errs, code := vhdfs(t, "umount", mnt); code != 0 {
			t.Fatalf("umount: exit %d\n%s%s", code, out, errs)
		}
		mCheck(t, img)
		if err := os.Remove(filler); err != nil {
			t.Fatal(err)
		}
		assertFileEquals(t, exportImage(t, img), model)
		release()
	})
}

// TestAcknowledgedWritesSurvive fills the image's file system with writes through
// the mount until they fail: every write that returned success is there after an
// fsync and a remount, every one that failed (ENOSPC, nothing else) left its range as
// it was, and the fsync and the umount succeed.
func TestAcknowledgedWritesSurvive(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		requireSmallExt4(t)
		small, release := mountSmallExt4(t, 32<<20)
		// 64 KiB blocks (1 MiB, the least, for VHDX): many allocations, each small
		// against the room left.
		blk := 64 << 10
		if format == "vhdx" {
			blk = 1 << 20
		}
		img := createBase(t, small, format, 0, "disk", "--size", "256M", "--exact-size", "--block-size", fmt.Sprint(blk))
		size := virtualSize(t, img)
		model := make([]byte, size)
		filler := fillFS(t, small, 6<<20)

		mnt := mountEnv(t, img, nil)
		disk := filepath.Join(mnt, "disk.raw")
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(8006, 8007))
		blocks := rng.Perm(int(size / int64(blk)))
		var ok, failed int
		for _, b := range blocks {
			// Inside one new block: a failed write leaves nothing behind.
			n := 512 * (1 + rng.IntN(blk/512))
			off := int64(b*blk) + int64(512*rng.IntN((blk-n)/512+1))
			p := mRandBytes(rng, n)
			if _, err := mPwrite(f, p, off); err != nil {
				if !errors.Is(err, syscall.ENOSPC) {
					f.Close()
					t.Fatalf("write of %d bytes at %d: %v, want success or ENOSPC", n, off, err)
				}
				if failed++; failed == 20 {
					break
				}
				continue
			}
			copy(model[off:], p)
			ok++
		}
		t.Logf("%d writes acknowledged before %d failed with ENOSPC", ok, failed)
		if failed == 0 {
			t.Fatal("the file system never filled up")
		}
		if err := f.Sync(); err != nil {
			t.Errorf("fsync after the acknowledged writes: %v", err)
		}
		if err := f.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		if got, want := md5file(t, disk), md5Of(model); got != want {
			t.Errorf("disk.raw before the umount: md5 %s, want %s", got, want)
		}
		if out, errs, code := vhdfs(t, "umount", mnt); code != 0 {
			t.Errorf("umount: exit %d\n%s%s", code, out, errs)
		}
		mCheck(t, img)
		mnt = mountEnv(t, img, nil)
		assertFileEquals(t, filepath.Join(mnt, "disk.raw"), model)
		mustVhdfs(t, "umount", mnt)
		if err := os.Remove(filler); err != nil {
			t.Fatal(err)
		}
		release()
	})
}
