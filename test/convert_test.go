package test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// convertTargets are the images convert makes in the tests: each format, each type.
var convertTargets = []struct{ format, typ string }{
	{"vhd", "dynamic"}, {"vhd", "fixed"}, {"vhdx", "dynamic"}, {"vhdx", "fixed"},
}

// TestConvert flattens 3-deep chains of each format (VHDX with 512- and 4096-byte
// logical sectors) into a new image of each format and type. The new image reads as
// the model through qemu-img (which opens no 4096-byte-sector VHDX) and through
// vhdfs export, checks clean, stores a dynamic block only where the model has
// non-zero data (the top hides data with written zeros, and most blocks were never
// written), and takes no more space than the model's non-zero granules and the
// metadata: a fixed image's zeros are holes.
func TestConvert(t *testing.T) {
	requireTool(t, "qemu-img")
	sources := []struct {
		format string
		sector int64
	}{{"vhd", 0}, {"vhdx", 512}, {"vhdx", 4096}}
	for _, src := range sources {
		name := src.format
		if src.sector == 4096 {
			name += "-4k"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			c := makeChain(t, chainOptions{Format: src.format, SectorSize: src.sector, Depth: 3, Seed: 18,
				Create: []string{"--size", "40M", "--block-size", "512K"}, Writes: 8,
				LayerWrites: func(i int) []write {
					if i == 2 {
						// Zeros written over the parents' data: stored in the top, and
						// not to be stored in the new image.
						return []write{{Off: 32 * mib, Data: make([]byte, 4*mib)}}
					}
					return []write{{Off: 33 * mib, Data: bytes.Repeat([]byte{byte(0x11 + i)}, 64<<10)}}
				}})
			model := c.Model()
			for _, tg := range convertTargets {
				t.Run(tg.format+"-"+tg.typ, func(t *testing.T) {
					out := filepath.Join(t.TempDir(), "out."+tg.format)
					args := []string{"convert", "--type", tg.typ}
					if tg.typ == "dynamic" {
						args = append(args, "--block-size", "2M")
					}
					stdout, stderr, code := vhdfs(t, append(args, c.Top(), out)...)
					if code != 0 {
						t.Fatalf("convert: exit %d: %s", code, stderr)
					}
					if want := fmt.Sprintf("to %s: %s %s", out, strings.ToUpper(tg.format), tg.typ); !strings.Contains(stdout, want) {
						t.Errorf("convert said %q, want %q in it", stdout, want)
					}
					if src.sector == 4096 && tg.format == "vhd" && !strings.Contains(stderr, "4096-byte logical sectors") {
						t.Errorf("no warning about the sector size: %q", stderr)
					}
					if src.sector != 4096 || tg.format == "vhd" {
						assertSameBytes(t, "qemu-img convert of "+out, qemuConvert(t, out), model)
					}
					assertFileEquals(t, exportImage(t, out), model)
					if _, stderr, code := vhdfs(t, "check", out); code != 0 {
						t.Errorf("check %s: exit %d: %s", out, code, stderr)
					}
					info := vhdfsInfo(t, out).Layers[0]
					if info.Type != tg.typ || info.VirtualSize != c.Size {
						t.Errorf("%s: %s, %d bytes; want %s, %d", out, info.Type, info.VirtualSize, tg.typ, c.Size)
					}
					if tg.typ == "dynamic" {
						stored := blockStored(t, []string{out})
						for off := int64(0); off < c.Size; off += info.BlockSize {
							want := bytes.ContainsFunc(model[off:min(off+info.BlockSize, c.Size)], func(r rune) bool { return r != 0 })
							if stored(off) != want {
								t.Errorf("block at %d stored: %v, want %v", off, stored(off), want)
							}
						}
					}
					// The metadata: VHDX's headers, log, region tables and BAT (up to
					// 5 MiB), and a fixed VHDX's last block past the disk's end,
					// which it keeps allocated; VHD's tables and one 4 KiB block
					// per data block for its bitmap.
					meta := int64(256<<10) + (c.Size/(2*mib)+1)*4096
					if tg.format == "vhdx" {
						meta = 5*mib + (info.BlockSize-c.Size%info.BlockSize)%info.BlockSize
					}
					if got, data := allocatedBytes(t, out), nonZeroGranules(model); got > data+meta {
						t.Errorf("%s takes %d bytes; the model's non-zero granules are %d, the metadata at most %d", out, got, data, meta)
					}
				})
			}
		})
	}
}

