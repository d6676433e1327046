package test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

const mib = 1 << 20

// qemuInfo is the part of `qemu-img info --output=json` the tests read.
type qemuInfo struct {
	VirtualSize int64  `json:"virtual-size"`
	Format      string `json:"format"`
	ClusterSize int64  `json:"cluster-size"`
}

// qemuImgInfo runs `qemu-img info --output=json` with the given image arguments
// ("-f", "vpc", path, or "--image-opts", opts).
func qemuImgInfo(t testing.TB, args ...string) qemuInfo {
	t.Helper()
	requireTool(t, "qemu-img")
	out := mustRun(t, "qemu-img", append([]string{"info", "--output=json"}, args...)...)
	var qi qemuInfo
	if err := json.Unmarshal([]byte(out), &qi); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	return qi
}

// qemuCurrentSizeOpts opens a vpc image in qemu with the size taken from the footer's
// current size instead of the CHS geometry.
func qemuCurrentSizeOpts(path string) string {
	return "driver=vpc,force_size_calc=current_size,file.filename=" + path
}

// qemuConvert flattens a vpc image with qemu-img and returns the raw bytes.
func qemuConvert(t testing.TB, src ...string) []byte {
	t.Helper()
	requireTool(t, "qemu-img")
	out := filepath.Join(t.TempDir(), "qemu.raw")
	args := []string{"convert"}
	if len(src) == 1 {
		// qemu reads fixed and dynamic VHDX (512-byte logical sectors), not
		// differencing ones: callers give it a lone image.
		args = append(args, "-f", qemuFormat(src[0]))
	}
	args = append(append(args, src...), "-O", "raw", out)
	mustRun(t, "qemu-img", args...)
	return fileBytes(t, out)
}

// qemuFormat is qemu's name for the format of a test image: vpc or vhdx.
func qemuFormat(path string) string {
	if formatOf(path) == "vhdx" {
		return "vhdx"
	}
	return "vpc"
}

// qemuWrite writes pattern bytes into a vpc image with qemu-io.
type qemuWrite struct {
	pattern byte
	off, n  int64
}

func qemuIOWrite(t testing.TB, image string, ws []qemuWrite) {
	t.Helper()
	requireTool(t, "qemu-io")
	args := []string{"-f", qemuFormat(image)}
	for _, w := range ws {
		args = append(args, "-c", fmt.Sprintf("write -P %#02x %d %d", w.pattern, w.off, w.n))
	}
	out := mustRun(t, "qemu-io", append(args, image)...)
	if got := strings.Count(out, "wrote "); got != len(ws) {
		t.Fatalf("qemu-io made %d of %d writes:\n%s", got, len(ws), out)
	}
}

