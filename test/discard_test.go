package test

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// punch is one fallocate on disk.raw and the bytes it must zero in the model
// (the part of [off, off+n) inside the disk).
type punch struct {
	name   string
	mode   uint32
	off, n int64
}

const punchMode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE

// fallocate punches p on f and zeroes its range in model.
func (p punch) apply(t testing.TB, f *os.File, model []byte) {
	t.Helper()
	if err := unix.Fallocate(int(f.Fd()), p.mode, p.off, p.n); err != nil {
		t.Fatalf("%s: fallocate(%#x, %d, %d): %v", p.name, p.mode, p.off, p.n, err)
	}
	clear(model[p.off:min(p.off+p.n, int64(len(model)))])
}

// TestDiscardThroughMount: fallocate PUNCH_HOLE and ZERO_RANGE on disk.raw of a
// two-image chain (the base holds data in the first half, the top everywhere) make
// whole blocks, partial blocks and unaligned byte ranges read zeros, over parent data
// and over none; the top's file gives back its space; SEEK_HOLE finds the dropped
// blocks; other modes are refused. After unmounting, check is clean, a fresh mount,
// export and vhdimount show the model, and a merge keeps it.
func TestDiscardThroughMount(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		const size = 16 * mib
		rng := rand.New(rand.NewPCG(1801, 1802))
		base := mRandBytes(rng, 8*mib)
		top := mRandBytes(rng, size)
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "16M", "--block-size", "512K", "--exact-size"},
			LayerWrites: func(i int) []write {
				if i == 0 {
					return []write{{Off: 0, Data: base}}
				}
				return []write{{Off: 0, Data: top}}
			}})
		lower := snapshotFiles(t, c.Images[0])
		model := bytes.Clone(c.Model())
		bs := vhdfsInfo(t, c.Top()).Layers[0].BlockSize
		skipLibvhdi := map[int64]bool{} // granules libvhdi cannot be asked about

		mnt := mMountpoint(t)
		mMount(t, c.Top(), mnt)
		disk := filepath.Join(mnt, "disk.raw")
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		before := allocatedBytes(t, c.Top())
		punches := []punch{
			{"whole blocks, nothing below", punchMode, 10 * mib, 4 * mib},
			{"whole blocks over parent data", punchMode, 2 * mib, 2 * mib},
			{"unaligned bytes over parent data", punchMode, 5*mib + 1000, 70000},
			{"unaligned bytes across a block, nothing below", punchMode, 9*mib - 4096 + 17, 123457},
			{"zero range, sectors", unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE, 6*mib + 512, 3 * 512},
			{"zero range without KEEP_SIZE inside the disk", unix.FALLOC_FL_ZERO_RANGE, 7 * mib, 64 << 10},
			{"past the end", punchMode, size - 1000, mib},
		}
		for _, p := range punches {
			p.apply(t, f, model)
			mGranules(skipLibvhdi, p.off, min(p.n, size-p.off))
		}
		if format == "vhdx" {
			// libvhdi shows the parent through a ZERO block.
			mGranules(skipLibvhdi, 2*mib, 2*mib+1)
		}
		for _, bad := range []struct {
			name string
			mode uint32
			off  int64
			want syscall.Errno
		}{
			{"allocate", 0, 0, unix.EOPNOTSUPP},
			{"punch without KEEP_SIZE", unix.FALLOC_FL_PUNCH_HOLE, 0, unix.EOPNOTSUPP},
			{"collapse range", unix.FALLOC_FL_COLLAPSE_RANGE, 0, unix.EOPNOTSUPP},
			{"zero range growing the file", unix.FALLOC_FL_ZERO_RANGE, size - 4096, unix.EINVAL},
		} {
			if err := unix.Fallocate(int(f.Fd()), bad.mode, bad.off, 2*mib); !errors.Is(err, bad.want) {
				t.Errorf("%s: fallocate = %v, want %v", bad.name, err, bad.want)
			}
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		if st, err := f.Stat(); err != nil || st.Size() != size {
			t.Fatalf("stat disk.raw: %v, size %d, want %d", err, st.Size(), size)
		}
		assertSameBytes(t, "disk.raw after the punches", fileBytes(t, disk), model)
		if hole, err := unix.Seek(int(f.Fd()), 10*mib, unix.SEEK_HOLE); err != nil || hole != 10*mib {
			t.Errorf("SEEK_HOLE at 10 MiB = %d, %v: want 10 MiB, the dropped blocks", hole, err)
		}
		if data, err := unix.Seek(int(f.Fd()), 10*mib, unix.SEEK_DATA); err != nil || data != 14*mib {
			t.Errorf("SEEK_DATA at 10 MiB = %d, %v: want 14 MiB, past the dropped blocks", data, err)
		}
		after := allocatedBytes(t, c.Top())
		t.Logf("%s: top allocation %d -> %d bytes (block size %d)", format, before, after, bs)
		if before-after < 5*mib {
			t.Errorf("top allocation %d -> %d: want at least 5 MiB back (4 MiB of dropped blocks and 2 MiB of punched ones)", before, after)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.OpenFile(filepath.Join(mnt, "layers", mLayerName(1, c.Images[0])), os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
			t.Errorf("open layers/ for writing: %v, want EROFS", err)
		}
		mUmount(t, mnt)

		assertUnchanged(t, lower)
		mCheck(t, c.Top())
		assertSameBytes(t, "a fresh mount", mMountRead(t, c.Top()), model)
		assertSameBytes(t, "export", fileBytes(t, exportImage(t, c.Top())), model)
		vmnt := vhdimount(t, c.Top())
		mAssertSameGranules(t, "vhdimount of the top", fileBytes(t, vhdiFile(vmnt, 1)), model, skipLibvhdi)

		mMount(t, c.Top(), mnt)
		if e := control(mnt, "merge"); e != 0 {
			t.Fatalf("merge: %v", e)
		}
		assertSameBytes(t, "disk.raw after the merge", fileBytes(t, disk), model)
		mUmount(t, mnt)
		mCheck(t, c.Top())
		assertSameBytes(t, "export after the merge", fileBytes(t, exportImage(t, c.Top())), model)
	})
}

