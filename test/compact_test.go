package test

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// compactRE reads "dropped D of B blocks ... shrank by N, from A to Z" from compact's
// output, each size in units with its bytes in brackets.
var compactRE = regexp.MustCompile(`(?:would drop|dropped) (\d+) of (\d+) blocks.* (?:would shrink|shrank) by ` +
	sizeRE + `, from ` + sizeRE + ` to ` + sizeRE)

// sizeRE matches a size as vhdfs shows it, "1.5 MiB (1572864 bytes)" or below a KiB
// "512 bytes", and captures the bytes.
const sizeRE = `(?:\d+\.\d [KMGTP]iB \()?(\d+) bytes?\)?`

func compactNumbers(t *testing.T, out string) [5]int64 {
	t.Helper()
	m := compactRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("compact output %q has no numbers", out)
	}
	var n [5]int64
	for i := range n {
		n[i], _ = strconv.ParseInt(m[i+1], 10, 64)
	}
	return n
}

// writeThroughMount mounts img, writes each of blocks (1 MiB each) with fresh
// random data, then zeros over those zeroed says, and unmounts; it updates model.
func writeThroughMount(t *testing.T, img string, model []byte, r *rand.Rand, blocks []int, zeroed func(b int) bool) {
	t.Helper()
	mnt := mountEnv(t, img, nil)
	f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	put := func(d []byte, off int64) {
		if _, err := f.WriteAt(d, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], d)
	}
	for _, b := range blocks {
		d := make([]byte, mib)
		for i := range d {
			d[i] = byte(r.Uint32())
		}
		put(d, int64(b)*mib)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	for _, b := range blocks {
		if zeroed(b) {
			put(make([]byte, mib), int64(b)*mib)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	mustVhdfs(t, "umount", mnt)
}

func fileSizeOf(t *testing.T, p string) int64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func blockRange(lo, hi int) []int {
	var out []int
	for b := lo; b < hi; b++ {
		out = append(out, b)
	}
	return out
}

// TestCompactCommand: data written through a mount into 48 of 64 blocks, zeros
// then written over every other one of them; `vhdfs compact` of the image while it
// is mounted refuses in one line that names the mount point and umount; --dry-run
// writes nothing and reports the numbers the run then achieves; afterwards the file
// is within 10% of its live blocks and metadata, check is clean, and vhdfs export,
// qemu-img convert and libvhdi's vhdimount read the model.
func TestCompactCommand(t *testing.T) {
	t.Parallel()
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		img := createBase(t, dir, format, 0, "disk", "--size", "64M", "--exact-size", "--block-size", "1M")
		size := int64(64 * mib)
		model := make([]byte, size)
		r := rand.New(rand.NewPCG(64, 1))

		mnt := mountEnv(t, img, nil)
		_, errs, code := vhdfs(t, "compact", img)
		if code != 1 || strings.Count(strings.TrimSpace(errs), "\n") != 0 || !strings.Contains(errs, mnt) || !strings.Contains(errs, "umount") {
			t.Errorf("compact of a mounted image: exit %d, stderr %q: want one line naming %s and umount", code, errs, mnt)
		}
		mustVhdfs(t, "umount", mnt)
		writeThroughMount(t, img, model, r, blockRange(0, 48), func(b int) bool { return b%2 == 1 })

		before := fileSizeOf(t, img)
		sum := sha256file(t, img)
		out := mustVhdfs(t, "compact", "--dry-run", img)
		if got := sha256file(t, img); got != sum {
			t.Fatal("compact --dry-run changed the file")
		}
		dry := compactNumbers(t, out)
		out = mustVhdfs(t, "compact", img)
		t.Log(strings.TrimSpace(out))
		got := compactNumbers(t, out)
		if got != dry {
			t.Errorf("--dry-run said %v, the run did %v", dry, got)
		}
		after := fileSizeOf(t, img)
		if got[0] != 24 || got[1] != 48 || got[3] != before || got[4] != after || got[2] != before-after {
			t.Errorf("compact said %q; want 24 of 48 blocks dropped and the file %d -> %d", out, before, after)
		}
		// Live data: 24 blocks of 1 MiB; metadata: up to 4 MiB for VHDX (header
		// section, log, metadata, BAT), a few KiB for VHD.
		meta := int64(8 << 10)
		if format == "vhdx" {
			meta = 4 * mib
		}
		if live := int64(24 * mib); after > meta+live+live/10 {
			t.Errorf("compacted file is %d bytes, want at most %d", after, meta+live+live/10)
		}
		if out, errs, code := vhdfs(t, "check", img); code != 0 {
			t.Errorf("check after compact: exit %d\n%s%s", code, out, errs)
		}
		assertSameBytes(t, "vhdfs export", fileBytes(t, exportImage(t, img)), model)
		if format == "vhdx" {
			assertSameBytes(t, "qemu-img convert", qemuConvert(t, img), model)
		} else {
			assertSameBytes(t, "qemu-img convert", qemuConvert(t, "--image-opts", qemuCurrentSizeOpts(img)), model)
		}
		vm := vhdimount(t, img)
		assertFileEquals(t, vhdiFile(vm, 0), model)
		mustRun(t, "fusermount3", "-u", vm)

		// Compact again: nothing left to do.
		if got := compactNumbers(t, mustVhdfs(t, "compact", img)); got[0] != 0 || got[2] != 0 {
			t.Errorf("a second compact did %v, want nothing", got)
		}
	})
}