// nonZeroGranules counts the bytes of model in 4 KiB granules that are not all zeros.
func nonZeroGranules(model []byte) int64 {
	var n int64
	for off := 0; off < len(model); off += 4096 {
		p := model[off:min(off+4096, len(model))]
		if bytes.ContainsFunc(p, func(r rune) bool { return r != 0 }) {
			n += int64(len(p))
		}
	}
	return n
}

// TestConvertAzure: --azure makes a fixed VHD of a size rounded up to a whole MiB,
// says so, and keeps it exact in the footer: qemu-img sees that size, the model's
// bytes and zeros past them.
func TestConvertAzure(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		t.Parallel()
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Seed: 7, Writes: 6,
			Create: []string{"--size", "5000K", "--exact-size"}})
		if c.Size != 5000<<10 {
			t.Fatalf("chain of %d bytes, want %d", c.Size, 5000<<10)
		}
		out := filepath.Join(t.TempDir(), "azure.vhd")
		_, stderr, code := vhdfs(t, "convert", "--azure", c.Top(), out)
		if code != 0 {
			t.Fatalf("convert --azure: exit %d: %s", code, stderr)
		}
		const want = 5 * mib
		if !strings.Contains(stderr, "note: ") || !strings.Contains(stderr, "(5242880 bytes)") {
			t.Errorf("stderr says nothing of the new size: %q", stderr)
		}
		if qi := qemuImgInfo(t, "-f", "vpc", out); qi.VirtualSize != want {
			t.Errorf("qemu-img info: virtual size %d, want %d", qi.VirtualSize, want)
		}
		info := vhdfsInfo(t, out).Layers[0]
		if info.Type != "fixed" || info.VirtualSize != want {
			t.Errorf("%s: %s, %d bytes; want fixed, %d", out, info.Type, info.VirtualSize, want)
		}
		assertSameBytes(t, "qemu-img convert of "+out, qemuConvert(t, out), append(bytes.Clone(c.Model()), make([]byte, want-c.Size)...))
	})
}

// TestConvertRefuses: an existing OUT (left as it was), IN as OUT, and the flag
// combinations --azure cannot take; each refused with one line (pointing at
// convert --help, for a wrong command line), and no file left behind.
func TestConvertRefuses(t *testing.T) {
	c := makeChain(t, chainOptions{Format: "vhdx", Depth: 2, Seed: 3, Writes: 2, Create: []string{"--size", "8M"}})
	exists := filepath.Join(c.Dir, "exists.vhd")
	if err := os.WriteFile(exists, []byte("not to be touched"), 0o644); err != nil {
		t.Fatal(err)
	}
	snap := snapshotFiles(t, c.Dir)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"OUT exists", []string{c.Top(), exists}, 1, exists + ": exists; refusing to overwrite it"},
		{"IN is OUT", []string{c.Top(), c.Top()}, 1, "refuses to overwrite its input"},
		{"IN is OUT by another name", []string{c.Top(), c.Dir + "/./" + filepath.Base(c.Top())}, 1, "refuses to overwrite its input"},
		{"a parent is OUT", []string{c.Top(), c.Images[0]}, 1, "exists; refusing to overwrite it"},
		{"--azure --format vhdx", []string{"--azure", "--format", "vhdx", c.Top(), filepath.Join(c.Dir, "a.vhdx")}, 2, "--azure makes a fixed VHD"},
		{"--azure OUT.vhdx", []string{"--azure", c.Top(), filepath.Join(c.Dir, "a.vhdx")}, 2, "name it .vhd"},
		{"--azure --type dynamic", []string{"--azure", "--type", "dynamic", c.Top(), filepath.Join(c.Dir, "a.vhd")}, 2, "--type dynamic"},
		{"--block-size of a fixed image", []string{"--type", "fixed", "--block-size", "2M", c.Top(), filepath.Join(c.Dir, "a.vhd")}, 2, "dynamic images only"},
		{"--format raw", []string{"--format", "raw", c.Top(), filepath.Join(c.Dir, "a.raw")}, 2, "want vhd or vhdx"},
		{"a block size VHD cannot take", []string{"--block-size", "3M", c.Top(), filepath.Join(c.Dir, "a.vhd")}, 2, "a.vhd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, code := vhdfs(t, append([]string{"convert"}, tc.args...)...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d: %s", code, tc.code, stderr)
			}
			if tc.code == 2 {
				assertOneLineError(t, stderr, tc.want, "see 'vhdfs convert --help'")
				return
			}
			assertOneLineError(t, stderr, tc.want)
		})
	}
	assertUnchanged(t, snap)
}

