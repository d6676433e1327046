package test

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/chain"
)

// TestDamagedEndFooter: a dynamic or differencing image whose footer at the end is
// damaged while the copy at offset 0 is good still opens read-only: info and export
// work, check fails (exit 3) and says to repair, writing is refused, and check
// --repair restores the footer without changing the data.
func TestDamagedEndFooter(t *testing.T) {
	t.Parallel()
	damageChecksum := func(t *testing.T, p string) {
		patchAt(t, p, readLayout(t, p).FooterOff+footerTimeOff, []byte{9, 9, 9, 9})
	}
	for _, tc := range []struct {
		name   string
		depth  int
		victim int // index into Images of the image to damage
		damage func(t *testing.T, path string)
	}{
		{"end footer checksum damaged", 1, 0, damageChecksum},
		{"end footer zeroed", 1, 0, func(t *testing.T, p string) {
			patchAt(t, p, readLayout(t, p).FooterOff, make([]byte, footerLen))
		}},
		{"end footer cut off", 1, 0, func(t *testing.T, p string) {
			truncateFile(t, p, readLayout(t, p).FooterOff)
		}},
		{"end footer cut off with a partial sector left", 1, 0, func(t *testing.T, p string) {
			truncateFile(t, p, readLayout(t, p).FooterOff+100)
		}},
		{"end footer damaged in a differencing top", 2, 1, damageChecksum},
		{"end footer damaged in the base of a chain", 3, 0, damageChecksum},
		{"end footer damaged in the middle of a chain", 3, 1, damageChecksum},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := makeChain(t, chainOptions{Depth: tc.depth, Create: []string{"--size", "12M", "--block-size", "512K"}, Writes: 12, Align: 512, Seed: 21})
			victim := c.Images[tc.victim]
			before := readLayout(t, victim)
			tc.damage(t, victim)

			if got := vhdfsInfo(t, c.Top()); len(got.Layers) != len(c.Images) {
				t.Fatalf("info shows %d layers, want %d", len(got.Layers), len(c.Images))
			}
			snap := snapshotFiles(t, c.Dir)
			assertFileEquals(t, exportImage(t, c.Top()), c.Model())
			stdout, stderr, code := vhdfs(t, "check", c.Top())
			if code != 3 {
				t.Errorf("check: exit %d, want 3\n%s%s", code, stdout, stderr)
			}
			assertOneLineError(t, stderr, victim, "footer at the end is damaged", "check --repair")
			assertUnchanged(t, snap)

			// Read-only until repaired: the top cannot be opened for writing.
			if tc.victim == len(c.Images)-1 {
				if ch, err := chain.Open(victim, true); err == nil {
					ch.Close()
					t.Errorf("%s with a damaged end footer opened for writing", victim)
				} else if !strings.Contains(err.Error(), "read-only") {
					t.Errorf("open for writing: %v, want a read-only error", err)
				}
				assertUnchanged(t, snap)
			}

			stdout, stderr, code = vhdfs(t, "check", "--repair", c.Top())
			if code != 0 || stderr != "" {
				t.Fatalf("check --repair: exit %d\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
			if !strings.Contains(stdout, victim+": repaired") || !strings.Contains(stdout, "chain is consistent") {
				t.Errorf("check --repair says:\n%s", stdout)
			}
			stdout, stderr, code = vhdfs(t, "check", c.Top())
			if code != 0 || stderr != "" || !strings.Contains(stdout, "chain is consistent") {
				t.Errorf("check after repair: exit %d\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
			after := readLayout(t, victim)
			if after.FileSize != before.FileSize {
				t.Errorf("repaired file is %d bytes, was %d before the damage", after.FileSize, before.FileSize)
			}
			if end, copy0 := readAt(t, victim, after.FooterOff, footerLen), readAt(t, victim, 0, footerLen); !bytes.Equal(end, copy0) {
				t.Errorf("repaired end footer differs from the copy at 0")
			}
			for i, img := range c.Images {
				assertFileEquals(t, exportImage(t, img), c.Views[i])
			}
			// And writable again.
			model := bytes.Clone(c.Model())
			applyWrites(t, c.Top(), model, []write{{c.Size - 4096, fill(4096, 0xee)}})
			assertFileEquals(t, exportImage(t, c.Top()), model)
		})
	}
}

// TestDamagedFooterCopy: a damaged copy at offset 0 with a good footer at the end
// opens, exports, and fails check.
func TestDamagedFooterCopy(t *testing.T) {
	t.Parallel()
	c := makeChain(t, chainOptions{Depth: 2, Create: []string{"--size", "8M"}, Writes: 5, Seed: 22})
	patchAt(t, c.Top(), footerTimeOff, []byte{7, 7, 7, 7})
	assertFileEquals(t, exportImage(t, c.Top()), c.Model())
	stdout, stderr, code := vhdfs(t, "check", c.Top())
	if code != 3 {
		t.Errorf("check: exit %d, want 3\n%s%s", code, stdout, stderr)
	}
	assertOneLineError(t, stderr, c.Top(), "footer copy at offset 0")
}

// TestShortFooter: an image whose footer is 511 bytes (file size % 512 == 511, as
// before Virtual PC 2004) opens and exports the same data; check notes it.
func TestShortFooter(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		make func(t *testing.T, dir string) (string, []byte)
	}{
		{"fixed image from vhdfs", func(t *testing.T, dir string) (string, []byte) {
			c := makeChainIn(t, dir, chainOptions{Create: []string{"--size", "8M", "--type", "fixed"}, Writes: 10, Align: 512, Seed: 31})
			return c.Top(), c.Model()
		}},
		{"fixed image from qemu-img", func(t *testing.T, dir string) (string, []byte) {
			requireTool(t, "qemu-img")
			p := filepath.Join(dir, "q.vhd")
			mustRun(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", p, "8M")
			size := qemuImgInfo(t, "-f", "vpc", p).VirtualSize
			ws := []qemuWrite{{0x5a, 0, 4096}, {0xa5, size - 512, 512}}
			qemuIOWrite(t, p, ws)
			return p, qemuConvert(t, p)
		}},
		{"dynamic image", func(t *testing.T, dir string) (string, []byte) {
			c := makeChainIn(t, dir, chainOptions{Create: []string{"--size", "8M"}, Writes: 10, Align: 512, Seed: 32})
			return c.Top(), c.Model()
		}},
		{"differencing image", func(t *testing.T, dir string) (string, []byte) {
			c := makeChainIn(t, dir, chainOptions{Depth: 2, Create: []string{"--size", "8M"}, Writes: 10, Align: 512, Seed: 33})
			return c.Top(), c.Model()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img, model := tc.make(t, dir)
			l := readLayout(t, img)
			if last := readAt(t, img, l.FileSize-1, 1); last[0] != 0 {
				t.Fatalf("the footer's last byte is %#x, not a zero reserved byte", last[0])
			}
			truncateFile(t, img, l.FileSize-1)

			snap := snapshotFiles(t, dir)
			if got := virtualSize(t, img); got != int64(len(model)) {
				t.Errorf("info: size %d, want %d", got, len(model))
			}
			assertFileEquals(t, exportImage(t, img), model)
			stdout, stderr, code := vhdfs(t, "check", "-v", img)
			if code != 0 || !strings.Contains(stdout, "footer is 511 bytes long") {
				t.Errorf("check: exit %d\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
			assertUnchanged(t, snap)

			// Writing into it works and keeps it valid.
			applyWrites(t, img, model, []write{{3 * mib, fill(8192, 0x3c)}})
			assertFileEquals(t, exportImage(t, img), model)
			if stdout, stderr, code := vhdfs(t, "check", img); code != 0 {
				t.Errorf("check after a write: exit %d\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
		})
	}
}
