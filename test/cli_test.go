package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestVersion: `vhdfs version` prints the version stamped in at build time.
func TestVersion(t *testing.T) {
	t.Parallel()
	stdout, stderr, code := vhdfs(t, "version")
	if code != 0 || stderr != "" || stdout != "vhdfs "+testVersion+"\n" {
		t.Errorf("version: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

// TestUsageErrors: a wrong command line exits 2 with one line on stderr that names
// the mistake and points at the command's help, not the whole synopsis, and touches
// nothing. vhdfs alone shows the synopsis.
func TestUsageErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	img := filepath.Join(dir, "a.vhd")
	mustVhdfs(t, "create", "--size", "8M", img)
	snap := snapshotFiles(t, dir)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no arguments", nil, "usage:"},
		{"unknown command", []string{"frobnicate", img}, `unknown command "frobnicate"`},
		{"unknown flag", []string{"info", "--frob", img}, "unknown flag: --frob"},
		{"bad flag value", []string{"merge", "--depth", "two", img}, `invalid argument "two" for "--depth"`},
		{"missing image", []string{"info"}, "want IMAGE"},
		{"extra argument", []string{"check", img, img}, "want IMAGE"},
		{"export without output", []string{"export", img}, "want IMAGE OUT.raw"},
		{"create without size", []string{"create", filepath.Join(dir, "b.vhd")}, "--size or --parent is required"},
		{"size not a number", []string{"create", "--size", "lots", filepath.Join(dir, "b.vhd")}, `size "lots"`},
		{"size with an unknown unit", []string{"create", "--size", "12Q", filepath.Join(dir, "b.vhd")}, `size "12Q"`},
		{"negative size", []string{"create", "--size", "-5M", filepath.Join(dir, "b.vhd")}, `size "-5M"`},
		{"unknown type", []string{"create", "--size", "8M", "--type", "sparse", filepath.Join(dir, "b.vhd")}, `--type "sparse"`},
		{"block size for a fixed image", []string{"create", "--size", "8M", "--type", "fixed", "--block-size", "512K", filepath.Join(dir, "b.vhd")}, "--block-size"},
		{"zero size", []string{"create", "--size", "0", filepath.Join(dir, "b.vhd")}, "size 0"},
		{"fraction of a byte", []string{"create", "--size", "1.5", filepath.Join(dir, "b.vhd")}, `size "1.5"`},
		{"exact size not whole sectors", []string{"create", "--size", "1000", "--exact-size", filepath.Join(dir, "b.vhd")}, "multiple of 512"},
		{"dynamic image too large", []string{"create", "--size", "2T", filepath.Join(dir, "b.vhd")}, "2.0 TiB (2199023255552 bytes) is more than a dynamic VHD holds, 2040 GiB (2190433320960 bytes)"},
		{"a VHD past its limit, a VHDX not", []string{"create", "--size", "3T", filepath.Join(dir, "b.vhd")}, "VHD holds, 2040 GiB (2190433320960 bytes); a VHDX holds up to 64.0 TiB: name it " + filepath.Join(dir, "b.vhdx") + ";"},
		{"a VHD asked for past its limit", []string{"create", "--size", "3T", "--format", "vhd", filepath.Join(dir, "b.vhd")}, "name it " + filepath.Join(dir, "b.vhdx") + " and drop --format vhd;"},
		{"a VHDX past its limit", []string{"create", "--size", "65T", filepath.Join(dir, "b.vhdx")}, "65.0 TiB (71468255805440 bytes) is more than a VHDX holds, 64 TiB (70368744177664 bytes)"},
		{"block size not a power of two", []string{"create", "--size", "8M", "--block-size", "3K", filepath.Join(dir, "b.vhd")}, "block size 3072"},
		{"block size below a sector", []string{"create", "--size", "8M", "--block-size", "256", filepath.Join(dir, "b.vhd")}, "block size 256"},
		{"size with a parent", []string{"create", "--parent", img, "--size", "8M", filepath.Join(dir, "b.vhd")}, "--parent"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stdout, stderr, code := vhdfs(t, tc.args...)
			if code != 2 {
				t.Errorf("exit %d, want 2\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
			if stdout != "" {
				t.Errorf("stdout %q, want nothing", stdout)
			}
			switch {
			case tc.args == nil:
				if !strings.Contains(stderr, "usage:\n  vhdfs mount") {
					t.Errorf("stderr %q: want the synopsis", stderr)
				}
			case tc.args[0] == "frobnicate":
				assertOneLineError(t, stderr, tc.want, "see 'vhdfs --help'")
			default:
				assertOneLineError(t, stderr, "vhdfs "+tc.args[0]+": ", tc.want, "see 'vhdfs "+tc.args[0]+" --help'")
			}
			assertUnchanged(t, snap)
		})
	}
	if stdout, stderr, code := vhdfs(t, "help"); code != 0 || stderr != "" || !strings.Contains(stdout, "Usage:") {
		t.Errorf("help: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

// TestCreateSizes: sizes take units; --exact-size keeps them, otherwise they round up
// to a CHS geometry as qemu-img does; big dynamic images are sparse files.
func TestCreateSizes(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	for _, tc := range []struct {
		name     string
		args     []string
		want     int64 // exact size, or 0 for "rounded up from min"
		min      int64
		maxAlloc int64 // most bytes the image may take on disk
	}{
		{"bytes", []string{"--size", "1048576", "--exact-size"}, mib, 0, 64 << 10},
		{"512K", []string{"--size", "512K", "--exact-size"}, 512 << 10, 0, 64 << 10},
		{"10M", []string{"--size", "10M", "--exact-size"}, 10 * mib, 0, 64 << 10},
		{"10MiB", []string{"--size", "10MiB", "--exact-size"}, 10 * mib, 0, 64 << 10},
		{"lower-case unit", []string{"--size", "10m", "--exact-size"}, 10 * mib, 0, 64 << 10},
		{"1G", []string{"--size", "1G", "--exact-size"}, 1 << 30, 0, 64 << 10},
		{"1.5G exact", []string{"--size", "1.5G", "--exact-size"}, 3 << 29, 0, 64 << 10},
		{"1.5G rounds up like qemu-img", []string{"--size", "1.5G"}, 0, 3 << 29, 64 << 10},
		{"2GB is powers of 1000", []string{"--size", "2GB", "--exact-size"}, 2_000_000_000, 0, 64 << 10},
		{"512M rounds up like qemu-img", []string{"--size", "512M"}, 0, 512 * mib, 64 << 10},
		{"10G dynamic is sparse", []string{"--size", "10G"}, 0, 10 << 30, 256 << 10},
		{"1T dynamic is sparse", []string{"--size", "1T", "--exact-size"}, 1 << 40, 0, 3 * mib},
		{"64M fixed is a sparse file", []string{"--size", "64M", "--type", "fixed", "--exact-size"}, 64 * mib, 0, 64 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "s.vhd")
			stdout := mustVhdfs(t, append(append([]string{"create"}, tc.args...), img)...)
			if !strings.HasPrefix(stdout, "created "+img+": vhd ") {
				t.Errorf("create printed %q", stdout)
			}
			size := virtualSize(t, img)
			if tc.want != 0 && size != tc.want {
				t.Errorf("size %d, want %d", size, tc.want)
			}
			if tc.want == 0 {
				if size < tc.min || size > tc.min+255*16*512 {
					t.Errorf("size %d is not %d rounded up to a CHS geometry", size, tc.min)
				}
				// qemu-img create makes the same size from the same request.
				q := filepath.Join(dir, "q.vhd")
				mustRun(t, "qemu-img", "create", "-q", "-f", "vpc", q, tc.args[1])
				if qs := qemuImgInfo(t, "-f", "vpc", q).VirtualSize; qs != size {
					t.Errorf("qemu-img create %s makes %d bytes, vhdfs %d", tc.args[1], qs, size)
				}
			}
			if used := allocatedBytes(t, img); used > tc.maxAlloc {
				t.Errorf("the new image takes %d bytes on disk, want at most %d", used, tc.maxAlloc)
			}
			if qs := qemuImgInfo(t, "--image-opts", qemuCurrentSizeOpts(img)).VirtualSize; qs != size {
				t.Errorf("qemu-img sees %d bytes, vhdfs %d", qs, size)
			}
			if stdout, stderr, code := vhdfs(t, "check", img); code != 0 {
				t.Errorf("check: exit %d\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
		})
	}
}

// TestCreateErrors: create refuses what it cannot make with one line on stderr, and
// leaves no file behind and existing files alone.
func TestCreateErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing.vhd")
	mustVhdfs(t, "create", "--size", "8M", existing)
	snap := snapshotFiles(t, dir)
	newImg := filepath.Join(dir, "new.vhd")
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"existing file", []string{"create", "--size", "8M", existing}, []string{existing, "exists"}},
		{"existing file as a snapshot", []string{"create", "--parent", existing, existing}, []string{existing, "exists"}},
		{"parent missing", []string{"create", "--parent", filepath.Join(dir, "nothing.vhd"), newImg}, []string{"nothing.vhd", "no such file"}},
		{"parent not a VHD", []string{"create", "--parent", dir, newImg}, []string{dir, "is a directory"}},
		{"directory missing", []string{"create", "--size", "8M", filepath.Join(dir, "no", "such", "dir.vhd")}, []string{"dir.vhd", "no such file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stdout, stderr, code := vhdfs(t, tc.args...)
			if code != 1 || stdout != "" {
				t.Errorf("exit %d, want 1\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
			assertOneLineError(t, stderr, tc.want...)
			assertUnchanged(t, snap)
		})
	}
}

// TestExportCommand: export is quiet when stdout is not a terminal, replaces an
// existing output file entirely with --force, and refuses to overwrite an image of the
// chain, --force or not.
func TestExportCommand(t *testing.T) {
	t.Parallel()
	c := makeChain(t, chainOptions{Depth: 2, Create: []string{"--size", "8M"}, Writes: 6, Seed: 51})
	outDir := t.TempDir()
	out := filepath.Join(outDir, "out.raw")
	// A longer file full of junk: export must leave exactly the disk.
	if err := os.WriteFile(out, fill(int(c.Size)+3*mib, 0xff), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := vhdfs(t, "export", "--force", c.Top(), out)
	if code != 0 || stdout != "" || stderr != "" {
		t.Errorf("export: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	assertFileEquals(t, out, c.Model())

	snap := snapshotFiles(t, c.Dir)
	for _, target := range c.Images {
		stdout, stderr, code := vhdfs(t, "export", "--force", c.Top(), target)
		if code != 1 || stdout != "" {
			t.Errorf("export onto %s: exit %d, stdout %q", target, code, stdout)
		}
		assertOneLineError(t, stderr, target, "image of the chain")
	}
	// The same file through another name.
	link := filepath.Join(outDir, "link.vhd")
	if err := os.Symlink(c.Images[0], link); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code := vhdfs(t, "export", "--force", c.Top(), link); code != 1 {
		t.Errorf("export onto a symlink to the base: exit %d", code)
	} else {
		assertOneLineError(t, stderr, "image of the chain")
	}
	_, stderr, code = vhdfs(t, "export", c.Top(), filepath.Join(outDir, "no", "dir", "x.raw"))
	if code != 1 {
		t.Errorf("export into a missing directory: exit %d", code)
	}
	assertOneLineError(t, stderr, "x.raw", "no such file")
	assertUnchanged(t, snap)
}

// TestInfoText: the human form of info lists the chain top first.
func TestInfoText(t *testing.T) {
	t.Parallel()
	c := makeChain(t, chainOptions{Depth: 3, Create: []string{"--size", "8M"}})
	out := mustVhdfs(t, "info", c.Top())
	if !strings.HasPrefix(out, "chain of 3 image(s), virtual size ") {
		t.Errorf("info starts %q", out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 5 {
		t.Fatalf("info prints %d lines, want 5:\n%s", len(lines), out)
	}
	for i, want := range []string{c.Images[2], c.Images[1], c.Images[0]} {
		if f := strings.Fields(lines[2+i]); len(f) < 3 || f[0] != string(rune('0'+i)) || f[1] != want {
			t.Errorf("line %d is %q, want depth %d and %s", 2+i, lines[2+i], i, want)
		}
	}
	if !strings.Contains(lines[2], "differencing") || !strings.Contains(lines[4], "dynamic") {
		t.Errorf("types missing:\n%s", out)
	}
}

// TestCreateTooDeep: a snapshot of a chain of 128 images (chain.MaxDepth) would make
// a chain no command opens; create refuses it and writes nothing.
func TestCreateTooDeep(t *testing.T) {
	t.Parallel()
	const maxDepth = 128
	dir := t.TempDir()
	top := filepath.Join(dir, "0.vhd")
	mustVhdfs(t, "create", "--size", "1M", "--block-size", "512K", top)
	for i := 1; i < maxDepth; i++ {
		next := filepath.Join(dir, fmt.Sprintf("%d.vhd", i))
		mustVhdfs(t, "create", "--parent", top, next)
		top = next
	}
	if got := len(vhdfsInfo(t, top).Layers); got != maxDepth {
		t.Fatalf("info shows %d layers, want %d", got, maxDepth)
	}
	newImg := filepath.Join(dir, "too-deep.vhd")
	stdout, stderr, code := vhdfs(t, "create", "--parent", top, newImg)
	if code != 1 || stdout != "" {
		t.Errorf("exit %d, want 1\nstdout: %s\nstderr: %s", code, stdout, stderr)
	}
	assertOneLineError(t, stderr, newImg, "128 images")
	if _, err := os.Lstat(newImg); !os.IsNotExist(err) {
		t.Errorf("create left %s behind (%v)", newImg, err)
	}
}