// TestQemuImagesExport: images qemu-img creates and qemu-io fills export to the same
// bytes as qemu-img convert, as sparse files.
func TestQemuImagesExport(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	for _, tc := range []struct {
		name string
		opts []string
	}{
		{"dynamic", nil},
		{"fixed", []string{"-o", "subformat=fixed"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "qemu.vhd")
			mustRun(t, "qemu-img", append(append([]string{"create", "-q", "-f", "vpc"}, tc.opts...), img, "40M")...)
			size := qemuImgInfo(t, "-f", "vpc", img).VirtualSize
			if got := virtualSize(t, img); got != size {
				t.Fatalf("vhdfs says the size is %d, qemu-img %d", got, size)
			}
			ws := []qemuWrite{
				{0x11, 0, 64 << 10},                     // the first sectors
				{0x00, 4096, 4096},                      // zeros over data
				{0x22, 2*mib - 4096, 8192},              // across the first block boundary
				{0x33, 4*mib - 512, 1024},               // one sector each side of a boundary
				{0x44, 7*mib + 1536, 3584},              // odd sectors inside a block
				{0x55, 20*mib - 512, 2*mib + 1024},      // a whole block and both neighbours
				{0x66, 40*mib - 512, 1024},              // across the last block boundary
				{0x77, size - 512, 512},                 // the last sector
				{0x88, 11*mib + 3*512, 512},             // one lone sector
				{0x99, 30 * mib, 512},                   // a block's first sector
				{0xaa, 32*mib - 512, 512},               // a block's last sector
				{0xbb, 9*mib + 4096 - 512, 4096 + 1024}, // unaligned to 4 KiB both ends
			}
			qemuIOWrite(t, img, ws)
			model := make([]byte, size)
			for _, w := range ws {
				copy(model[w.off:w.off+w.n], bytes.Repeat([]byte{w.pattern}, int(w.n)))
			}
			snap := snapshotFiles(t, dir)
			raw := exportImage(t, img)
			assertUnchanged(t, snap)
			want := qemuConvert(t, img)
			assertSameBytes(t, "qemu-img convert", want, model)
			assertFileEquals(t, raw, want)
			assertSparse(t, raw, model)
			if stdout, stderr, code := vhdfs(t, "check", img); code != 0 {
				t.Errorf("check: exit %d\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
		})
	}
}

// TestQemuConvertedImagesExport: a raw disk converted to VHD by qemu-img exports back
// to the same bytes.
func TestQemuConvertedImagesExport(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	for _, sub := range []string{"dynamic", "fixed"} {
		t.Run(sub, func(t *testing.T) {
			dir := t.TempDir()
			raw := filepath.Join(dir, "src.raw")
			data := make([]byte, 24*mib)
			gen := newWriteGen(7, int64(len(data)), 512, 512<<10)
			for range 40 {
				w := gen.next()
				copy(data[w.Off:], w.Data)
			}
			if err := os.WriteFile(raw, data, 0o644); err != nil {
				t.Fatal(err)
			}
			img := filepath.Join(dir, "conv.vhd")
			mustRun(t, "qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat="+sub, raw, img)
			got := fileBytes(t, exportImage(t, img))
			assertSameBytes(t, "export vs qemu-img convert", got, qemuConvert(t, img))
			if len(got) < len(data) {
				t.Fatalf("export is %d bytes, the source %d", len(got), len(data))
			}
			assertSameBytes(t, "export vs source", got[:len(data)], data)
			if !allZero(got[len(data):]) {
				t.Errorf("bytes past the source's end are not zero")
			}
		})
	}
}

// assertSparse checks that an exported file takes no more space on disk than its
// non-zero 4 KiB granules (plus a little for the file system's extent tree), and
// well below its size when the disk is mostly empty.
func assertSparse(t testing.TB, path string, data []byte) {
	t.Helper()
	var nonZero int64
	for off := 0; off < len(data); off += 4096 {
		if !allZero(data[off:min(off+4096, len(data))]) {
			nonZero += 4096
		}
	}
	used := allocatedBytes(t, path)
	if used > nonZero+256<<10 {
		t.Errorf("%s takes %d bytes on disk for %d bytes of non-zero 4 KiB granules: not sparse", path, used, nonZero)
	}
	if nonZero < int64(len(data))/8 && used > int64(len(data))/4 {
		t.Errorf("%s of a mostly empty disk takes %d bytes on disk of %d", path, used, len(data))
	}
}

var zeroBlock [64 << 10]byte

func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroBlock))
		if !bytes.Equal(b[:n], zeroBlock[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// geometryBytes is the size the CHS geometry of the footer at the end describes.
func geometryBytes(t testing.TB, path string) int64 {
	t.Helper()
	l := readLayout(t, path)
	g := readAt(t, path, l.FooterOff+56, 4)
	return int64(binary.BigEndian.Uint16(g)) * int64(g[2]) * int64(g[3]) * 512
}

var vhdiMediaSize = regexp.MustCompile(`Media size\s*:.*\((\d+) bytes\)`)

// vhdiinfo runs vhdiinfo, which must succeed, and returns its output and the media
// size it reports.
func vhdiinfo(t testing.TB, path string) (string, int64) {
	t.Helper()
	requireTool(t, "vhdiinfo")
	out := mustRun(t, "vhdiinfo", path)
	m := vhdiMediaSize.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("vhdiinfo %s: no media size in\n%s", path, out)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return out, n
}

// TestVhdfsImagesInOtherTools: images vhdfs creates open in qemu-img and vhdiinfo,
// which agree on their size, and qemu reads back what vhdfs wrote into them.
func TestVhdfsImagesInOtherTools(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	requireTool(t, "vhdiinfo")
	for _, tc := range []struct {
		name      string
		args      []string
		requested int64
		exact     bool
		blockSize int64 // 0 for fixed
	}{
		{"dynamic", []string{"--size", "40M"}, 40 * mib, false, 2 * mib},
		{"fixed", []string{"--size", "40M", "--type", "fixed"}, 40 * mib, false, 0},
		{"dynamic exact size", []string{"--size", "40M", "--exact-size"}, 40 * mib, true, 2 * mib},
		{"fixed exact size", []string{"--size", "40M", "--type", "fixed", "--exact-size"}, 40 * mib, true, 0},
		{"block size 512K", []string{"--size", "40M", "--block-size", "512K"}, 40 * mib, false, 512 << 10},
		{"block size 2M", []string{"--size", "40M", "--block-size", "2M"}, 40 * mib, false, 2 * mib},
		{"odd size rounds up", []string{"--size", "33333333"}, 33333333, false, 2 * mib},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "v.vhd")
			mustVhdfs(t, append(append([]string{"create"}, tc.args...), img)...)
			info := vhdfsInfo(t, img)
			size := info.VirtualSize
			if got := info.Layers[0].BlockSize; got != tc.blockSize {
				t.Errorf("block size %d, want %d", got, tc.blockSize)
			}
			q := qemuImgInfo(t, "-f", "vpc", img)
			if q.Format != "vpc" {
				t.Errorf("qemu-img sees format %q", q.Format)
			}
			if tc.blockSize != 0 && q.ClusterSize != tc.blockSize {
				t.Errorf("qemu-img sees block size %d, want %d", q.ClusterSize, tc.blockSize)
			}
			if tc.exact {
				if size != tc.requested {
					t.Errorf("--exact-size 40M made a disk of %d bytes", size)
				}
				// No geometry describes 40 MiB: the footer carries the 65535/16/255
				// marker, which makes qemu 7.2 use the current size although it does
				// not know the creator "vhdf".
				if q.VirtualSize != size {
					t.Errorf("qemu-img sees %d bytes, vhdfs %d", q.VirtualSize, size)
				}
				if got := qemuImgInfo(t, "--image-opts", qemuCurrentSizeOpts(img)).VirtualSize; got != size {
					t.Errorf("qemu-img with force_size_calc=current_size sees %d bytes, want %d", got, size)
				}
			} else {
				if size < tc.requested || size > tc.requested+255*16*512 {
					t.Errorf("size %d is not the request %d rounded up to a CHS geometry", size, tc.requested)
				}
				if q.VirtualSize != size {
					t.Errorf("qemu-img sees %d bytes, vhdfs %d", q.VirtualSize, size)
				}
				if g := geometryBytes(t, img); g != size {
					t.Errorf("the geometry describes %d bytes, the size is %d: not rounded to CHS", g, size)
				}
			}
			if _, n := vhdiinfo(t, img); n != size {
				t.Errorf("vhdiinfo sees %d bytes, vhdfs %d", n, size)
			}

			// qemu reads back what vhdfs wrote.
			model := make([]byte, size)
			applyWrites(t, img, model, newWriteGen(3, size, 512, 3*mib).writes(12))
			got := fileBytes(t, exportImage(t, img))
			assertSameBytes(t, "vhdfs export", got, model)
			assertSameBytes(t, "qemu-img convert", qemuConvert(t, "--image-opts", qemuCurrentSizeOpts(img)), model)
			if out, _, code := vhdfs(t, "check", img); code != 0 {
				t.Errorf("check after writes: exit %d\n%s", code, out)
			}
		})
	}
}

