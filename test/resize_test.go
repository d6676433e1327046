package test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/chain"
)

// resizeExport flattens the chain at path with vhdfs export and returns its bytes.
func resizeExport(t *testing.T, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "export.raw")
	mustVhdfs(t, "export", path, out)
	return fileBytes(t, out)
}

// assertResized checks what every reader says of the image at path after a resize
// to size: qemu-img (not for a differencing VHDX, which it cannot read) and vhdiinfo
// report the size, vhdfs export and qemu-img convert (not of a differencing image,
// whose parent qemu does not read) read model, and check is clean.
func assertResized(t *testing.T, path string, size int64, model []byte, differencing bool) {
	t.Helper()
	if int64(len(model)) != size {
		t.Fatalf("test bug: model of %d bytes for size %d", len(model), size)
	}
	if !(differencing && formatOf(path) == "vhdx") {
		if qi := qemuImgInfo(t, "-f", qemuFormat(path), path); qi.VirtualSize != size {
			t.Errorf("qemu-img info: virtual size %d, want %d", qi.VirtualSize, size)
		}
	}
	if !differencing { // qemu reads a differencing VHD without its parent
		if got := qemuConvert(t, path); md5Of(got[:min(len(got), len(model))]) != md5Of(model) || len(got) != len(model) {
			t.Errorf("qemu-img convert: %d bytes, not the model's %d", len(got), len(model))
		}
	}
	if _, n := vhdiinfo(t, path); n != size {
		t.Errorf("vhdiinfo: media size %d, want %d", n, size)
	}
	if got := resizeExport(t, path); !bytes.Equal(got, model) {
		t.Errorf("vhdfs export: %d bytes, not the model (%d bytes)", len(got), len(model))
	}
	if out, errs, code := vhdfs(t, "check", path); code != 0 || strings.Contains(out, "lies inside the space of the header") {
		t.Errorf("check after resize: exit %d\n%s%s", code, out, errs)
	}
}

