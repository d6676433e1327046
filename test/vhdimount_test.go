package test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// vhdimount mounts image with libvhdi's vhdimount in a new temporary directory and
// returns the directory. libvhdi numbers the chain from the base: vhdi1 is the base,
// vhdiN (N images) the whole chain seen from image; see vhdiFile. The mount is gone
// when the test ends (or the test fails).
func vhdimount(t testing.TB, image string) string {
	t.Helper()
	requireTool(t, "vhdimount")
	requireTool(t, "fusermount3")
	dir := filepath.Join(t.TempDir(), "vhdi")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	unmountOnCleanup(t, dir)
	// vhdimount daemonizes once the mount is up, so it is ready when it returns.
	mustRun(t, "vhdimount", image, dir)
	if !mountedAt(t, dir) {
		t.Fatalf("vhdimount %s %s returned but nothing is mounted", image, dir)
	}
	return dir
}

// vhdiFile is the file of a vhdimount mount that shows the view from chain image i
// (0 = base, as testChain.Images counts).
func vhdiFile(mnt string, i int) string {
	return filepath.Join(mnt, fmt.Sprintf("vhdi%d", i+1))
}

// TestChainsAgainstLibvhdi: chains of differencing images made by vhdfs create
// --parent, filled through the Go API, export to the bytes the model holds; with
// 4 KiB-aligned writes libvhdi's vhdimount reads the same bytes, for the whole chain
// and for every ancestor's view. (libvhdi 20210425 resolves bitmaps 8 sectors at a
// time, so it is compared only on 4 KiB-aligned data.)
func TestChainsAgainstLibvhdi(t *testing.T) {
	t.Parallel()
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tc := range []struct {
			name string
			opts chainOptions
		}{
			{"depth 3, dynamic base", chainOptions{Format: format, Depth: 3, Create: []string{"--size", "24M"}, Writes: 25, Seed: 1}},
			{"depth 4, dynamic base, 512K blocks", chainOptions{Format: format, Depth: 4, Create: []string{"--size", "20M", "--block-size", "512K"}, Writes: 20, Seed: 2}},
			{"depth 3, fixed base", chainOptions{Format: format, Depth: 3, Create: []string{"--size", "16M", "--type", "fixed"}, Writes: 20, Seed: 3}},
			{"depth 4, 2M blocks, long writes", chainOptions{Format: format, Depth: 4, Create: []string{"--size", "32M"}, Writes: 8, MaxLen: 5 * mib, Seed: 4}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				requireTool(t, "vhdimount")
				tc.opts.Align = 4096
				c := makeChain(t, tc.opts)
				snap := snapshotFiles(t, c.Dir)
				raw := exportImage(t, c.Top())
				assertFileEquals(t, raw, c.Model())
				assertSparse(t, raw, c.Model())

				mnt := vhdimount(t, c.Top())
				entries, err := os.ReadDir(mnt)
				if err != nil {
					t.Fatal(err)
				}
				if len(entries) != len(c.Images) {
					t.Errorf("vhdimount shows %d files for a chain of %d", len(entries), len(c.Images))
				}
				for i := range c.Images {
					assertFileEquals(t, vhdiFile(mnt, i), c.Views[i])
					if i < len(c.Images)-1 {
						assertFileEquals(t, exportImage(t, c.Images[i]), c.Views[i])
					}
				}
				if out, errs, code := vhdfs(t, "check", c.Top()); code != 0 {
					t.Errorf("check: exit %d\n%s%s", code, out, errs)
				}
				assertUnchanged(t, snap)
			})
		}
	})
}

// TestChainsSectorGranular: with sector-granular and unaligned writes (which libvhdi
// would misread), export equals the model.
func TestChainsSectorGranular(t *testing.T) {
	t.Parallel()
	forEachFormat(t, func(t *testing.T, format string) {
		type row struct {
			name string
			opts chainOptions
		}
		rows := []row{
			{"depth 3, 512-byte writes", chainOptions{Format: format, Depth: 3, Create: []string{"--size", "16M"}, Writes: 40, Align: 512, MaxLen: 64 << 10, Seed: 11}},
			{"depth 4, 512-byte writes, 512K blocks", chainOptions{Format: format, Depth: 4, Create: []string{"--size", "12M", "--block-size", "512K"}, Writes: 30, Align: 512, MaxLen: 700 << 10, Seed: 12}},
			{"depth 3, unaligned writes", chainOptions{Format: format, Depth: 3, Create: []string{"--size", "16M"}, Writes: 40, Align: 1, MaxLen: 20 << 10, Seed: 13}},
			{"depth 4, unaligned writes, fixed base", chainOptions{Format: format, Depth: 4, Create: []string{"--size", "8M", "--type", "fixed"}, Writes: 30, Align: 1, MaxLen: 3 * mib, Seed: 14}},
		}
		if format == "vhdx" {
			// 4096-byte logical sectors: 512-byte and unaligned writes are
			// read-modify-writes of whole logical sectors.
			rows = append(rows,
				row{"depth 3, 512-byte writes, 4K logical sectors", chainOptions{Format: format, SectorSize: 4096, Depth: 3, Create: []string{"--size", "16M"}, Writes: 40, Align: 512, MaxLen: 64 << 10, Seed: 15}},
				row{"depth 4, unaligned writes, fixed base, 4K logical sectors", chainOptions{Format: format, SectorSize: 4096, Depth: 4, Create: []string{"--size", "8M", "--type", "fixed"}, Writes: 30, Align: 1, MaxLen: 3 * mib, Seed: 16}},
			)
		}
		for _, tc := range rows {
			t.Run(tc.name, func(t *testing.T) {
				c := makeChain(t, tc.opts)
				snap := snapshotFiles(t, c.Dir)
				for i := len(c.Images) - 1; i >= 0; i-- {
					raw := exportImage(t, c.Images[i])
					assertFileEquals(t, raw, c.Views[i])
					assertSparse(t, raw, c.Views[i])
				}
				if out, errs, code := vhdfs(t, "check", c.Top()); code != 0 {
					t.Errorf("check: exit %d\n%s%s", code, out, errs)
				}
				assertUnchanged(t, snap)
			})
		}
	})
}
