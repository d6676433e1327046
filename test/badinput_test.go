package test

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// dynamicWithData makes an 8 MiB dynamic image with 512 KiB blocks at path and
// allocates at least three blocks in it through the Go API.
func dynamicWithData(t testing.TB, path string) layout {
	t.Helper()
	mustVhdfs(t, "create", "--size", "8M", "--block-size", "512K", path)
	size := virtualSize(t, path)
	model := make([]byte, size)
	applyWrites(t, path, model, []write{
		{0, fill(4096, 0x11)},
		{mib + 512, fill(1024, 0x22)},
		{3 * mib, fill(64<<10, 0x33)},
	})
	l := readLayout(t, path)
	if len(l.allocated()) < 3 {
		t.Fatalf("%s: %d blocks allocated, want 3", path, len(l.allocated()))
	}
	return l
}

// fill returns n bytes of b.
// u64 is v big-endian, as the format stores it.
func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

// simpleChain makes base.vhd (dynamic, with data) and child.vhd (differencing, with
// data) in dir and returns their paths.
func simpleChain(t testing.TB, dir string) (base, child string) {
	t.Helper()
	base, child = filepath.Join(dir, "base.vhd"), filepath.Join(dir, "child.vhd")
	dynamicWithData(t, base)
	mustVhdfs(t, "create", "--parent", base, child)
	model := make([]byte, virtualSize(t, child))
	applyWrites(t, child, model, []write{{512, fill(512, 0x44)}, {5 * mib, fill(8192, 0x55)}})
	return base, child
}

// badCase is one malformed input: setup builds the files in dir and returns the image
// to open and the file the error must name; want are substrings the error must hold.
type badCase struct {
	name  string
	setup func(t *testing.T, dir string) (image, culprit string)
	want  []string
}