func TestResize(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	requireTool(t, "vhdiinfo")
	for _, tc := range []struct {
		name   string
		create []string // create arguments, without the image; nil: a snapshot of a dynamic base
		file   string
		exact  []string
		grow   int64
		shrink int64
	}{
		{"dynamic VHD, BAT grown in place", []string{"--size", "40M", "--exact-size"}, "d.vhd", []string{"--exact-size"}, 100 * mib, 20*mib + 512},
		{"dynamic VHD, BAT grown over block 0", []string{"--size", "40M", "--exact-size", "--block-size", "64K"}, "m.vhd", []string{"--exact-size"}, 100 * mib, 20*mib + 512},
		{"fixed VHD", []string{"--size", "40M", "--exact-size", "--type", "fixed"}, "f.vhd", []string{"--exact-size"}, 72 * mib, 24 * mib},
		{"dynamic VHDX", []string{"--size", "40M", "--block-size", "1M"}, "d.vhdx", nil, 100*mib + 4096, 20 * mib},
		{"differencing VHD top", nil, "top.vhd", []string{"--exact-size"}, 90 * mib, 30 * mib},
		{"differencing VHDX top", nil, "top.vhdx", nil, 90 * mib, 30 * mib},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, tc.file)
			model := make([]byte, 40*mib)
			differencing := tc.create == nil
			if differencing {
				base := filepath.Join(dir, "base"+filepath.Ext(tc.file))
				args := []string{"create", "-q", "--size", "40M", base}
				if filepath.Ext(base) == ".vhd" {
					args = append(args[:4], "--exact-size", base)
				}
				mustVhdfs(t, args...)
				applyWrites(t, base, model, []write{{0, pattern(1, 8*mib)}, {30 * mib, pattern(2, 10*mib)}})
				mustVhdfs(t, "create", "--parent", base, path)
			} else {
				mustVhdfs(t, append(append([]string{"create", "-q"}, tc.create...), path)...)
			}
			applyWrites(t, path, model, []write{{mib, pattern(3, 3*mib)}, {20*mib - 4096, pattern(4, 12*mib)}, {40*mib - 8192, pattern(5, 8192)}})

			// Grow: the data stays, the new space reads zeros.
			var before layout
			if filepath.Ext(path) == ".vhd" {
				before = readLayout(t, path)
			}
			mustVhdfs(t, append([]string{"resize", path, sizeArg(tc.grow)}, tc.exact...)...)
			if before.Dynamic {
				// A table that grows over block 0 moves it to the end first.
				after := readLayout(t, path)
				entries := tc.grow / int64(before.BlockSize)
				want := before.TableOff+(entries*4+511)/512*512 > int64(before.BAT[0])*512
				if moved := after.BAT[0] != before.BAT[0]; moved != want || int64(after.MaxEntries) != entries || int64(after.BAT[0])*512 < after.TableOff+entries*4 {
					t.Errorf("BAT of %d entries at %d (was %d at %d): block 0 at sector %d (was %d), moved %v, want %v",
						after.MaxEntries, after.TableOff, before.MaxEntries, before.TableOff, after.BAT[0], before.BAT[0], moved, want)
				}
			}
			model = append(model, make([]byte, tc.grow-int64(len(model)))...)
			assertResized(t, path, tc.grow, model, differencing)

			// Shrink below data: refused, nothing changed.
			_, errs, code := vhdfs(t, append([]string{"resize", path, sizeArg(tc.shrink)}, tc.exact...)...)
			if code == 0 {
				t.Fatalf("shrink below stored data succeeded")
			}
			assertOneLineError(t, errs, "data is stored at", "--force")
			if got := resizeExport(t, path); !bytes.Equal(got, model) {
				t.Fatal("a refused shrink changed the disk")
			}
			mustVhdfs(t, append([]string{"resize", "--force", path, sizeArg(tc.shrink)}, tc.exact...)...)
			model = model[:tc.shrink]
			assertResized(t, path, tc.shrink, model, differencing)

			// Grown again, what was cut off is gone (in a differencing image the
			// parent shows there again: --force, as the child no longer covers it).
			args := append([]string{"resize", path, "40M"}, tc.exact...)
			if differencing {
				if _, errs, code := vhdfs(t, args...); code == 0 || !strings.Contains(errs, "parent") {
					t.Fatalf("growing a child over its parent's data: exit %d, %q; want a refusal", code, errs)
				}
				args = append(args, "--force")
			}
			mustVhdfs(t, args...)
			model = append(model, make([]byte, 40*mib-len(model))...)
			if differencing {
				base := resizeExport(t, filepath.Join(dir, "base"+filepath.Ext(tc.file)))
				copy(model[tc.shrink:], base[tc.shrink:])
			}
			assertResized(t, path, 40*mib, model, differencing)
		})
	}
}