// TestCompactDifferencing: in a differencing image, zeros over parent data stay (they
// hide it) and zeros over parent zeros go; the chain reads the same in vhdfs and in
// libvhdi's vhdimount.
func TestCompactDifferencing(t *testing.T) {
	t.Parallel()
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "64M", "--exact-size", "--block-size", "1M")
		model := make([]byte, 64*mib)
		r := rand.New(rand.NewPCG(64, 2))
		writeThroughMount(t, base, model, r, blockRange(0, 32), func(int) bool { return false })
		// 1 MiB blocks (a VHDX child's default is 2 MiB), so the blocks are the base's.
		top := filepath.Join(dir, imageName(format, "top", true))
		mustVhdfs(t, append([]string{"create", "--parent", base, "--block-size", "1M"}, childFormatArgs(format, top)...)...)
		// Data in blocks 0-47, then zeros over the odd ones: 16 over parent data
		// (kept), 8 over parent zeros (dropped).
		writeThroughMount(t, top, model, r, blockRange(0, 48), func(b int) bool { return b%2 == 1 })
		baseSum := sha256file(t, base)
		out := mustVhdfs(t, "compact", top)
		t.Log(strings.TrimSpace(out))
		got := compactNumbers(t, out)
		if got[0] != 8 || got[1] != 48 || !strings.Contains(out, "16 all-zero blocks kept") {
			t.Errorf("compact said %q; want 8 of 48 dropped and 16 kept", out)
		}
		if sha256file(t, base) != baseSum {
			t.Error("compact of the top changed its parent")
		}
		if out, errs, code := vhdfs(t, "check", top); code != 0 {
			t.Errorf("check after compact: exit %d\n%s%s", code, out, errs)
		}
		assertSameBytes(t, "vhdfs export", fileBytes(t, exportImage(t, top)), model)
		vm := vhdimount(t, top)
		if b, err := os.ReadFile(vhdiFile(vm, 1)); err != nil || !bytes.Equal(b, model) {
			t.Errorf("vhdimount's view of the compacted top differs from the model (%v)", err)
		}
		mustRun(t, "fusermount3", "-u", vm)
	})
}

// TestCompactQemuImage: a dynamic VHD made and filled by qemu, whose blocks lie back
// to back without vhdfs's 4 KiB alignment, loses every zeroed block: each hole takes
// a moved block; qemu reads the same disk after.
func TestCompactQemuImage(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	img := filepath.Join(t.TempDir(), "q.vhd")
	mustRun(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", img, "64M")
	qemuIOWrite(t, img, []qemuWrite{{0x41, 0, 40 * mib}, {0, 4 * mib, 2 * mib}, {0, 10 * mib, 4 * mib}, {0, 20 * mib, 2 * mib}})
	want := qemuConvert(t, img)
	got := compactNumbers(t, mustVhdfs(t, "compact", img))
	// 20 blocks of 2 MiB, 4 zeroed; the last 4 move into their places.
	if got[0] != 4 || got[1] != 20 || got[2] != 4*(2*mib+512) {
		t.Errorf("compact did %v: want 4 of 20 blocks dropped and the file 4 blocks shorter", got)
	}
	if out, errs, code := vhdfs(t, "check", img); code != 0 {
		t.Errorf("check after compact: exit %d\n%s%s", code, out, errs)
	}
	assertSameBytes(t, "qemu-img convert after compact", qemuConvert(t, img), want)
}
