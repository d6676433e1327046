package test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/internal/faults"
)

// The VHDX cases where libvhdi 20210425 is wrong (issue 10; README "Compatibility
// notes"): vhdfs is held to a model written here, never to libvhdi.

// vhdxBATOffset finds the BAT region through region table 1 (at 192 KiB): the entry
// whose GUID is 2DC27766-F623-4200-9D64-115E9BFD4A08, stored mixed-endian.
func vhdxBATOffset(t testing.TB, path string) int64 {
	t.Helper()
	f := fileBytesAt(t, path, 192<<10, 64<<10)
	if string(f[:4]) != "regi" {
		t.Fatalf("%s: no region table at 192 KiB", path)
	}
	batGUID := []byte{0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08}
	n := int(binary.LittleEndian.Uint32(f[8:]))
	for i := range n {
		e := f[16+32*i:]
		if bytes.Equal(e[:16], batGUID) {
			return int64(binary.LittleEndian.Uint64(e[16:]))
		}
	}
	t.Fatalf("%s: no BAT region", path)
	return 0
}

func fileBytesAt(t testing.TB, path string, off, n int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("read %s at %d: %v", path, off, err)
	}
	return b
}

func pattern(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	r.Read(b)
	return b
}

// TestVHDXWhereLibvhdiIsWrong: the four cases libvhdi 20210425 reads wrongly, each
// through vhdfs export and a read-only mount, against the model.
//
// Not parallel: the log case arms package faults, which cuts every in-process write.
func TestVHDXWhereLibvhdiIsWrong(t *testing.T) {
	const mb = 1 << 20

	t.Run("child chunk whose sector bitmap entry is not present", func(t *testing.T) {
		// 512-byte sectors, 2 MiB blocks: a chunk is 4 GiB. The child writes in the
		// first chunk only; the second chunk's bitmap entry stays NOT_PRESENT, and
		// its sectors are the parent's.
		dir := t.TempDir()
		base, top := filepath.Join(dir, "base.vhdx"), filepath.Join(dir, "top.avhdx")
		mustVhdfs(t, "create", "-q", "--size", "5G", "--block-size", "2M", base)
		m := &sparseModel{size: 5 << 30}
		m.write(t, base, write{Off: 4<<30 + 3*mb, Data: pattern(1, 512<<10)}, write{Off: 7 * mb, Data: pattern(2, 4096)})
		mustVhdfs(t, "create", "-q", "--parent", base, top)
		m.write(t, top, write{Off: 7*mb + 1024, Data: pattern(3, 1024)})
		m.assertWindows(t, top, 0, 6*mb, 4<<30, 4<<30+2*mb, 5<<30-mb)
		m.assertFileWindows(t, "vhdfs export", exportImage(t, top), 0, 6*mb, 4<<30, 4<<30+2*mb, 5<<30-mb)
	})

	t.Run("ZERO, UNMAPPED and UNDEFINED blocks of a differencing image", func(t *testing.T) {
		dir := t.TempDir()
		base, top := filepath.Join(dir, "base.vhdx"), filepath.Join(dir, "top.avhdx")
		mustVhdfs(t, "create", "-q", "--size", "16M", "--block-size", "1M", base)
		model := make([]byte, 16*mb)
		applyWrites(t, base, model, []write{{Off: 0, Data: pattern(4, 8*mb)}})
		mustVhdfs(t, "create", "-q", "--parent", base, top, "--block-size", "1M")
		// Blocks 1, 2 and 3 of the child become ZERO (2), UNMAPPED (3) and
		// UNDEFINED (1): all read as zeros, never as the parent's data.
		bat := vhdxBATOffset(t, top)
		f, err := os.OpenFile(top, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		for blk, state := range map[int64]uint64{1: 2, 2: 3, 3: 1} {
			var e [8]byte
			binary.LittleEndian.PutUint64(e[:], state)
			if _, err := f.WriteAt(e[:], bat+8*blk); err != nil {
				t.Fatal(err)
			}
			clear(model[blk*mb : (blk+1)*mb])
		}
		f.Close()
		assertVHDXView(t, top, model)
	})

	t.Run("a log that is not empty", func(t *testing.T) {
		dir := t.TempDir()
		base := filepath.Join(dir, "base.vhdx")
		mustVhdfs(t, "create", "-q", "--size", "16M", "--block-size", "1M", base)
		model := make([]byte, 16*mb)
		applyWrites(t, base, model, []write{{Off: 0, Data: pattern(5, mb)}})
		pending := logPendingCopy(t, base, dir, model, write{Off: 5 * mb, Data: pattern(6, 64<<10)})
		sum := sha256file(t, pending)
		assertVHDXView(t, pending, model)
		if got := sha256file(t, pending); got != sum {
			t.Errorf("a read-only mount and export changed %s (sha256 %s, was %s)", pending, got, sum)
		}
		// A writable mount replays the log into the file; qemu then takes it.
		mnt := mMountpoint(t)
		mMount(t, pending, mnt)
		assertSameBytes(t, "read-write mount of a file with a pending log", fileBytes(t, filepath.Join(mnt, "disk.raw")), model)
		mUmount(t, mnt)
		if got := sha256file(t, pending); got == sum {
			t.Errorf("a writable mount left the log in %s", pending)
		}
		if _, stderr, code := run(t, "qemu-img", "check", "-f", "vhdx", pending); code != 0 {
			t.Errorf("qemu-img check after the replay: %s", stderr)
		}
		assertSameBytes(t, "qemu-img convert after the replay", qemuConvert(t, "-f", "vhdx", pending), model)
	})

	t.Run("fixed image past 4 GiB", func(t *testing.T) {
		// The interleaved sector bitmap entry of chunk 0 sits between the BAT
		// entries of blocks 2047 and 2048 (2 MiB blocks): past 4 GiB every entry is
		// one further on.
		dir := t.TempDir()
		base := filepath.Join(dir, "fixed.vhdx")
		mustVhdfs(t, "create", "-q", "--type", "fixed", "--size", "4200M", "--block-size", "2M", base)
		m := &sparseModel{size: 4200 * mb}
		m.write(t, base, write{Off: 4<<30 - 4096, Data: pattern(7, 8192)}, write{Off: 4<<30 + 5*mb, Data: pattern(8, mb)})
		m.assertWindows(t, base, 0, 4<<30-2*mb, 4<<30, 4<<30+4*mb, 4200*mb-2*mb)
		// qemu reads fixed VHDX images past one chunk right: the same windows.
		raw := filepath.Join(t.TempDir(), "qemu.raw")
		mustRun(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", base, raw)
		m.assertFileWindows(t, "qemu-img convert", raw, 0, 4<<30-2*mb, 4<<30, 4<<30+4*mb, 4200*mb-2*mb)
	})
}

// logPendingCopy copies path and writes w into the copy with package faults cutting
// the writer at the first step that leaves its log entry durable and named by the
// header but not yet applied: what a crash there leaves. The model gets w (the log
// entry holds the new block's BAT entry; its data was synced before it).
func logPendingCopy(t testing.TB, path, dir string, model []byte, w write) string {
	t.Helper()
	orig := fileBytes(t, path)
	cp := filepath.Join(dir, "pending.vhdx")
	for k := 1; k < 64; k++ {
		if err := os.WriteFile(cp, orig, 0o644); err != nil {
			t.Fatal(err)
		}
		faults.Arm(1 << 30) // the image must be opened armed to be cut
		c, err := chain.Open(cp, true)
		if err != nil {
			faults.Disarm()
			t.Fatal(err)
		}
		faults.Arm(k)
		_, werr := c.WriteAt(w.Data, w.Off)
		if werr == nil {
			werr = c.Sync() // new blocks' metadata goes through the log here
		}
		faults.Disarm()
		c.Close()
		if werr == nil {
			break
		}
		if !errors.Is(werr, faults.ErrPowerLost) {
			t.Fatalf("write with %d steps: %v", k, werr)
		}
		info := sharedInfo(t, cp)
		if len(info.Layers) == 1 && info.Layers[0].Details["log entries replayed"] != "" && info.Layers[0].Details["log entries replayed"] != "0" {
			copy(model[w.Off:], w.Data)
			return cp
		}
	}
	t.Fatalf("no cut of a block allocation in %s left a pending log", path)
	return ""
}

// sparseModel is the expected disk of an image too large to hold in memory: the
// writes made to it, in order, over zeros.
type sparseModel struct {
	size   int64
	writes []write
}

// write writes ws into the chain whose top is path, through the Go API, and
// records them.
func (m *sparseModel) write(t testing.TB, path string, ws ...write) {
	t.Helper()
	c, err := chain.Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, w := range ws {
		if _, err := c.WriteAt(w.Data, w.Off); err != nil {
			t.Fatalf("%s: write %v: %v", path, w, err)
		}
		m.writes = append(m.writes, w)
	}
}

// window is what the disk holds at [off, off+n).
func (m *sparseModel) window(off, n int64) []byte {
	b := make([]byte, n)
	for _, w := range m.writes {
		lo, hi := max(off, w.Off), min(off+n, w.Off+int64(len(w.Data)))
		if lo < hi {
			copy(b[lo-off:hi-off], w.Data[lo-w.Off:hi-w.Off])
		}
	}
	return b
}

// assertWindows checks 2 MiB windows of image at each offset, through a read-only
// mount, against the model.
func (m *sparseModel) assertWindows(t testing.TB, image string, offs ...int64) {
	t.Helper()
	mnt := mMountpoint(t)
	mMount(t, image, mnt, "-r")
	m.assertFileWindows(t, "read-only mount", filepath.Join(mnt, "disk.raw"), offs...)
	mUmount(t, mnt)
}

func (m *sparseModel) assertFileWindows(t testing.TB, what, path string, offs ...int64) {
	t.Helper()
	if st, err := os.Stat(path); err != nil || st.Size() != m.size {
		t.Fatalf("%s: %s: size %v, want %d", what, path, st, m.size)
	}
	for _, off := range offs {
		n := min(int64(2<<20), m.size-off)
		assertSameBytes(t, fmt.Sprintf("%s at %d", what, off), fileBytesAt(t, path, off, n), m.window(off, n))
	}
}

// assertVHDXView checks vhdfs export (to a file and into a pipe) and a read-only
// mount of image against model.
func assertVHDXView(t testing.TB, image string, model []byte) {
	t.Helper()
	assertFileEquals(t, exportImage(t, image), model)
	// Output's stdout is a pipe: the export splices what the files hold.
	streamed, err := exec.Command(vhdfsBin, "export", image, "-").Output()
	if err != nil {
		t.Fatalf("vhdfs export %s -: %v", image, err)
	}
	assertSameBytes(t, "vhdfs export into a pipe", streamed, model)
	assertSameBytes(t, "read-only mount", mMountRead(t, image), model)
}

// TestVHDXFromQemu: fixed and dynamic VHDX images made by qemu-img and written by
// qemu-io read the same through vhdfs export and a mount as through qemu-img
// convert; written through a vhdfs mount (unaligned writes), qemu-img check passes
// and qemu-img convert shows the writes.
func TestVHDXFromQemu(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	for _, tc := range []struct {
		name string
		opts string
	}{
		{"dynamic, 32M blocks", "block_size=33554432"},
		{"dynamic, 1M blocks", "block_size=1048576"},
		{"fixed", "subformat=fixed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			img := filepath.Join(t.TempDir(), "q.vhdx")
			mustRun(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", tc.opts, img, "40M")
			for i, off := range []int64{0, 1 << 20, 3<<20 + 4096, 33 << 20, 40<<20 - 65536} {
				mustRun(t, "qemu-io", "-f", "vhdx", "-c", fmt.Sprintf("write -P %d %d 65536", 0x41+i, off), img)
			}
			want := qemuConvert(t, "-f", "vhdx", img)
			assertFileEquals(t, exportImage(t, img), want)
			assertSameBytes(t, "read-only mount", mMountRead(t, img), want)

			mnt := mMountpoint(t)
			mMount(t, img, mnt)
			f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			for i, off := range []int64{77, 1<<20 - 300, 20<<20 + 1, 40<<20 - 1000} {
				p := pattern(uint64(10+i), 1000)
				if _, err := f.WriteAt(p, off); err != nil {
					t.Fatal(err)
				}
				copy(want[off:], p)
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			mUmount(t, mnt)
			if _, stderr, code := run(t, "qemu-img", "check", "-f", "vhdx", img); code != 0 {
				t.Errorf("qemu-img check after writes through vhdfs: %s", stderr)
			}
			assertSameBytes(t, "qemu-img convert after writes through vhdfs", qemuConvert(t, "-f", "vhdx", img), want)
		})
	}
}

// TestMixedFormatsRefused: a chain is one format throughout. A parent of the other
// format, found where the child's locator points, is refused with one line that
// says so, and nothing changes; create --parent refuses a name of the other format.
func TestMixedFormatsRefused(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, child, parent, impostor string
		says                          string
	}{
		{"VHDX child, VHD parent", "top.avhdx", "base.vhdx", "--format=vhd", "is a VHD image, but a VHDX image's parent must be VHDX too"},
		{"VHD child, VHDX parent", "top.vhd", "base.vhd", "--format=vhdx", "is a VHDX image, but a VHD image's parent must be VHD too"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			base, top := filepath.Join(dir, tc.parent), filepath.Join(dir, tc.child)
			mustVhdfs(t, "create", "-q", "--size", "8M", base)
			mustVhdfs(t, "create", "-q", "--parent", base, top)
			// The parent is replaced by an image of the other format, same name.
			if err := os.Remove(base); err != nil {
				t.Fatal(err)
			}
			mustVhdfs(t, "create", "-q", "--size", "8M", tc.impostor, base)
			snap := snapshotFiles(t, base, top)
			mnt := mMountpoint(t)
			unmountOnCleanup(t, mnt)
			for _, args := range [][]string{{"info", top}, {"check", top}, {"export", top, filepath.Join(dir, "out.raw")}, {"mount", "-r", top, mnt}} {
				_, stderr, code := vhdfs(t, args...)
				if code == 0 {
					t.Errorf("vhdfs %v succeeded on a mixed chain", args)
					continue
				}
				if args[0] != "check" {
					assertOneLineError(t, stderr, tc.says)
				} else if !bytes.Contains([]byte(stderr), []byte(tc.says)) {
					t.Errorf("vhdfs check: %q does not say %q", stderr, tc.says)
				}
			}
			assertUnchanged(t, snap)
		})
	}
	t.Run("create --parent with a name of the other format", func(t *testing.T) {
		dir := t.TempDir()
		base := filepath.Join(dir, "base.vhdx")
		mustVhdfs(t, "create", "-q", "--size", "8M", base)
		_, stderr, code := vhdfs(t, "create", "--parent", base, filepath.Join(dir, "snap.vhd"))
		if code != 2 || !bytes.Contains([]byte(stderr), []byte("name it")) {
			t.Errorf("create --parent base.vhdx snap.vhd: exit %d, %q", code, stderr)
		}
		if _, err := os.Stat(filepath.Join(dir, "snap.vhd")); err == nil {
			t.Error("snap.vhd was made")
		}
	})
}
