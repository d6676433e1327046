package test

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// TestExportReflinkXFS: on XFS with reflink, export shares the image's data blocks
// (4 KiB-aligned in the file) with the output instead of copying them: every extent
// of the output is shared (FIEMAP, through filefrag), they cover exactly the model's
// non-zero 4 KiB granules, and the bytes match the model and qemu-img convert.
func TestExportReflinkXFS(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tool := range []string{"mkfs.xfs", "losetup", "mount", "umount", "filefrag", "qemu-img"} {
			requireTool(t, tool)
		}
		if os.Geteuid() != 0 {
			t.Fatal("mounting an XFS file system on a loop device needs root")
		}
		// 512 MiB: mkfs.xfs refuses file systems under 300 MiB.
		dir, release := mountLoopFS(t, 512<<20, "xfs", "mkfs.xfs", "-q", "-f", "-m", "reflink=1")
		c := makeChainIn(t, dir, chainOptions{Format: format, Depth: 1, Create: []string{"--size", "64M"},
			Writes: 40, Align: 512, MaxLen: 3 << 20, Seed: 61})
		model := c.Model()
		out := filepath.Join(dir, "out.raw")
		mustVhdfs(t, "export", c.Top(), out)
		assertFileEquals(t, out, model)
		converted := filepath.Join(t.TempDir(), "converted.raw")
		mustRun(t, "qemu-img", "convert", "-f", qemuFormat(c.Top()), "-O", "raw", c.Top(), converted)
		assertFileEquals(t, out, fileBytes(t, converted))

		extents := fiemap(t, out)
		var covered int64
		for _, e := range extents {
			if !e.shared {
				t.Errorf("extent of %d bytes at %d is not shared with the image", e.n, e.off)
			}
			covered += e.n
		}
		if want := nonZeroGranuleBytes(model); covered != want {
			t.Errorf("the output's extents cover %d bytes, want the %d of the non-zero granules", covered, want)
		}
		t.Logf("%d extents, %d bytes", len(extents), covered)
		release()
	})
}

// TestExportAcrossFileSystems: export from images on one file system to a file on
// another (tmpfs), where no block can be shared (FICLONERANGE: EXDEV), writes the
// bytes itself, as sparse as ever.
func TestExportAcrossFileSystems(t *testing.T) {
	var st syscall.Statfs_t
	const tmpfsMagic = 0x01021994
	if err := syscall.Statfs("/dev/shm", &st); err != nil || st.Type != tmpfsMagic {
		t.Skip("no tmpfs at /dev/shm")
	}
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "24M"}, Writes: 20, Align: 512, Seed: 62})
		shm, err := os.MkdirTemp("/dev/shm", "vhdfs-export-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(shm) })
		out := filepath.Join(shm, "out.raw")
		mustVhdfs(t, "export", c.Top(), out)
		model := c.Model()
		assertFileEquals(t, out, model)
		if got, most := allocatedBytes(t, out), nonZeroGranuleBytes(model); got > most {
			t.Errorf("the output takes %d bytes, more than the %d of the non-zero granules", got, most)
		}
	})
}

// extent is one extent of a file: n bytes at off, and whether it is shared.
type extent struct {
	off, n int64
	shared bool
}

// fiemapLine is an extent in `filefrag -v`: "0: 0.. 255: 24.. 279: 256: [expected:] flags".
var fiemapLine = regexp.MustCompile(`^\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*\d+\.\.\s*\d+:\s*\d+:(?:\s*\d+:)?\s*(\S*)\s*$`)

// fiemap lists the extents of the file at path (filefrag -v, after syncing it).
func fiemap(t testing.TB, path string) []extent {
	t.Helper()
	out := mustRun(t, "filefrag", "-s", "-v", "-b4096", path)
	var es []extent
	for _, line := range strings.Split(out, "\n") {
		m := fiemapLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		first, _ := strconv.ParseInt(m[1], 10, 64)
		last, _ := strconv.ParseInt(m[2], 10, 64)
		es = append(es, extent{first * 4096, (last - first + 1) * 4096, strings.Contains(m[3], "shared")})
	}
	if len(es) == 0 && !strings.Contains(out, " 0 extents found") {
		t.Fatalf("filefrag -v %s: no extents parsed from\n%s", path, out)
	}
	return es
}

// nonZeroGranuleBytes is 4 KiB times the number of 4 KiB granules of b that are not
// all zeros (a partial last one included): the space they take in file system blocks.
func nonZeroGranuleBytes(b []byte) int64 {
	var n int64
	zero := make([]byte, 4096)
	for off := 0; off < len(b); off += 4096 {
		if p := b[off:min(off+4096, len(b))]; !bytes.Equal(p, zero[:len(p)]) {
			n += 4096
		}
	}
	return n
}