func badInputCases() []badCase {
	dyn := func(t *testing.T, dir string) (string, layout) {
		p := filepath.Join(dir, "bad.vhd")
		return p, dynamicWithData(t, p)
	}
	fixed := func(t *testing.T, dir string) string {
		p := filepath.Join(dir, "bad.vhd")
		mustVhdfs(t, "create", "--size", "8M", "--type", "fixed", p)
		return p
	}
	self := func(p string) (string, string) { return p, p }
	cases := []badCase{
		{"bad cookie, fixed image", func(t *testing.T, dir string) (string, string) {
			p := fixed(t, dir)
			patchFooters(t, p, footerCookieOff, []byte("notavhd!"), false)
			return self(p)
		}, []string{"no VHD footer", `cookie is not "conectix"`}},
		{"bad cookie, dynamic image, both footers", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchFooters(t, p, footerCookieOff, []byte("notavhd!"), false)
			return self(p)
		}, []string{"footer", "cookie", "conectix"}},
		{"bad footer checksum, fixed image", func(t *testing.T, dir string) (string, string) {
			p := fixed(t, dir)
			patchFooters(t, p, footerTimeOff, []byte{1, 2, 3, 4}, true)
			return self(p)
		}, []string{"footer", "checksum"}},
		{"bad footer checksum, dynamic image, both footers", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchFooters(t, p, footerTimeOff, []byte{1, 2, 3, 4}, true)
			return self(p)
		}, []string{"footer", "checksum"}},
		{"bad dynamic header checksum", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchHeader(t, p, headerMaxEntriesOff, []byte{0, 0, 0, 200}, true)
			return self(p)
		}, []string{"dynamic header", "checksum"}},
		{"bad dynamic header cookie", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchHeader(t, p, headerCookieOff, []byte("cxdense!"), false)
			return self(p)
		}, []string{"dynamic header", "cookie", "cxsparse"}},
		{"truncated inside a data block", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			last := int64(0)
			for _, i := range l.allocated() {
				last = max(last, int64(l.BAT[i])*512)
			}
			truncateFile(t, p, last+4096)
			return self(p)
		}, []string{"BAT entry", "past the end"}},
		{"truncated inside the BAT", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			truncateFile(t, p, l.TableOff+32)
			return self(p)
		}, []string{"BAT", "truncated"}},
		{"truncated inside the dynamic header", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			truncateFile(t, p, l.HeaderOff+512)
			return self(p)
		}, []string{"dynamic header", "truncated"}},
		{"truncated fixed image", func(t *testing.T, dir string) (string, string) {
			p := fixed(t, dir)
			l := readLayout(t, p)
			foot := readAt(t, p, l.FooterOff, footerLen)
			truncateFile(t, p, l.FooterOff-mib)
			patchAt(t, p, l.FooterOff-mib, foot)
			return self(p)
		}, []string{"fixed image", "truncated"}},
		{"BAT entry past the end", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			patchBAT(t, p, l.allocated()[1], 0x00200000)
			return self(p)
		}, []string{"BAT entry", "past the end"}},
		{"BAT entry in an unallocated slot past the end", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			patchBAT(t, p, len(l.BAT)-1, 0xfffffffe)
			return self(p)
		}, []string{"BAT entry", "past the end"}},
		{"BAT entry overlapping the dynamic header", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			patchBAT(t, p, l.allocated()[0], uint32(l.HeaderOff/512))
			return self(p)
		}, []string{"BAT entry", "overlapping the dynamic header"}},
		{"BAT entry overlapping the footer copy", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			patchBAT(t, p, l.allocated()[0], 0)
			return self(p)
		}, []string{"BAT entry", "overlapping the footer copy"}},
		{"BAT entry overlapping the BAT", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			patchBAT(t, p, l.allocated()[0], uint32(l.TableOff/512))
			return self(p)
		}, []string{"BAT entry", "overlapping the BAT"}},
		{"BAT entry overlapping a parent locator", func(t *testing.T, dir string) (string, string) {
			_, child := simpleChain(t, dir)
			l := readLayout(t, child)
			patchBAT(t, child, l.allocated()[0], uint32(l.Locators[l.locatorIndex(platformW2ru)].Offset/512))
			return self(child)
		}, []string{"BAT entry", "overlapping parent locator"}},
		{"two BAT entries at the same place", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			a := l.allocated()
			patchBAT(t, p, a[1], l.BAT[a[0]])
			return self(p)
		}, []string{"BAT entries", "overlap"}},
		{"two BAT entries overlapping in part", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			a := l.allocated()
			patchBAT(t, p, a[1], l.BAT[a[0]]+8)
			return self(p)
		}, []string{"BAT entries", "overlap"}},
		{"block size not a power of two", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchHeader(t, p, headerBlockSizeOff, []byte{0, 0x18, 0, 0}, false) // 1.5 MiB
			return self(p)
		}, []string{"block size 1572864", "power of two"}},
		{"block size below a sector", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchHeader(t, p, headerBlockSizeOff, []byte{0, 0, 1, 0}, false) // 256 bytes
			return self(p)
		}, []string{"block size 256", "power of two"}},
		{"block size zero", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchHeader(t, p, headerBlockSizeOff, []byte{0, 0, 0, 0}, false)
			return self(p)
		}, []string{"block size 0", "power of two"}},
		{"table too small for the size", func(t *testing.T, dir string) (string, string) {
			p, l := dyn(t, dir)
			patchHeader(t, p, headerMaxEntriesOff, []byte{0, 0, 0, byte(len(l.BAT) - 1)}, false)
			return self(p)
		}, []string{"max table entries", "cannot cover"}},
		{"current size not a multiple of 512", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchFooters(t, p, footerCurSizeOff, []byte{0, 0, 0, 0, 0, 0x7f, 0xff, 0xff}, false)
			return self(p)
		}, []string{"current size", "multiple of 512"}},
		{"unknown disk type", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchFooters(t, p, footerTypeOff, []byte{0, 0, 0, 5}, false)
			return self(p)
		}, []string{"disk type 5"}},
		{"parent locator data outside the file", func(t *testing.T, dir string) (string, string) {
			_, child := simpleChain(t, dir)
			l := readLayout(t, child)
			i := l.locatorIndex(platformW2ru)
			loc := l.Locators[i]
			loc.Offset = uint64(l.FileSize + 4096)
			patchLocator(t, child, i, loc)
			return self(child)
		}, []string{"parent locator", "W2ru", "outside the file"}},
		// Offsets past 2^63 print as the unsigned numbers on disk, not as negative ones.
		{"data offset past 2^63", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchFooters(t, p, footerDataOffOff, u64(0xFFFFFFFFFFFFFE00), false)
			return self(p)
		}, []string{"dynamic header at 18446744073709551104"}},
		{"BAT offset past 2^63", func(t *testing.T, dir string) (string, string) {
			p, _ := dyn(t, dir)
			patchHeader(t, p, headerTableOffOff, u64(0xFFFFFFFFFFFFFE00), false)
			return self(p)
		}, []string{"BAT at 18446744073709551104"}},
		{"parent locator data offset past 2^63", func(t *testing.T, dir string) (string, string) {
			_, child := simpleChain(t, dir)
			l := readLayout(t, child)
			i := l.locatorIndex(platformW2ru)
			loc := l.Locators[i]
			loc.Offset = 0xFFFFFFFFFFFFFE00
			patchLocator(t, child, i, loc)
			return self(child)
		}, []string{"parent locator", "W2ru", "at 18446744073709551104", "outside the file"}},
		{"parent missing", func(t *testing.T, dir string) (string, string) {
			base, child := simpleChain(t, dir)
			if err := os.Remove(base); err != nil {
				t.Fatal(err)
			}
			return self(child)
		}, []string{"parent", "not found", "base.vhd"}},
		{"parent unique ID mismatch", func(t *testing.T, dir string) (string, string) {
			base, child := simpleChain(t, dir)
			if err := os.Remove(base); err != nil {
				t.Fatal(err)
			}
			mustVhdfs(t, "create", "--size", "8M", "--block-size", "512K", base)
			return self(child)
		}, []string{"parent unique ID", "does not match", "base.vhd"}},
		{"parent corrupt", func(t *testing.T, dir string) (string, string) {
			base, child := simpleChain(t, dir)
			patchFooters(t, base, footerCookieOff, []byte("garbage!"), false)
			return child, base
		}, []string{"child.vhd", "cookie"}},
		{"chain cycle of two images", func(t *testing.T, dir string) (string, string) {
			// a.vhd's locators name p.vhd; b.vhd's name a.vhd. Put b.vhd in p.vhd's place
			// and make a.vhd record b's unique ID: a → b → a.
			p, a, b := filepath.Join(dir, "p.vhd"), filepath.Join(dir, "a.vhd"), filepath.Join(dir, "b.vhd")
			mustVhdfs(t, "create", "--size", "8M", p)
			mustVhdfs(t, "create", "--parent", p, a)
			mustVhdfs(t, "create", "--parent", a, b)
			if err := os.Rename(b, p); err != nil {
				t.Fatal(err)
			}
			id := readLayout(t, p).UniqueID
			patchHeader(t, a, headerParentIDOff, id[:], false)
			return self(a)
		}, []string{"cycle"}},
		{"image is its own parent", func(t *testing.T, dir string) (string, string) {
			p, a := filepath.Join(dir, "p.vhd"), filepath.Join(dir, "a.vhd")
			mustVhdfs(t, "create", "--size", "8M", p)
			mustVhdfs(t, "create", "--parent", p, a)
			if err := os.Rename(a, p); err != nil {
				t.Fatal(err)
			}
			id := readLayout(t, p).UniqueID
			patchHeader(t, p, headerParentIDOff, id[:], false)
			return self(p)
		}, []string{"cycle"}},
		{"file shorter than a footer", func(t *testing.T, dir string) (string, string) {
			p := fixed(t, dir)
			foot := readAt(t, p, readLayout(t, p).FooterOff, 300)
			if err := os.WriteFile(p, foot, 0o644); err != nil {
				t.Fatal(err)
			}
			return self(p)
		}, []string{"300 bytes", "shorter than a VHD footer"}},
		{"empty file", func(t *testing.T, dir string) (string, string) {
			p := filepath.Join(dir, "empty.vhd")
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			return self(p)
		}, []string{"0 bytes", "shorter than a VHD footer"}},
		{"a directory", func(t *testing.T, dir string) (string, string) {
			p := filepath.Join(dir, "dir.vhd")
			if err := os.Mkdir(p, 0o755); err != nil {
				t.Fatal(err)
			}
			return self(p)
		}, []string{"is a directory"}},
		{"nonexistent path", func(t *testing.T, dir string) (string, string) {
			return self(filepath.Join(dir, "nothing.vhd"))
		}, []string{"no such file"}},
	}
	return append(cases, otherFormatCases()...)
}

