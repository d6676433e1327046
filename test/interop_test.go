package test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf16"
)

// TestExactSizeInQemu: an --exact-size image whose size no CHS geometry describes
// opens in qemu-img 7.2 (which sizes images of creators it does not know by their
// geometry) with the size vhdfs gives it, and qemu-img convert keeps its tail.
func TestExactSizeInQemu(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	requireTool(t, "vhdiinfo")
	for _, typ := range []string{"dynamic", "fixed"} {
		t.Run(typ, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "e.vhd")
			mustVhdfs(t, "create", "--size", "100M", "--exact-size", "--type", typ, img)
			const size = 100 * mib
			model := make([]byte, size)
			tail := bytes.Repeat([]byte{0xa5}, 64<<10)
			applyWrites(t, img, model, []write{{Off: size - int64(len(tail)), Data: tail}})
			if got := vhdfsInfo(t, img).VirtualSize; got != size {
				t.Fatalf("vhdfs sees %d bytes, want %d", got, size)
			}
			if got := qemuImgInfo(t, "-f", "vpc", img).VirtualSize; got != size {
				t.Errorf("qemu-img info sees %d bytes, want %d", got, size)
			}
			if _, n := vhdiinfo(t, img); n != size {
				t.Errorf("vhdiinfo sees %d bytes, want %d", n, size)
			}
			assertSameBytes(t, "qemu-img convert", qemuConvert(t, img), model)
			assertSameBytes(t, "vhdfs export", fileBytes(t, exportImage(t, img)), model)
		})
	}
}

// TestCreateBlockSizeWarning: a block size above 2 MiB is accepted with one warning
// line that names who cannot open the image; 2 MiB and below, none.
func TestCreateBlockSizeWarning(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	_, stderr, code := vhdfs(t, "create", "--size", "64M", "--block-size", "4M", filepath.Join(dir, "big.vhd"))
	if code != 0 || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "blktap") || !strings.Contains(stderr, "warning") {
		t.Errorf("create --block-size 4M: exit %d, stderr %q; want success and one warning line naming blktap", code, stderr)
	}
	if _, stderr, code := vhdfs(t, "create", "--size", "64M", "--block-size", "2M", filepath.Join(dir, "ok.vhd")); code != 0 || stderr != "" {
		t.Errorf("create --block-size 2M: exit %d, stderr %q; want silence", code, stderr)
	}
}

// TestDifferencingParentFields: a differencing image vhdfs creates names its parent
// by base name, holds W2ru and MacX locators relative to itself (no W2ku: no Windows
// absolute path can be formed on Linux), which info --json shows, and passes the
// spec checker: room for its locators before any data block.
func TestDifferencingParentFields(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	base, child := filepath.Join(dir, "base.vhd"), filepath.Join(dir, "child.vhd")
	mustVhdfs(t, "create", "--size", "16M", base)
	mustVhdfs(t, "create", "--parent", base, child)
	l := vhdfsInfo(t, child).Layers[0]
	if l.ParentName != "base.vhd" {
		t.Errorf("parent name %q, want base.vhd", l.ParentName)
	}
	var got []string
	for _, loc := range l.Locators {
		got = append(got, loc.Platform+"="+loc.Path)
	}
	if want := []string{`W2ru=.\base.vhd`, "MacX=file://./base.vhd"}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("info --json locators %q, want %q", got, want)
	}
	specCheck(t, child)
}

