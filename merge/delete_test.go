package merge

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

// TestMergeDeleteFailedRemovalKeepsParent: merge from=1 depth=2 Delete of
// base <- snap1 <- snap2 <- snap3 takes snap2 and snap1 out. When snap2 cannot be
// removed (its name is replaced by another file after the merge took it out: a text
// file, which records no parent itself), snap1, which snap2 records as its parent,
// stays too, and the result says why of both.
func TestMergeDeleteFailedRemovalKeepsParent(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		f := buildChain(t, chainSpec(format, image.Dynamic, 77))
		snap2, snap1 := f.paths[1], f.paths[2]
		c := openChain(t, f.paths[0], true)
		defer c.Close()
		res, err := Merge(context.Background(), c, Options{From: 1, Depth: 2, Delete: true, Hook: func(p string) {
			if p != "relink-after" {
				return
			}
			// Another file at snap2's name, renamed over it.
			tmp := snap2 + ".copy"
			if err := os.WriteFile(tmp, []byte("not an image\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, snap2); err != nil {
				t.Fatal(err)
			}
		}})
		if err != nil {
			t.Fatalf("merge: %v", err)
		}
		if len(res.Deleted) != 0 || !slices.Equal(res.Detached, []string{snap2, snap1}) {
			t.Errorf("deleted %v, detached %v; want none deleted, %v detached", res.Deleted, res.Detached, []string{snap2, snap1})
		}
		msg := res.Message()
		for _, w := range []string{
			fmt.Sprintf("kept %s: it is no longer the file the merge took out of the chain", snap2),
			fmt.Sprintf("kept %s: %s records it as its parent", snap1, snap2),
		} {
			if !strings.Contains(msg, w) {
				t.Errorf("result %q does not say %q", msg, w)
			}
		}
		for _, p := range []string{snap2, snap1} {
			if _, err := os.Stat(p); err != nil {
				t.Errorf("%s: %v", p, err)
			}
		}
	})
}