// TestVhdfsDifferencingInOtherTools: a differencing image vhdfs creates opens in
// qemu-img (as a dynamic image; qemu ignores parents) and in vhdiinfo, which finds
// and names its parent.
func TestVhdfsDifferencingInOtherTools(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	requireTool(t, "vhdiinfo")
	c := makeChain(t, chainOptions{Depth: 3, Create: []string{"--size", "40M"}})
	for i := 1; i < len(c.Images); i++ {
		img, parent := c.Images[i], c.Images[i-1]
		info := vhdfsInfo(t, img)
		if q := qemuImgInfo(t, "-f", "vpc", img); q.VirtualSize != c.Size {
			t.Errorf("%s: qemu-img sees %d bytes, want %d", img, q.VirtualSize, c.Size)
		}
		out, n := vhdiinfo(t, img)
		if n != c.Size {
			t.Errorf("%s: vhdiinfo sees %d bytes, want %d", img, n, c.Size)
		}
		if !strings.Contains(out, "Differential") {
			t.Errorf("%s: vhdiinfo does not call it differencing:\n%s", img, out)
		}
		pid := info.Layers[1].UniqueID
		if !regexp.MustCompile(`Parent identifier\s*:\s*` + pid).MatchString(out) {
			t.Errorf("%s: vhdiinfo does not name parent %s:\n%s", img, pid, out)
		}
		if !regexp.MustCompile(`Parent filename\s*:\s*` + regexp.QuoteMeta(filepath.Base(parent)) + `\n`).MatchString(out) {
			t.Errorf("%s: vhdiinfo does not name parent file %s:\n%s", img, filepath.Base(parent), out)
		}
		if info.Layers[1].Path != parent && filepath.Clean(info.Layers[1].Path) != parent {
			t.Errorf("%s: parent found at %s, want %s", img, info.Layers[1].Path, parent)
		}
	}
}
