package merge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/faults"
)

// TestMergePowerLoss cuts every write, fsync, rename, link and unlink of a merge
// after the k-th, for every k until the merge completes, as a power loss would, for
// merges from the top and from=1 into differencing, dynamic and fixed targets. After
// each cut the next writer's Recover leaves a chain that opens, checks clean and
// shows the same data; the top's child still opens; once the chain has its new shape,
// the target's sibling and the images merged away refuse to open.
func TestMergePowerLoss(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		cases := []struct {
			base        image.Type
			from, depth int
		}{
			{image.Dynamic, 0, 1}, // into a differencing image
			{image.Dynamic, 0, 3}, // into the dynamic base
			{image.Dynamic, 1, 1},
			{image.Fixed, 1, 2}, // into the fixed base
		}
		for i, tc := range cases {
			t.Run(fmt.Sprintf("from %d depth %d into %s", tc.from, tc.depth, targetType(tc.base, tc.from+tc.depth)), func(t *testing.T) {
				sp := spec{format: format, base: tc.base, size: 8 * mib, blockSizes: blockSizes(format, 512*kib, 256*kib, 512*kib, 128*kib), writes: 4, seed: uint64(900 + i)}
				f := buildChain(t, sp)
				top := f.paths[0]
				target := f.paths[tc.from+tc.depth]
				child := filepath.Join(f.dir, imageName(format, "child", true))
				sibling := filepath.Join(f.dir, imageName(format, "sibling", true))
				createChild(t, top, child, 0)
				createChild(t, target, sibling, 0)
				pristine := t.TempDir()
				copyDir(t, f.dir, pristine)
				var gone []string // merged away: every merged layer but a merged top, which is replaced
				for k := max(tc.from, 1); k < tc.from+tc.depth; k++ {
					gone = append(gone, f.paths[k])
				}
				newLen := len(f.paths) - tc.depth
				if tc.from == 0 {
					newLen++ // the fresh top
				}
				// A dry run counts the steps: every one is cut but those in the middle of
				// the copy (writes of data the merged layers shadow), of which every 5th.
				copyStart, copyDone := stepsAt(t, f, pristine, tc.from, tc.depth)
				for k := 0; ; k++ {
					if k > 2000 {
						t.Fatal("the merge never completed")
					}
					if k > copyStart+3 && k < copyDone-3 && k%5 != 0 {
						continue
					}
					restoreDir(t, pristine, f.dir)
					c := openChain(t, top, true)
					faults.Arm(k)
					_, err := Merge(context.Background(), c, Options{From: tc.from, Depth: tc.depth})
					c.Close() // with the power still off: nothing more reaches the disk
					faults.Disarm()
					completed := err == nil
					if err != nil && !errors.Is(err, faults.ErrPowerLost) {
						t.Fatalf("k=%d: merge: %v, want the injected power loss", k, err)
					}

					msg, err := Recover(top)
					if err != nil {
						t.Fatalf("k=%d: Recover: %v", k, err)
					}
					if ps := problemsOf(chain.Check(top), image.Warning); len(ps) > 0 {
						t.Fatalf("k=%d: after Recover (%s), check: %v", k, msg, ps)
					}
					c2, err := chain.Open(top, false)
					if err != nil {
						t.Fatalf("k=%d: after Recover (%s), open: %v", k, msg, err)
					}
					n := c2.Len()
					topData := c2.Layers()[0].Image.AllocatedBytes()
					assertSame(t, fmt.Sprintf("k=%d: view after Recover (%s)", k, msg), readView(t, c2), f.model)
					c2.Close()
					assertView(t, fmt.Sprintf("k=%d: the top's child", k), child, f.model)
					// A merge from the top leaves an empty top (the fresh one, with the old
					// top's identity); the old top had data.
					newShape := n == newLen && (tc.from > 0 || topData == 0)
					oldShape := n == len(f.paths) && (tc.from > 0 || topData > 0)
					switch {
					case newShape:
						for _, p := range append([]string{sibling}, gone...) {
							if c, err := chain.Open(p, false); !errors.Is(err, image.ErrParentMismatch) {
								if err == nil {
									c.Close()
								}
								t.Fatalf("k=%d: %s opens after the merge: %v", k, filepath.Base(p), err)
							}
						}
					case oldShape:
						if completed {
							t.Fatalf("k=%d: the merge completed but the chain has its old shape", k)
						}
						// Rolled back: the sibling either refuses (the target took its interim
						// ID before the copy touched it) or sees the target untouched.
						if c, err := chain.Open(sibling, false); err == nil {
							got := readView(t, c)
							c.Close()
							assertSame(t, fmt.Sprintf("k=%d: the sibling of a target not yet touched", k), got, f.viewAt(tc.from+tc.depth))
						} else if !errors.Is(err, image.ErrParentMismatch) {
							t.Fatalf("k=%d: sibling after the rollback: %v", k, err)
						}
					default:
						t.Fatalf("k=%d: chain of %d images, want %d or %d", k, n, len(f.paths), newLen)
					}
					if completed {
						t.Logf("the merge took %d durable steps", k)
						return
					}
				}
			})
		}
	})
}

// stepsAt runs the merge once, uncut, and returns the steps taken by its copy-start
// and copy-done points; the fixture is restored afterwards.
func stepsAt(t *testing.T, f *fixture, pristine string, from, depth int) (int, int) {
	t.Helper()
	c := openChain(t, f.paths[0], true)
	var copyStart, copyDone int
	faults.Arm(1 << 30)
	_, err := Merge(context.Background(), c, Options{From: from, Depth: depth, Hook: func(p string) {
		switch p {
		case "copy-start":
			copyStart = faults.Used()
		case "copy-done":
			copyDone = faults.Used()
		}
	}})
	faults.Disarm()
	c.Close()
	if err != nil {
		t.Fatalf("dry run: %v", err)
	}
	restoreDir(t, pristine, f.dir)
	return copyStart, copyDone
}

func targetType(base image.Type, depth int) string {
	if depth == 3 {
		return base.String()
	}
	return "differencing"
}

func problemsOf(ps []image.Problem, min image.Severity) []image.Problem {
	var out []image.Problem
	for _, p := range ps {
		if p.Severity >= min {
			out = append(out, p)
		}
	}
	return out
}

// copyDir copies the regular files of src into dst.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	es, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if e.Type().IsRegular() {
			copyFileTo(t, filepath.Join(src, e.Name()), filepath.Join(dst, e.Name()))
		}
	}
}

// restoreDir makes dst hold exactly the files of src.
func restoreDir(t *testing.T, src, dst string) {
	t.Helper()
	es, err := os.ReadDir(dst)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if err := os.Remove(filepath.Join(dst, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	copyDir(t, src, dst)
}

func copyFileTo(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
