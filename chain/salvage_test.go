package chain

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/vhd"
)

// TestSalvageOrphan: a child whose parent is missing, or has another ID, fails a
// strict open; a salvage open reads the child's own sectors and zeros where the
// parent would be, says so in one note, and refuses to be writable.
func TestSalvageOrphan(t *testing.T) {
	for _, tc := range []struct {
		name   string
		orphan func(t *testing.T, base string)
		strict error
	}{
		{"parent missing", func(t *testing.T, base string) {
			if err := os.Rename(base, base+".gone"); err != nil {
				t.Fatal(err)
			}
		}, image.ErrParentMissing},
		{"parent ID mismatched", func(t *testing.T, base string) {
			if err := os.Remove(base); err != nil {
				t.Fatal(err)
			}
			createBase(t, filepath.Dir(base), filepath.Base(base), vhd.TypeDynamic, 4<<20, 0)
		}, image.ErrParentMismatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, 4<<20, 0)
			child := createChild(t, dir, "child.vhd", base, 0)
			c := openChain(t, base, true)
			if _, err := c.WriteAt(bytes.Repeat([]byte{0xaa}, 4<<20), 0); err != nil {
				t.Fatal(err)
			}
			closeChain(t, c)
			c = openChain(t, child, true)
			own := bytes.Repeat([]byte{0x55}, 4096)
			if _, err := c.WriteAt(own, 8192); err != nil {
				t.Fatal(err)
			}
			closeChain(t, c)
			tc.orphan(t, base)

			if c, err := OpenWith(child, OpenOptions{}); !errors.Is(err, tc.strict) {
				if err == nil {
					c.Close()
				}
				t.Fatalf("strict open: %v, want %v", err, tc.strict)
			}
			if _, err := OpenWith(child, OpenOptions{Salvage: true, Writable: true}); !errors.Is(err, image.ErrInvalidArg) {
				t.Fatalf("writable salvage open: %v, want ErrInvalidArg", err)
			}
			c, err := OpenWith(child, OpenOptions{Salvage: true})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			want := make([]byte, c.Size())
			copy(want[8192:], own)
			got := make([]byte, c.Size())
			if _, err := c.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("the orphan does not read its own sectors over zeros")
			}
			if n := c.Notes(); len(n) != 1 || !strings.HasPrefix(n[0], child+": ") || !strings.Contains(n[0], "zeros where the parent would be") {
				t.Fatalf("notes %q, want one about the missing parent", n)
			}
		})
	}
}