// TestResizeVHDXPastBATRegion grows a dynamic VHDX past what its BAT region holds
// (1 MiB of entries: 128 GiB at 1 MiB blocks): the table moves to the end of the
// file, and qemu-img, vhdiinfo and vhdfs check agree on the new size and data. The
// disk is too large to hold whole: the raw image qemu-img converts it to is compared
// with the model sparsely (its data extents, and the written ranges).
func TestResizeVHDXPastBATRegion(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	requireTool(t, "vhdiinfo")
	const gib = 1 << 30
	const old, grown = 100*gib + 4096, 200*gib + 8192
	path := filepath.Join(t.TempDir(), "big.vhdx")
	mustVhdfs(t, "create", "-q", "--size", sizeArg(old), "--block-size", "1M", path)
	ws := []write{{0, pattern(11, 3*mib)}, {4096 * mib, pattern(12, mib+4096)}, {60 * gib, pattern(13, 2*mib)}, {old - 8192, pattern(14, 8192)}}
	c, err := chain.Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range ws {
		if _, err := c.WriteAt(w.Data, w.Off); err != nil {
			t.Fatalf("write %v: %v", w, err)
		}
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	batBefore := vhdxBATOffset(t, path)

	mustVhdfs(t, "resize", path, sizeArg(grown))
	if after := vhdxBATOffset(t, path); after <= batBefore {
		t.Errorf("BAT region at %d after the resize, was at %d: not moved to the end", after, batBefore)
	}
	if qi := qemuImgInfo(t, "-f", "vhdx", path); qi.VirtualSize != grown {
		t.Errorf("qemu-img info: virtual size %d, want %d", qi.VirtualSize, grown)
	}
	mustRun(t, "qemu-img", "check", "-f", "vhdx", path)
	if _, n := vhdiinfo(t, path); n != grown {
		t.Errorf("vhdiinfo: media size %d, want %d", n, grown)
	}
	if out, errs, code := vhdfs(t, "check", path); code != 0 {
		t.Errorf("check after resize: exit %d\n%s%s", code, out, errs)
	}
	raw := filepath.Join(t.TempDir(), "big.raw")
	mustRun(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", path, raw)
	sparseEqual(t, raw, grown, ws)

	// And from the new region on: a write in the grown space, read back by qemu.
	end := write{grown - 3*mib, pattern(15, 2*mib)}
	c, err = chain.Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(end.Data, end.Off); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	ws = append(ws, end)
	os.Remove(raw)
	mustRun(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", path, raw)
	sparseEqual(t, raw, grown, ws)
}

// sparseEqual checks that the raw file at path is size bytes of zeros with ws
// written over them, reading only its data extents (SEEK_DATA, SEEK_HOLE: a hole
// reads zeros) and the written ranges.
func sparseEqual(t *testing.T, path string, size int64, ws []write) {
	t.Helper()
	want := func(off, n int64) []byte {
		b := make([]byte, n)
		for _, w := range ws {
			lo, hi := max(off, w.Off), min(off+n, w.Off+int64(len(w.Data)))
			if lo < hi {
				copy(b[lo-off:hi-off], w.Data[lo-w.Off:hi-w.Off])
			}
		}
		return b
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != size {
		t.Fatalf("%s: %d bytes, want %d", path, st.Size(), size)
	}
	check := func(off, n int64) {
		t.Helper()
		for done := int64(0); done < n; done += 16 * mib {
			k := min(16*mib, n-done)
			got := make([]byte, k)
			if _, err := f.ReadAt(got, off+done); err != nil {
				t.Fatalf("%s: read %d bytes at %d: %v", path, k, off+done, err)
			}
			if !bytes.Equal(got, want(off+done, k)) {
				t.Fatalf("%s: %d bytes at %d differ from the model", path, k, off+done)
			}
		}
	}
	for _, w := range ws {
		check(w.Off, int64(len(w.Data)))
	}
	extents := 0
	for off := int64(0); off < size; {
		d, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		h, err := unix.Seek(int(f.Fd()), d, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		check(d, h-d)
		extents++
		off = h
	}
	if extents == 0 {
		t.Fatalf("%s: no data at all", path)
	}
}

func sizeArg(n int64) string { return strconv.FormatInt(n, 10) }

// sfdiskInto writes a partition table with sfdisk into the disk of image, through a
// mount.
func sfdiskInto(t *testing.T, image, script string) {
	t.Helper()
	requireTool(t, "sfdisk")
	mnt := mMountpoint(t)
	mMount(t, image, mnt)
	cmd := exec.Command("sfdisk", "--no-reread", "--no-tell-kernel", "-q", filepath.Join(mnt, "disk.raw"))
	cmd.Stdin = strings.NewReader(script)
	out, err := cmd.CombinedOutput()
	mUmount(t, mnt)
	if err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
}

// TestResizePartitions: a shrink past the end of a partition is refused without
// --force, and --smallest shrinks to the end of the last one (a GPT's backup after
// it), for MBR and GPT, VHD and VHDX.
func TestResizePartitions(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, file, script string
		end                int64 // where the last partition ends
		smallest           int64 // --smallest (--exact-size for VHD)
	}{
		{"MBR in a VHD", "m.vhd", "label: dos\nstart=2048, size=10M, type=83\nstart=12M, size=28M, type=7\n", 40 * mib, 40 * mib},
		{"GPT in a VHD", "g.vhd", "label: gpt\nstart=2048, size=30M\n", 31 * mib, 31*mib + 33*512},
		{"GPT in a VHDX", "g.vhdx", "label: gpt\nstart=2048, size=30M\n", 31 * mib, 31*mib + 33*512},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), tc.file)
			exact := filepath.Ext(path) == ".vhd"
			args := []string{"create", "-q", "--size", "64M", path}
			if exact {
				args = append(args, "--exact-size")
			}
			mustVhdfs(t, args...)
			sfdiskInto(t, path, tc.script)
			before := resizeExport(t, path)

			_, errs, code := vhdfs(t, "resize", path, sizeArg(tc.end-mib))
			if code == 0 {
				t.Fatal("shrink past a partition's end succeeded")
			}
			assertOneLineError(t, errs, "partition", "--smallest", "--force")
			if got := resizeExport(t, path); !bytes.Equal(got, before) {
				t.Fatal("a refused shrink changed the disk")
			}

			var ex []string // VHD sizes exact, as created
			if exact {
				// First as create rounds: up to a whole CHS geometry, no less than the end.
				mustVhdfs(t, "resize", "--smallest", path)
				size := qemuImgInfo(t, "-f", "vpc", path).VirtualSize
				if size != geometryBytes(t, path) || size < tc.smallest || size >= tc.smallest+mib {
					t.Errorf("--smallest without --exact-size: qemu sees %d, geometry %d, partitions end at %d", size, geometryBytes(t, path), tc.smallest)
				}
				if got := resizeExport(t, path); !bytes.Equal(got, before[:size]) {
					t.Fatalf("--smallest: %d bytes, want the first %d of the disk", len(got), size)
				}
				ex = []string{"--exact-size"}
			}
			mustVhdfs(t, append([]string{"resize", "--smallest", path}, ex...)...)
			if got := resizeExport(t, path); !bytes.Equal(got, before[:tc.smallest]) {
				t.Fatalf("--smallest: %d bytes, want the first %d of the disk", len(got), tc.smallest)
			}
			if _, n := vhdiinfo(t, path); n != tc.smallest {
				t.Errorf("vhdiinfo after --smallest: %d, want %d", n, tc.smallest)
			}
			if out, errs, code := vhdfs(t, "check", path); code != 0 {
				t.Errorf("check: exit %d\n%s%s", code, out, errs)
			}
			// The partitions are whole: sfdisk reads them from the raw disk.
			raw := filepath.Join(t.TempDir(), "smallest.raw")
			mustVhdfs(t, "export", path, raw)
			out := mustRun(t, "sfdisk", "--dump", raw)
			if n := strings.Count(out, "start="); n != strings.Count(tc.script, "start=") {
				t.Errorf("sfdisk --dump after --smallest: %d partitions\n%s", n, out)
			}

			// --force cuts into the partition.
			mustVhdfs(t, append([]string{"resize", "--force", path, sizeArg(tc.end / 2)}, ex...)...)
			if got := resizeExport(t, path); !bytes.Equal(got, before[:tc.end/2]) {
				t.Fatal("--force shrink: the disk is not the first half")
			}
		})
	}
}

// TestResizeRefusesMounted: a mounted image is refused with its mount point named; a
// size like create's rounds up to the same geometry.
func TestResizeRefusesMounted(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "a.vhd")
	mustVhdfs(t, "create", "-q", "--size", "30M", path)
	mnt := mMountpoint(t)
	mMount(t, path, mnt)
	_, errs, code := vhdfs(t, "resize", path, "40M")
	mUmount(t, mnt)
	if code == 0 {
		t.Fatal("resize of a mounted image succeeded")
	}
	assertOneLineError(t, errs, "mounted at "+mnt)

	// Rounded as create rounds.
	ref := filepath.Join(dir, "ref.vhd")
	mustVhdfs(t, "create", "-q", "--size", "100M", ref)
	mustVhdfs(t, "resize", path, "100M")
	if a, b := qemuImgInfo(t, "-f", "vpc", path).VirtualSize, qemuImgInfo(t, "-f", "vpc", ref).VirtualSize; a != b {
		t.Errorf("resize to 100M gave %d bytes, create --size 100M %d", a, b)
	}
	if out, errs, code := vhdfs(t, "check", path); code != 0 {
		t.Errorf("check: exit %d\n%s%s", code, out, errs)
	}
}