// TestDiscardSingleImage: punches into a lone dynamic image read the same in qemu-img
// convert, and the image gives back the space of the dropped blocks.
func TestDiscardSingleImage(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		const size = 8 * mib
		rng := rand.New(rand.NewPCG(1803, 1804))
		data := mRandBytes(rng, size)
		c := makeChain(t, chainOptions{Format: format, Depth: 1, Create: []string{"--size", "8M", "--block-size", "1M", "--exact-size"},
			LayerWrites: func(int) []write { return []write{{Off: 0, Data: data}} }})
		model := bytes.Clone(c.Model())
		mnt := mMountpoint(t)
		mMount(t, c.Top(), mnt)
		f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		before := allocatedBytes(t, c.Top())
		for _, p := range []punch{
			{"whole blocks", punchMode, 2 * mib, 3 * mib},
			{"part of a block", punchMode, 6*mib + 4096, 100000},
			{"unaligned bytes", punchMode, mib - 333, 1000},
		} {
			p.apply(t, f, model)
		}
		f.Close()
		after := allocatedBytes(t, c.Top())
		t.Logf("%s: allocation %d -> %d bytes", format, before, after)
		if before-after < 3*mib {
			t.Errorf("allocation %d -> %d: want at least 3 MiB back", before, after)
		}
		mUmount(t, mnt)
		mCheck(t, c.Top())
		assertSameBytes(t, "qemu-img convert", qemuConvert(t, c.Top()), model)
	})
}

// TestDiscardFstrim: the kernel's own discards reach the image. An ext4 made on a
// loop device over disk.raw takes a 300 MiB file; once it is deleted, fstrim gives
// at least 200 MiB of the top image's space back, and e2fsck finds the file system
// clean.
func TestDiscardFstrim(t *testing.T) {
	for _, tool := range []string{"losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "fstrim"} {
		requireTool(t, tool)
	}
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "512M"}})
		mnt := mMountpoint(t)
		fsdir := filepath.Join(t.TempDir(), "ext4")
		if err := os.Mkdir(fsdir, 0o755); err != nil {
			t.Fatal(err)
		}
		var loop string
		mMount(t, c.Top(), mnt)
		mLoopCleanup(t, &loop)
		mUmountCleanup(t, fsdir)
		loop = strings.TrimSpace(mustRun(t, "losetup", "--find", "--show", filepath.Join(mnt, "disk.raw")))
		maxDiscard := strings.TrimSpace(string(fileBytes(t, "/sys/block/"+filepath.Base(loop)+"/queue/discard_max_bytes")))
		if n, err := strconv.ParseInt(maxDiscard, 10, 64); err != nil || n == 0 {
			t.Fatalf("%s over disk.raw does not discard (discard_max_bytes %q)", loop, maxDiscard)
		}
		mustRun(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop)
		mustRun(t, "mount", "-t", "ext4", loop, fsdir)
		rng := rand.New(rand.NewPCG(1805, 1806))
		big := filepath.Join(fsdir, "big.bin")
		out, err := os.Create(big)
		if err != nil {
			t.Fatal(err)
		}
		for range 300 {
			if _, err := out.Write(mRandBytes(rng, mib)); err != nil {
				t.Fatal(err)
			}
		}
		if err := out.Close(); err != nil {
			t.Fatal(err)
		}
		mustRun(t, "sync", "-f", fsdir)
		mustRun(t, "sync", filepath.Join(mnt, "disk.raw"))
		full := allocatedBytes(t, c.Top())
		if err := os.Remove(big); err != nil {
			t.Fatal(err)
		}
		mustRun(t, "sync", "-f", fsdir)
		trim := mustRun(t, "fstrim", "-v", fsdir)
		mustRun(t, "sync", filepath.Join(mnt, "disk.raw"))
		trimmed := allocatedBytes(t, c.Top())
		t.Logf("%s: top allocation with the file %d MiB, after rm and fstrim %d MiB (%s)", format, full>>20, trimmed>>20, strings.TrimSpace(trim))
		if full-trimmed < 200*mib {
			t.Errorf("fstrim gave back %d MiB of the top image, want at least 200", (full-trimmed)>>20)
		}
		mustRun(t, "umount", fsdir)
		mustRun(t, "e2fsck", "-f", "-n", loop)
		mustRun(t, "losetup", "-d", loop)
		loop = ""
		mUmount(t, mnt)
		mCheck(t, c.Top())
	})
}