// otherFormatCases are images of formats vhdfs does not read, made by qemu-img and
// sfdisk: the error names the format and how to convert it.
func otherFormatCases() []badCase {
	qemu := func(name string, args ...string) func(t *testing.T, dir string) (string, string) {
		return func(t *testing.T, dir string) (string, string) {
			requireTool(t, "qemu-img")
			p := filepath.Join(dir, name)
			mustRun(t, "qemu-img", append(append([]string{"create", "-q"}, args...), p, "16M")...)
			return p, p
		}
	}
	partitioned := func(name, label string) func(t *testing.T, dir string) (string, string) {
		return func(t *testing.T, dir string) (string, string) {
			requireTool(t, "sfdisk")
			p := filepath.Join(dir, name)
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(p, 16<<20); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command("sfdisk", "-q", "--label", label, p)
			cmd.Stdin = strings.NewReader(",,L\n")
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("sfdisk %s: %v: %s", p, err, out)
			}
			return p, p
		}
	}
	return []badCase{
		{"a qcow2 image", qemu("disk.qcow2", "-f", "qcow2"), []string{"a qcow2 image, not VHD or VHDX", "qemu-img convert -O vhdx", "disk.vhdx"}},
		{"a sparse VMDK", qemu("disk.vmdk", "-f", "vmdk"), []string{"a VMDK image, not VHD or VHDX", "qemu-img convert -O vhdx"}},
		// A descriptor of a few hundred bytes: to the VHD reader a truncated file.
		{"a VMDK descriptor", qemu("flat.vmdk", "-f", "vmdk", "-o", "subformat=monolithicFlat"), []string{"a VMDK image, not VHD or VHDX", "qemu-img convert -O vhdx"}},
		{"a VDI image", qemu("disk.vdi", "-f", "vdi"), []string{"a VDI image, not VHD or VHDX", "qemu-img convert -O vhdx"}},
		{"a raw disk with an MBR", partitioned("mbr.img", "dos"), []string{"a raw disk image (MBR), not VHD or VHDX", "qemu-img convert -f raw -O vhdx", "--salvage"}},
		{"a raw disk with a GPT", partitioned("gpt.img", "gpt"), []string{"a raw disk image (GPT), not VHD or VHDX", "qemu-img convert -f raw -O vhdx", "--salvage"}},
	}
}

