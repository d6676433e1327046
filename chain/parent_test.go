package chain

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdfs/vhdfs/vhd"
)

func winPath(p string) string { return strings.ReplaceAll(p, "/", `\`) }

// TestFindParent resolves parents through each locator in turn. Every case starts
// from dir/p.vhd (dynamic) and dir/c.vhd (its child, as Create writes it); setup
// changes them and returns the child to open and the parent it must find.
func TestFindParent(t *testing.T) {
	const size = 64 * kib
	tests := []struct {
		name        string
		setup       func(t *testing.T, dir, parent, child string) (openPath, wantParent string)
		wantFoundBy string
		wantErr     error
	}{
		{
			name: "W2ru is preferred over W2ku and the name",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				other := filepath.Join(dir, "other")
				if err := os.Mkdir(other, 0o755); err != nil {
					t.Fatal(err)
				}
				writeFile(t, filepath.Join(other, "p.vhd"), readFile(t, parent)) // the same unique ID
				setLocators(t, child, `C:\elsewhere\other\p.vhd`, []locator{
					{vhd.PlatformW2ku, utf16LE(winPath(filepath.Join(other, "p.vhd")))},
					{vhd.PlatformW2ru, utf16LE(`.\p.vhd`)},
				})
				return child, parent
			},
			wantFoundBy: "W2ru",
		},
		{
			name: "W2ru relative to the child's directory, up one level",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				kids := filepath.Join(dir, "kids")
				if err := os.Mkdir(kids, 0o755); err != nil {
					t.Fatal(err)
				}
				return createChild(t, kids, "c.vhd", parent, 0), parent
			},
			wantFoundBy: "W2ru",
		},
		{
			name: "W2ru into a subdirectory",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				sub := filepath.Join(dir, "sub")
				if err := os.Mkdir(sub, 0o755); err != nil {
					t.Fatal(err)
				}
				moved := filepath.Join(sub, "p.vhd")
				if err := os.Rename(parent, moved); err != nil {
					t.Fatal(err)
				}
				setLocators(t, child, "gone.vhd", []locator{{vhd.PlatformW2ru, utf16LE(`.\sub\p.vhd`)}})
				return child, moved
			},
			wantFoundBy: "W2ru",
		},
		{
			name: "W2ru missing, W2ku absolute",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				other := filepath.Join(dir, "other")
				if err := os.Mkdir(other, 0o755); err != nil {
					t.Fatal(err)
				}
				moved := filepath.Join(other, "moved.vhd")
				if err := os.Rename(parent, moved); err != nil {
					t.Fatal(err)
				}
				setLocators(t, child, "gone2.vhd", []locator{
					{vhd.PlatformW2ru, utf16LE(`.\gone.vhd`)},
					{vhd.PlatformW2ku, utf16LE(winPath(moved))},
				})
				return child, moved
			},
			wantFoundBy: "W2ku",
		},
		{
			name: "W2ru missing, W2ku's file name beside the moved child",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				// Create wrote W2ku with the absolute path; move the directory away.
				setLocators(t, child, "gone2.vhd", []locator{
					{vhd.PlatformW2ku, utf16LE(winPath(parent))},
					{vhd.PlatformW2ru, utf16LE(`.\gone.vhd`)},
				})
				moved := dir + ".moved"
				if err := os.Rename(dir, moved); err != nil {
					t.Fatal(err)
				}
				return filepath.Join(moved, "c.vhd"), filepath.Join(moved, "p.vhd")
			},
			wantFoundBy: "W2ku",
		},
		{
			name: "W2ku with a drive letter: its file name beside the child",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				setLocators(t, child, "gone2.vhd", []locator{{vhd.PlatformW2ku, utf16LE(`C:\Users\someone\VMs\p.vhd`)}})
				return child, parent
			},
			wantFoundBy: "W2ku",
		},
		{
			name: "MacX",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				setLocators(t, child, "gone2.vhd", []locator{{vhd.PlatformMacX, []byte("file://./p.vhd")}})
				return child, parent
			},
			wantFoundBy: "MacX",
		},
		{
			name: "only the parent name, a full Windows path",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				setLocators(t, child, `C:\Users\someone\Downloads\p.vhd`, nil)
				return child, parent
			},
			wantFoundBy: "name",
		},
		{
			name: "wrong unique ID behind W2ru, the right parent through W2ku",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				createBase(t, dir, "decoy.vhd", vhd.TypeDynamic, size, 4*kib)
				setLocators(t, child, "gone2.vhd", []locator{
					{vhd.PlatformW2ru, utf16LE(`.\decoy.vhd`)},
					{vhd.PlatformW2ku, utf16LE(`C:\x\p.vhd`)},
				})
				return child, parent
			},
			wantFoundBy: "W2ku",
		},
		{
			name: "parent replaced by another image: unique ID mismatch",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				if err := os.Remove(parent); err != nil {
					t.Fatal(err)
				}
				createBase(t, dir, "p.vhd", vhd.TypeDynamic, size, 4*kib)
				return child, ""
			},
			wantErr: vhd.ErrParentMismatch,
		},
		{
			name: "parent missing",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				if err := os.Remove(parent); err != nil {
					t.Fatal(err)
				}
				return child, ""
			},
			wantErr: vhd.ErrParentMissing,
		},
		{
			name: "no locator and no name",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				setLocators(t, child, "", nil)
				return child, ""
			},
			wantErr: vhd.ErrParentMissing,
		},
		{
			name: "parent is not a VHD",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				writeFile(t, parent, make([]byte, 4096))
				return child, ""
			},
			wantErr: vhd.ErrNotVHD,
		},
		{
			name: "parent with a bad header checksum",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				patchAt(t, parent, vhd.FooterSize+900, []byte{1})
				return child, ""
			},
			wantErr: vhd.ErrChecksum,
		},
		{
			name: "two images that are each other's parent",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				b := createChild(t, dir, "b.vhd", child, 0)
				reparent(t, child, b)
				return child, ""
			},
			wantErr: ErrCycle,
		},
		{
			name: "an image that is its own parent",
			setup: func(t *testing.T, dir, parent, child string) (string, string) {
				reparent(t, child, child)
				return child, ""
			},
			wantErr: ErrCycle,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "d")
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			parent := createBase(t, dir, "p.vhd", vhd.TypeDynamic, size, 4*kib)
			child := createChild(t, dir, "c.vhd", parent, 0)
			openPath, wantParent := tc.setup(t, dir, parent, child)

			c, err := Open(openPath, false)
			if tc.wantErr != nil {
				if err == nil {
					c.Close()
					t.Fatalf("Open succeeded, want %v", tc.wantErr)
				}
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Open: %v, want %v", err, tc.wantErr)
				}
				if !strings.Contains(err.Error(), openPath) {
					t.Errorf("error %q does not name the child", err)
				}
				if ps := atLeast(Check(openPath), vhd.Error); len(ps) == 0 {
					t.Errorf("Check reports no error")
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer c.Close()
			layers := c.Layers()
			if len(layers) != 2 {
				t.Fatalf("chain has %d layers, want 2", len(layers))
			}
			if got := layers[1]; got.Path != wantParent || got.FoundBy != tc.wantFoundBy {
				t.Errorf("parent %s found by %q, want %s by %q", got.Path, got.FoundBy, wantParent, tc.wantFoundBy)
			}
			if ps := atLeast(Check(openPath), vhd.Error); len(ps) > 0 {
				t.Errorf("Check: %v", ps)
			}
		})
	}
}

// TestMaxDepth: a chain of MaxDepth images opens, one more is too deep.
func TestMaxDepth(t *testing.T) {
	dir := t.TempDir()
	start := time.Now()
	paths := []string{createBase(t, dir, "l0.vhd", vhd.TypeDynamic, 4*kib, 4*kib)}
	for i := 1; i <= MaxDepth; i++ {
		paths = append(paths, createChild(t, dir, fmt.Sprintf("l%d.vhd", i), paths[i-1], 0))
	}
	t.Logf("created %d images in %v", len(paths), time.Since(start))
	c := openChain(t, paths[MaxDepth-1], false)
	if c.Len() != MaxDepth {
		t.Fatalf("chain has %d layers, want %d", c.Len(), MaxDepth)
	}
	closeChain(t, c)
	if c, err := Open(paths[MaxDepth], false); !errors.Is(err, ErrTooDeep) {
		if err == nil {
			c.Close()
		}
		t.Fatalf("Open of %d images: %v, want ErrTooDeep", MaxDepth+1, err)
	}
	if ps := atLeast(Check(paths[MaxDepth]), vhd.Error); len(ps) != 1 || !strings.Contains(ps[0].Message, "more than") {
		t.Errorf("Check = %v, want one error about the depth", ps)
	}
}

// TestCheckChain checks a good chain with differing block sizes and a time stamp that
// no longer matches the parent (reported, not enforced).
func TestCheckChain(t *testing.T) {
	dir := t.TempDir()
	base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, 128*kib, 64*kib)
	top := createChild(t, dir, "top.vhd", base, 4*kib)
	old := time.Now().Add(-48 * time.Hour)
	if err := os.Chtimes(base, old, old); err != nil {
		t.Fatal(err)
	}
	ps := Check(top)
	if len(atLeast(ps, vhd.Warning)) > 0 {
		t.Errorf("Check: %v", ps)
	}
	var stamp, block bool
	for _, p := range ps {
		stamp = stamp || p.File == top && strings.Contains(p.Message, "time stamp")
		block = block || p.File == top && strings.Contains(p.Message, "block size")
	}
	// vhdfs writes parent time stamp 0, as Windows does: nothing to compare.
	if stamp || !block {
		t.Errorf("Check = %v; want a note on the block size and none on the parent time stamp", ps)
	}
	// A child smaller than its parent is legal but odd.
	small := createSizedChild(t, dir, "small.vhd", base, 64*kib, 4*kib)
	found := false
	for _, p := range Check(small) {
		found = found || p.Severity == vhd.Warning && strings.Contains(p.Message, "smaller than its parent")
	}
	if !found {
		t.Errorf("Check of a child smaller than its parent has no warning")
	}
}