// specCheck is an independent reading of the VHD specification (and of the rules
// blktap's vhd-util check adds) for an image vhdfs wrote: footer and header
// checksums, the footer copy, parent name = the base name of every path locator,
// locator data inside its space and before the first data block, no block
// overlapping metadata, another block or the footer.
func specCheck(t testing.TB, path string) {
	t.Helper()
	b := fileBytes(t, path)
	if len(b) < 512 || len(b)%512 != 0 {
		t.Fatalf("%s: size %d is not a whole number of sectors", path, len(b))
	}
	foot := b[len(b)-512:]
	be := binary.BigEndian
	sum := func(p []byte, at int) uint32 {
		var s uint32
		for i, c := range p {
			if i < at || i >= at+4 {
				s += uint32(c)
			}
		}
		return ^s
	}
	if string(foot[:8]) != "conectix" || sum(foot, 64) != be.Uint32(foot[64:]) {
		t.Fatalf("%s: footer cookie or checksum bad", path)
	}
	if be.Uint32(foot[8:])&2 == 0 || !allZero(foot[86:]) || foot[85] > 1 {
		t.Errorf("%s: footer features or reserved bytes", path)
	}
	typ := be.Uint32(foot[60:])
	if typ == 2 {
		if int64(len(b)) != int64(be.Uint64(foot[48:]))+512 {
			t.Errorf("%s: fixed image of %d bytes for size %d", path, len(b), be.Uint64(foot[48:]))
		}
		return
	}
	if !bytes.Equal(b[:512], foot) {
		t.Errorf("%s: footer copy at 0 differs from the footer", path)
	}
	hdrOff := int(be.Uint64(foot[16:]))
	h := b[hdrOff : hdrOff+1024]
	if string(h[:8]) != "cxsparse" || sum(h, 36) != be.Uint32(h[36:]) || be.Uint32(h[60:]) != 0 || !allZero(h[768:]) {
		t.Fatalf("%s: dynamic header cookie, checksum or reserved fields bad", path)
	}
	batOff, entries, blockSize := int64(be.Uint64(h[16:])), int64(be.Uint32(h[28:])), int64(be.Uint32(h[32:]))
	bitmap := (blockSize/512/8 + 511) / 512 * 512
	type rng struct {
		off, end int64
		what     string
	}
	meta := []rng{{0, 512, "footer copy"}, {int64(hdrOff), int64(hdrOff) + 1024, "header"}, {batOff, batOff + (entries*4+511)/512*512, "BAT"}}
	if typ == 4 {
		name := decodeUTF16BE(h[64:576])
		if name == "" || strings.ContainsAny(name, `\/`) {
			t.Errorf("%s: parent name %q is not a base name", path, name)
		}
		for i := 0; i < 8; i++ {
			e := h[576+24*i:][:24]
			code, space, length, off := be.Uint32(e), int64(be.Uint32(e[4:])), int64(be.Uint32(e[8:])), int64(be.Uint64(e[16:]))
			if code == 0 {
				if !allZero(e) {
					t.Errorf("%s: locator %d has no code but fields set", path, i)
				}
				continue
			}
			if space < 512 {
				space *= 512
			}
			if length == 0 || length > space || space%512 != 0 || be.Uint32(e[12:]) != 0 {
				t.Errorf("%s: locator %d: length %d, space %d", path, i, length, space)
			}
			data := b[off : off+length]
			var p string
			switch code {
			case platformW2ru, platformW2ku:
				p = strings.ReplaceAll(decodeUTF16LE(data), `\`, "/")
			case platformMacX:
				p = strings.TrimPrefix(string(data), "file://")
			}
			if filepath.Base(p) != name {
				t.Errorf("%s: locator %d names %q, the header %q", path, i, filepath.Base(p), name)
			}
			meta = append(meta, rng{off, off + space, fmt.Sprintf("locator %d", i)})
		}
	}
	var blocks []rng
	for i := int64(0); i < entries; i++ {
		e := be.Uint32(b[batOff+4*i:])
		if e == 0xffffffff {
			continue
		}
		o := int64(e) * 512
		blocks = append(blocks, rng{o, o + bitmap + blockSize, fmt.Sprintf("block %d", i)})
	}
	for _, blk := range blocks {
		if blk.end > int64(len(b))-512 {
			t.Errorf("%s: %s runs into the footer", path, blk.what)
		}
		for _, m := range append(meta, blocks...) {
			if m != blk && blk.off < m.end && m.off < blk.end {
				t.Errorf("%s: %s at %d overlaps %s at %d", path, blk.what, blk.off, m.what, m.off)
			}
		}
	}
}

func decodeUTF16BE(b []byte) string {
	var u []uint16
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.BigEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

func decodeUTF16LE(b []byte) string {
	var u []uint16
	for i := 0; i+1 < len(b); i += 2 {
		u = append(u, binary.LittleEndian.Uint16(b[i:]))
	}
	return string(utf16.Decode(u))
}

// TestInteropMatrix: after each way vhdfs creates or changes images, every image of
// the chain passes the spec checker and vhdfs check, and the virtual size and the
// bytes agree between vhdfs export, libvhdi's vhdimount (data written 4 KiB-aligned,
// which it resolves right) and, for images qemu reads the type of (fixed and dynamic:
// qemu reads differencing images as dynamic ones without their parent), qemu-img.
func TestInteropMatrix(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	requireTool(t, "vhdimount")
	for _, base := range []struct {
		name string
		args []string
	}{
		{"dynamic", []string{"--size", "24M"}},
		{"fixed", []string{"--size", "24M", "--type", "fixed"}},
		{"dynamic exact size", []string{"--size", "24577K", "--exact-size"}},
	} {
		t.Run(base.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			imgs := []string{filepath.Join(dir, "base.vhd")}
			mustVhdfs(t, append(append([]string{"create"}, base.args...), imgs[0])...)
			size := vhdfsInfo(t, imgs[0]).VirtualSize
			model := make([]byte, size)
			verify := func(step string) {
				t.Helper()
				top := imgs[len(imgs)-1]
				for _, img := range imgs {
					specCheck(t, img)
				}
				if out, _, code := vhdfs(t, "check", top); code != 0 {
					t.Errorf("%s: vhdfs check: exit %d\n%s", step, code, out)
				}
				assertSameBytes(t, step+": vhdfs export", fileBytes(t, exportImage(t, top)), model)
				assertSameBytes(t, step+": vhdimount", fileBytes(t, vhdimountView(t, top)), model)
				if _, n := vhdiinfo(t, top); n != size {
					t.Errorf("%s: vhdiinfo sees %d bytes, want %d", step, n, size)
				}
				for _, img := range imgs {
					if q := qemuImgInfo(t, "-f", "vpc", img).VirtualSize; q != size {
						t.Errorf("%s: qemu-img info %s: %d bytes, want %d", step, filepath.Base(img), q, size)
					}
				}
				if len(imgs) == 1 {
					assertSameBytes(t, step+": qemu-img convert", qemuConvert(t, top), model)
				}
			}
			// Writes at odd offsets (4 KiB-aligned for libvhdi), across block
			// boundaries, through a mount.
			write := func(seed uint64) {
				t.Helper()
				mnt := mMountpoint(t)
				mMount(t, imgs[len(imgs)-1], mnt)
				f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				for _, w := range newWriteGen(seed, size, 4096, 3*mib).writes(6) {
					if _, err := f.WriteAt(w.Data, w.Off); err != nil {
						t.Fatal(err)
					}
					copy(model[w.Off:], w.Data)
				}
				tail := bytes.Repeat([]byte{byte(seed)}, 4096)
				if _, err := f.WriteAt(tail, size-4096); err != nil {
					t.Fatal(err)
				}
				copy(model[size-4096:], tail)
				if err := f.Close(); err != nil {
					t.Fatal(err)
				}
				mUmount(t, mnt)
			}
			snapshot := func() {
				t.Helper()
				next := filepath.Join(dir, fmt.Sprintf("s%d.vhd", len(imgs)))
				mustVhdfs(t, "create", "--parent", imgs[len(imgs)-1], next)
				imgs = append(imgs, next)
			}
			merge := func(cmd string, drop ...int) {
				t.Helper()
				mnt := mMountpoint(t)
				mMount(t, imgs[len(imgs)-1], mnt)
				if err := control(mnt, cmd); err != 0 {
					t.Fatalf("%s: %v", cmd, err)
				}
				mUmount(t, mnt)
				for k := len(drop) - 1; k >= 0; k-- {
					imgs = append(imgs[:drop[k]], imgs[drop[k]+1:]...)
				}
			}

			verify("create")
			write(1)
			verify("writes into the base")
			snapshot()
			verify("create --parent")
			write(2)
			snapshot()
			write(3)
			snapshot()
			write(4)
			verify("writes into a chain of 4")
			// imgs: base s1 s2 s3 (top). from=1 merges s2 into s1, re-links s3.
			merge("merge from=1 depth=1", 2)
			verify("merge from=1 (re-link into the room)")
			merge("merge depth=1") // s3 into s1; a new top at s3's path
			verify("merge depth=1 (the new top)")
			write(5)
			merge("merge depth=2", 1) // the top and s1 into base; a new top
			verify("merge depth=2")
			if out, _, code := vhdfs(t, "check", "--repair", imgs[len(imgs)-1]); code != 0 {
				t.Errorf("check --repair: exit %d\n%s", code, out)
			}
			verify("check --repair")
		})
	}
}