// TestMountOtherFormat: mounting an image of another format fails with one line that
// names the format, and mounts nothing.
func TestMountOtherFormat(t *testing.T) {
	t.Parallel()
	for _, tc := range otherFormatCases() {
		t.Run(tc.name, func(t *testing.T) {
			image, culprit := tc.setup(t, t.TempDir())
			mnt := mMountpoint(t)
			unmountOnCleanup(t, mnt)
			for _, args := range [][]string{{"mount", image, mnt}, {"mount", "-r", image, mnt}} {
				stdout, stderr, code := vhdfs(t, args...)
				if code != 1 || stdout != "" {
					t.Errorf("vhdfs %v: exit %d, stdout %q; want exit 1 and nothing", args, code, stdout)
				}
				assertOneLineError(t, stderr, append([]string{culprit}, tc.want...)...)
				if mountedAt(t, mnt) {
					t.Errorf("vhdfs %v failed but left a mount", args)
				}
			}
		})
	}
}

// TestBadInput: info, check and export of every malformed input fail with one line on
// stderr naming the file and the problem, never panic, and change no file; export
// creates no output file. info prints on stdout only the images it could open.
func TestBadInput(t *testing.T) {
	t.Parallel()
	for _, tc := range badInputCases() {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			image, culprit := tc.setup(t, dir)
			outDir := t.TempDir()
			out := filepath.Join(outDir, "out.raw")
			snap := snapshotFiles(t, dir, outDir)
			for _, cmd := range []struct {
				args []string
				code int
			}{
				{[]string{"info", image}, 1},
				{[]string{"info", "--json", image}, 1},
				{[]string{"check", image}, 3},
				{[]string{"check", "--repair", image}, 3},
				{[]string{"export", image, out}, 1},
			} {
				stdout, stderr, code := vhdfs(t, cmd.args...)
				if code != cmd.code {
					t.Errorf("vhdfs %v: exit %d, want %d\nstdout: %s\nstderr: %s", cmd.args, code, cmd.code, stdout, stderr)
				}
				// info shows the images it could open (the top and the parents
				// found) when a parent is at fault; export shows nothing.
				if cmd.args[0] == "export" && stdout != "" || cmd.args[0] == "info" && stdout != "" && !strings.Contains(stdout, image) {
					t.Errorf("vhdfs %v: stdout %q, want nothing", cmd.args, stdout)
				}
				assertOneLineError(t, stderr, append([]string{culprit}, tc.want...)...)
				if cmd.args[0] == "info" && len(cmd.args) == 2 {
					t.Logf("%s", stderr)
				}
			}
			if _, err := os.Lstat(out); !os.IsNotExist(err) {
				t.Errorf("export left %s behind (%v)", out, err)
			}
			assertUnchanged(t, snap)
		})
	}
}
