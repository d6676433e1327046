package merge

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/faults"
)

// TestSnapshotPowerLoss cuts every write, fsync, link, rename and unlink of a
// snapshot (Chain.Snapshot) after the k-th, for every k until it completes, as a
// power loss would. After each cut the next writer leaves a chain that opens from
// the top's path, checks clean and shows the same data, in one of two shapes: as
// before (the snapshot's name does not exist) or done (the top's path holds an empty
// image on the snapshot's name, the old top's file). The top's child made before
// stays valid through whichever holds the old top's file. The next writer is either
// Recover (as a mount, merge or check --repair runs it) or the chain's next
// snapshot, which completes or undoes the journal it finds first.
func TestSnapshotPowerLoss(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, next := range []string{"recover", "snapshot again"} {
			t.Run(next, func(t *testing.T) {
				sp := spec{format: format, base: image.Dynamic, size: 8 * mib, blockSizes: blockSizes(format, 512*kib, 256*kib), writes: 4, seed: 77}
				f := buildChain(t, sp)
				top := f.paths[0]
				snap := filepath.Join(f.dir, imageName(format, "frozen", true))
				again := filepath.Join(f.dir, imageName(format, "again", true))
				child := filepath.Join(f.dir, imageName(format, "child", true))
				createChild(t, top, child, 0)
				pristine := t.TempDir()
				copyDir(t, f.dir, pristine)
				names := func() []string {
					es, err := os.ReadDir(f.dir)
					if err != nil {
						t.Fatal(err)
					}
					var out []string
					for _, e := range es {
						out = append(out, e.Name())
					}
					return out
				}
				before := names()
				n := len(f.paths)
				shapes := map[string]int{}
				for k := 0; ; k++ {
					if k > 200 {
						t.Fatal("the snapshot never completed")
					}
					restoreDir(t, pristine, f.dir)
					c := openChain(t, top, true)
					faults.Arm(k)
					_, err := c.Snapshot(snap)
					c.Close() // with the power still off: nothing more reaches the disk
					faults.Disarm()
					completed := err == nil
					if err != nil && !errors.Is(err, faults.ErrPowerLost) {
						t.Fatalf("k=%d: snapshot: %v, want the injected power loss", k, err)
					}
					_, serr := os.Lstat(snap)
					journal := chain.JournalPath(top)
					_, jerr := os.Lstat(journal)
					if completed && (serr != nil || jerr == nil) {
						t.Fatalf("k=%d: the snapshot completed, but %s: %v, journal: %v", k, filepath.Base(snap), serr, jerr)
					}

					msg := ""
					extra := 0 // images the next writer adds
					switch next {
					case "recover":
						if msg, err = Recover(top); err != nil {
							t.Fatalf("k=%d: Recover: %v", k, err)
						}
					case "snapshot again":
						c := openChain(t, top, true)
						_, err := c.Snapshot(again)
						c.Close()
						if err != nil {
							t.Fatalf("k=%d: the next snapshot: %v", k, err)
						}
						extra = 1
					}
					what := fmt.Sprintf("k=%d, %s (%s)", k, next, msg)
					if _, err := os.Lstat(journal); !errors.Is(err, os.ErrNotExist) {
						t.Fatalf("%s: the journal stays: %v", what, err)
					}
					if ps := problemsOf(chain.Check(top), image.Warning); len(ps) > 0 {
						t.Fatalf("%s: check: %v", what, ps)
					}
					c2, err := chain.Open(top, false)
					if err != nil {
						t.Fatalf("%s: open: %v", what, err)
					}
					got, paths := readView(t, c2), layerPaths(c2)
					topData := c2.Layers()[0].Image.AllocatedBytes()
					c2.Close()
					assertSame(t, what+": the view", got, f.model)
					if _, err := os.Lstat(snap); err == nil {
						shapes["done"]++
						// Done: the top's path is a fresh, empty image on the old top's
						// file, now at snap, whose view is the model and whose child
						// opens through it.
						want := append([]string{top, snap}, f.paths[1:]...)
						if extra == 1 {
							want = slices.Insert(want, 1, again)
						}
						if !slices.Equal(paths, want) || topData != 0 {
							t.Fatalf("%s: a done snapshot's chain %v (top data %d), want %v", what, paths, topData, want)
						}
						assertView(t, what+": the frozen image alone", snap, f.model)
						cc, err := chain.OpenWith(child, chain.OpenOptions{Parents: []string{snap}})
						if err != nil {
							t.Fatalf("%s: the old top's child through %s: %v", what, filepath.Base(snap), err)
						}
						assertSame(t, what+": the old top's child", readView(t, cc), f.model)
						cc.Close()
					} else {
						shapes["as before"]++
						if completed {
							t.Fatalf("%s: the snapshot completed but %s is gone", what, filepath.Base(snap))
						}
						if len(paths) != n+extra || paths[0] != top {
							t.Fatalf("%s: a rolled-back chain %v, want %d images", what, paths, n+extra)
						}
						if extra == 0 {
							assertView(t, what+": the top's child", child, f.model)
						}
					}
					// Nothing else is left in the directory: no hidden fresh image, no
					// journal, no second name of the top.
					left := slices.DeleteFunc(names(), func(s string) bool {
						return slices.Contains(before, s) || s == filepath.Base(snap) || s == filepath.Base(again)
					})
					if len(left) > 0 {
						t.Fatalf("%s: left in the directory: %v", what, left)
					}
					if completed {
						t.Logf("the snapshot took %d durable steps; cuts left the chain %v", k, shapes)
						if shapes["done"] < 2 || shapes["as before"] < 5 {
							t.Errorf("the cuts left too few chains of each shape: %v", shapes)
						}
						return
					}
				}
			})
		}
	})
}

// TestSnapshotWriteMeanwhile: a write that reaches the top after the snapshot made its
// fresh top but before the swap (a VHDX top takes a new ID at its first write) is in
// the frozen image, and the fresh top records the ID the top has at the swap: the
// chain opens again from the top's path, and the frozen image alone shows the write.
func TestSnapshotWriteMeanwhile(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := filepath.Join(dir, imageName(format, "base", false))
		top := filepath.Join(dir, imageName(format, "top", true))
		snap := filepath.Join(dir, imageName(format, "frozen", true))
		createBase(t, format, base, image.Dynamic, 8*mib, blockSizes(format, 512*kib)[0])
		createChild(t, base, top, 0)
		c := openChain(t, top, true)
		idBefore := c.Layers()[0].Image.ID()
		data := []byte("written while the snapshot was being made")
		model := make([]byte, 8*mib)
		copy(model[3*mib:], data)
		hooked := false
		_, err := c.SnapshotWith(snap, func(point string) {
			if point == "snapshot-made" {
				hooked = true
				if _, err := c.WriteAt(data, 3*mib); err != nil {
					t.Errorf("write meanwhile: %v", err)
				}
			}
		})
		if err != nil || !hooked {
			t.Fatalf("snapshot: %v (hook called: %v)", err, hooked)
		}
		frozenID := c.Layers()[1].Image.ID()
		if c.Layers()[0].Image.ParentID() != frozenID {
			t.Errorf("the live top records parent ID %v, the frozen image has %v", c.Layers()[0].Image.ParentID(), frozenID)
		}
		t.Logf("the top's ID before the write %v, at the swap %v", idBefore, frozenID)
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		assertView(t, "the top opened again", top, model)
		assertView(t, "the frozen image alone", snap, model)
		assertClean(t, top)
	})
}
