package chain

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vhdfs/vhdfs/vhd"
)

// TestOpenParentsByHand: OpenOptions.Parents names parents top down, looked for at
// the given path only and still checked by unique ID; levels below the last one
// named use their locators. Every case starts from a <- b <- c in one directory;
// move renames files and returns the parents to give.
func TestOpenParentsByHand(t *testing.T) {
	tests := []struct {
		name        string
		move        func(t *testing.T, dir, a, b string) []string
		wantFoundBy []string
		wantErr     error
		wantTried   func(dir, a, b string) []string
	}{
		{
			name: "both parents moved and renamed, both given",
			move: func(t *testing.T, dir, a, b string) []string {
				na, nb := filepath.Join(dir, "x", "a2.vhd"), filepath.Join(dir, "x", "b2.vhd")
				mustRename(t, a, na)
				mustRename(t, b, nb)
				return []string{nb, na}
			},
			wantFoundBy: []string{"", GivenBy, GivenBy},
		},
		{
			name: "the first given, the next through its locators",
			move: func(t *testing.T, dir, a, b string) []string {
				nb := filepath.Join(dir, "b-renamed.vhd")
				mustRename(t, b, nb)
				return []string{nb}
			},
			wantFoundBy: []string{"", GivenBy, "W2ru"},
		},
		{
			name: "a parent in place is still given by hand",
			move: func(t *testing.T, dir, a, b string) []string {
				return []string{b}
			},
			wantFoundBy: []string{"", GivenBy, "W2ru"},
		},
		{
			name: "the grandparent given as the parent: unique ID mismatch",
			move: func(t *testing.T, dir, a, b string) []string {
				return []string{a}
			},
			wantErr:   vhd.ErrParentMismatch,
			wantTried: func(dir, a, b string) []string { return []string{a} },
		},
		{
			name: "a missing path given: the locators are not tried",
			move: func(t *testing.T, dir, a, b string) []string {
				return []string{filepath.Join(dir, "nowhere.vhd")}
			},
			wantErr:   vhd.ErrParentMissing,
			wantTried: func(dir, a, b string) []string { return []string{filepath.Join(dir, "nowhere.vhd")} },
		},
		{
			name: "more parents given than the chain has",
			move: func(t *testing.T, dir, a, b string) []string {
				return []string{b, a, a}
			},
			wantErr: ErrTooManyParents,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.Mkdir(filepath.Join(dir, "x"), 0o755); err != nil {
				t.Fatal(err)
			}
			a := createBase(t, dir, "a.vhd", vhd.TypeDynamic, 64*kib, 4*kib)
			b := createChild(t, dir, "b.vhd", a, 4*kib)
			c := createChild(t, dir, "c.vhd", b, 4*kib)
			parents := tc.move(t, dir, a, b)

			ch, err := OpenWith(c, OpenOptions{Parents: parents})
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("OpenWith: %v, want %v", err, tc.wantErr)
				}
				var pe *ParentError
				if tc.wantTried != nil && (!errors.As(err, &pe) || !slices.Equal(pe.Tried, tc.wantTried(dir, a, b))) {
					t.Errorf("OpenWith: %v: tried %v, want %v", err, pe, tc.wantTried(dir, a, b))
				}
				if probs := CheckWith(c, OpenOptions{Parents: parents}); !slices.ContainsFunc(probs, func(p vhd.Problem) bool { return p.Severity == vhd.Error }) {
					t.Errorf("CheckWith found no error: %v", probs)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer closeChain(t, ch)
			var found []string
			for _, l := range ch.Layers() {
				found = append(found, l.FoundBy)
			}
			if !slices.Equal(found, tc.wantFoundBy) {
				t.Errorf("found by %q, want %q", found, tc.wantFoundBy)
			}
			if probs := CheckWith(c, OpenOptions{Parents: parents}); slices.ContainsFunc(probs, func(p vhd.Problem) bool { return p.Severity == vhd.Error }) {
				t.Errorf("CheckWith: %v", probs)
			}
		})
	}
}

// TestInspectMissingParent: Inspect describes the layers it opened and names the
// missing parent and the paths tried.
func TestInspectMissingParent(t *testing.T) {
	dir := t.TempDir()
	a := createBase(t, dir, "a.vhd", vhd.TypeDynamic, 64*kib, 4*kib)
	b := createChild(t, dir, "b.vhd", a, 4*kib)
	c := createChild(t, dir, "c.vhd", b, 4*kib)
	mustRename(t, a, filepath.Join(dir, "gone.vhd"))
	info, err := Inspect(c, OpenOptions{})
	if !errors.Is(err, vhd.ErrParentMissing) {
		t.Fatalf("Inspect: %v, want %v", err, vhd.ErrParentMissing)
	}
	if len(info.Layers) != 2 || info.Layers[1].Path != b || info.Error == "" {
		t.Fatalf("Inspect: %+v", info)
	}
	mp := info.MissingParent
	if mp == nil || mp.Child != b || mp.UniqueID != info.Layers[1].ParentUniqueID || len(mp.Tried) == 0 || mp.Tried[0] != a {
		t.Errorf("missing parent %+v", mp)
	}
}

func mustRename(t *testing.T, from, to string) {
	t.Helper()
	if err := os.Rename(from, to); err != nil {
		t.Fatal(err)
	}
}
