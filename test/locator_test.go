package test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// makePair makes a dynamic base at base and a differencing child of it at child (in
// whatever directories those name), writes into both, and returns the child's model.
func makePair(t testing.TB, base, child string) []byte {
	t.Helper()
	for _, d := range []string{filepath.Dir(base), filepath.Dir(child)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mustVhdfs(t, "create", "--size", "8M", "--block-size", "512K", base)
	model := make([]byte, virtualSize(t, base))
	gen := newWriteGen(41, int64(len(model)), 512, 64<<10)
	applyWrites(t, base, model, gen.writes(10))
	mustVhdfs(t, "create", "--parent", base, child)
	applyWrites(t, child, model, gen.writes(10))
	return model
}

// setLocatorData replaces the data of the locator with platform code code (which must
// fit its reserved space) and its length.
func setLocatorData(t testing.TB, path string, code uint32, data []byte) {
	t.Helper()
	l := readLayout(t, path)
	i := l.locatorIndex(code)
	if i < 0 {
		// vhdfs writes W2ru and MacX: the MacX entry's room takes another code.
		if i = l.locatorIndex(platformMacX); i < 0 {
			t.Fatalf("%s has no locator %#x", path, code)
		}
	}
	loc := l.Locators[i]
	loc.Code = code
	if int64(len(data)) > int64(loc.Space) {
		t.Fatalf("%d bytes do not fit the %d bytes of locator %d", len(data), loc.Space, i)
	}
	patchAt(t, path, int64(loc.Offset), append(data, make([]byte, int(loc.Space)-len(data))...))
	loc.Length = uint32(len(data))
	patchLocator(t, path, i, loc)
}

// dropLocator clears the locator entry with platform code code.
func dropLocator(t testing.TB, path string, code uint32) {
	t.Helper()
	i := readLayout(t, path).locatorIndex(code)
	if i < 0 {
		return
	}
	patchLocator(t, path, i, locator{})
}

// moveDir renames dir to a new name beside it and returns the new name, so absolute
// paths recorded in the images no longer lead anywhere.
func moveDir(t testing.TB, dir string) string {
	t.Helper()
	to := dir + "-moved"
	if err := os.Rename(dir, to); err != nil {
		t.Fatal(err)
	}
	return to
}

// TestParentLocators: a parent is found through each kind of locator alone, through
// the header's parent name alone, and with locator data space in sectors; a
// candidate whose unique ID differs is passed over.
func TestParentLocators(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		foundBy string
		// setup makes the chain under root and returns the child's path and the path
		// the parent must be found at.
		setup func(t *testing.T, root string) (child, parent string, model []byte)
	}{
		{"W2ru as vhdfs writes it", "W2ru", func(t *testing.T, root string) (string, string, []byte) {
			dir := filepath.Join(root, "vm")
			m := makePair(t, filepath.Join(dir, "base.vhd"), filepath.Join(dir, "child.vhd"))
			return filepath.Join(dir, "child.vhd"), filepath.Join(dir, "base.vhd"), m
		}},
		{"W2ru into a sibling directory, tree moved", "W2ru", func(t *testing.T, root string) (string, string, []byte) {
			dir := filepath.Join(root, "vm")
			m := makePair(t, filepath.Join(dir, "parents", "base.vhd"), filepath.Join(dir, "kids", "child.vhd"))
			dir = moveDir(t, dir)
			return filepath.Join(dir, "kids", "child.vhd"), filepath.Join(dir, "parents", "base.vhd"), m
		}},
		{"only W2ku, by its file name beside the child", "W2ku", func(t *testing.T, root string) (string, string, []byte) {
			dir := filepath.Join(root, "vm")
			child := filepath.Join(dir, "child.vhd")
			m := makePair(t, filepath.Join(dir, "base.vhd"), child)
			setLocatorData(t, child, platformW2ku, utf16le(strings.ReplaceAll(filepath.Join(dir, "base.vhd"), "/", `\`)))
			dropLocator(t, child, platformW2ru)
			patchParentName(t, child, "")
			dir = moveDir(t, dir)
			return filepath.Join(dir, "child.vhd"), filepath.Join(dir, "base.vhd"), m
		}},
		{"only W2ku, a Windows path with a drive letter", "W2ku", func(t *testing.T, root string) (string, string, []byte) {
			dir := filepath.Join(root, "vm")
			child := filepath.Join(dir, "child.vhd")
			m := makePair(t, filepath.Join(dir, "base.vhd"), child)
			setLocatorData(t, child, platformW2ku, utf16le(`C:\Hyper-V\Virtual Hard Disks\base.vhd`))
			dropLocator(t, child, platformW2ru)
			patchParentName(t, child, "")
			return child, filepath.Join(dir, "base.vhd"), m
		}},
		{"W2ru names a missing file, W2ku finds the parent", "W2ku", func(t *testing.T, root string) (string, string, []byte) {
			dir := filepath.Join(root, "vm")
			child := filepath.Join(dir, "child.vhd")
			m := makePair(t, filepath.Join(dir, "base.vhd"), child)
			setLocatorData(t, child, platformW2ku, utf16le(strings.ReplaceAll(filepath.Join(dir, "base.vhd"), "/", `\`)))
			setLocatorData(t, child, platformW2ru, utf16le(`.\gone.vhd`))
			return child, filepath.Join(dir, "base.vhd"), m
		}},
		{"W2ru names another image, W2ku finds the parent", "W2ku", func(t *testing.T, root string) (string, string, []byte) {
			dir := filepath.Join(root, "vm")
			child := filepath.Join(dir, "child.vhd")
			m := makePair(t, filepath.Join(dir, "base.vhd"), child)
			mustVhdfs(t, "create", "--size", "8M", filepath.Join(dir, "other.vhd"))
			setLocatorData(t, child, platformW2ku, utf16le(strings.ReplaceAll(filepath.Join(dir, "base.vhd"), "/", `\`)))
			setLocatorData(t, child, platformW2ru, utf16le(`.\other.vhd`))
			return child, filepath.Join(dir, "base.vhd"), m
		}},
		{"only the parent name, a full Windows path", "name", func(t *testing.T, root string) (string, string, []byte) {
			dir := filepath.Join(root, "vm")
			child := filepath.Join(dir, "child.vhd")
			m := makePair(t, filepath.Join(dir, "base.vhd"), child)
			dropLocator(t, child, platformW2ru)
			dropLocator(t, child, platformMacX)
			patchParentName(t, child, `C:\Users\someone\Documents\base.vhd`)
			return child, filepath.Join(dir, "base.vhd"), m
		}},
		{"only the parent name, a bare file name", "name", func(t *testing.T, root string) (string, string, []byte) {
			dir := filepath.Join(root, "vm")
			child := filepath.Join(dir, "child.vhd")
			m := makePair(t, filepath.Join(dir, "base.vhd"), child)
			dropLocator(t, child, platformW2ru)
			dropLocator(t, child, platformMacX)
			patchParentName(t, child, "base.vhd")
			dir = moveDir(t, dir)
			return filepath.Join(dir, "child.vhd"), filepath.Join(dir, "base.vhd"), m
		}},
		{"only MacX", "MacX", func(t *testing.T, root string) (string, string, []byte) {
			dir := filepath.Join(root, "vm")
			child := filepath.Join(dir, "child.vhd")
			m := makePair(t, filepath.Join(dir, "base.vhd"), child)
			setLocatorData(t, child, platformMacX, []byte("file://./base.vhd"))
			dropLocator(t, child, platformW2ru)
			patchParentName(t, child, "")
			return child, filepath.Join(dir, "base.vhd"), m
		}},
		{"data space in sectors", "W2ru", func(t *testing.T, root string) (string, string, []byte) {
			dir := filepath.Join(root, "vm")
			child := filepath.Join(dir, "child.vhd")
			m := makePair(t, filepath.Join(dir, "base.vhd"), child)
			l := readLayout(t, child)
			for i, loc := range l.Locators {
				if loc.Code != 0 {
					if loc.Space%512 != 0 {
						t.Fatalf("locator %d data space %d is not in bytes", i, loc.Space)
					}
					loc.Space /= 512
					patchLocator(t, child, i, loc)
				}
			}
			return child, filepath.Join(dir, "base.vhd"), m
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			child, parent, model := tc.setup(t, t.TempDir())
			info := vhdfsInfo(t, child)
			if len(info.Layers) != 2 {
				t.Fatalf("info shows %d layers, want 2", len(info.Layers))
			}
			if got := info.Layers[1]; got.FoundBy != tc.foundBy || got.Path != parent {
				t.Errorf("parent found at %s by %q, want %s by %q", got.Path, got.FoundBy, parent, tc.foundBy)
			}
			assertFileEquals(t, exportImage(t, child), model)
			if stdout, stderr, code := vhdfs(t, "check", child); code != 0 {
				t.Errorf("check: exit %d\nstdout: %s\nstderr: %s", code, stdout, stderr)
			}
		})
	}
}

// TestParentNamedOnce: when the parent is missing or has another unique ID, the error
// names each file once, however many locators lead to it (a relative W2ru path and
// the absolute W2ku one, or a path through a symbolic link to the directory).
func TestParentNamedOnce(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		replace bool   // put an unrelated image where the parent was
		via     string // how the child is named: "relative" or "link"
		want    string
	}{
		{"missing, child named by a relative path", false, "relative", "not found"},
		{"mismatch, child named by a relative path", true, "relative", "does not match"},
		{"mismatch, child named through a linked directory", true, "link", "does not match"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			base, child := filepath.Join(root, "vm", "base.vhd"), filepath.Join(root, "vm", "child.vhd")
			makePair(t, base, child)
			if err := os.Remove(base); err != nil {
				t.Fatal(err)
			}
			if tc.replace {
				mustVhdfs(t, "create", "--size", "8M", base)
			}
			arg := filepath.Join("vm", "child.vhd")
			if tc.via == "link" {
				if err := os.Symlink(filepath.Join(root, "vm"), filepath.Join(root, "link")); err != nil {
					t.Fatal(err)
				}
				arg = filepath.Join(root, "link", "child.vhd")
			}
			cmd := exec.Command(vhdfsBin, "info", arg)
			cmd.Dir = root
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Run(); err == nil {
				t.Fatal("vhdfs info succeeded")
			}
			assertOneLineError(t, stderr.String(), tc.want)
			if n := strings.Count(stderr.String(), "base.vhd"); n != 1 {
				t.Errorf("stderr names the parent %d times, want once: %s", n, stderr.String())
			}
		})
	}
}