// TestConvertInterrupted kills a convert of a sparse 256 MiB chain half-way
// (VHDFS_FAILPOINT convert-half:kill): OUT does not exist, only the temporary file
// named for it is left, and no image changed; a second convert then succeeds. A
// SIGINT at the same point removes the temporary file too.
func TestConvertInterrupted(t *testing.T) {
	// Not parallel, and not larger: the chain's views and the export are held in
	// memory, which -race multiplies (at 1 GiB, two at once, the test binary took
	// 22 GB and the OOM killer ended it).
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Seed: 9, Create: []string{"--size", "256M"},
			LayerWrites: func(i int) []write {
				var ws []write
				for off := int64(i) * 8 * mib; off < 256*mib; off += 32 * mib {
					ws = append(ws, write{Off: off, Data: bytes.Repeat([]byte{byte(1 + i), 0xee}, 32<<10)})
				}
				return ws
			}})
		snap := snapshotFiles(t, c.Dir)
		outDir := t.TempDir()
		out := filepath.Join(outDir, "flat.vhdx")

		cmd := exec.Command(vhdfsBin, "convert", c.Top(), out)
		cmd.Env = append(os.Environ(), "VHDFS_FAILPOINT=convert-half:kill")
		err := cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("convert with the kill failpoint: %v, want killed by SIGKILL", err)
		}
		tmp := filepath.Join(outDir, fmt.Sprintf(".flat.vhdx.vhdfs-convert-%d", cmd.Process.Pid))
		assertDirHolds(t, outDir, filepath.Base(tmp))
		assertUnchanged(t, snap)

		mustVhdfs(t, "convert", c.Top(), out)
		assertFileEquals(t, exportImage(t, out), c.Model())
		if err := os.Remove(tmp); err != nil {
			t.Fatal(err)
		}

		out2 := filepath.Join(outDir, "flat2.vhd")
		env, reached, resume := pausePoint(t, "convert-half")
		cmd = exec.Command(vhdfsBin, "convert", c.Top(), out2)
		cmd.Env = append(os.Environ(), env)
		errPipe, err := cmd.StderrPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string, 4)
		go func() {
			sc := bufio.NewScanner(errPipe)
			for sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
		}()
		reached()
		if err := cmd.Process.Signal(os.Interrupt); err != nil {
			t.Fatal(err)
		}
		// The convert says it stops once it has been told to: only then may it go on.
		var said []string
		select {
		case l := <-lines:
			said = append(said, l)
		case <-time.After(cmdTimeout):
			t.Fatalf("convert did not acknowledge SIGINT within %v", cmdTimeout)
		}
		resume()
		for l := range lines {
			said = append(said, l)
		}
		if err := cmd.Wait(); !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("convert interrupted: %v, want exit 1; stderr %q", err, said)
		}
		if len(said) != 2 || !strings.Contains(said[0], "stopping") || !strings.Contains(said[1], out2) || !strings.Contains(said[1], "interrupted") {
			t.Errorf("stderr of the interrupted convert: %q; want the acknowledgement, then one line naming %s", said, out2)
		}
		assertDirHolds(t, outDir, "flat.vhdx")
		assertUnchanged(t, snap)
	})
}

// assertDirHolds checks that dir holds exactly the files named.
func assertDirHolds(t testing.TB, dir string, names ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if strings.Join(got, " ") != strings.Join(names, " ") {
		t.Errorf("%s holds %q, want %q", dir, got, names)
	}
}
