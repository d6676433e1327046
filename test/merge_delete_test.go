package test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// dirNames lists the names in dir, sorted.
func dirNames(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func baseNames(paths ...string) []string {
	var names []string
	for _, p := range paths {
		names = append(names, filepath.Base(p))
	}
	slices.Sort(names)
	return names
}

// TestMergeDelete: `vhdfs merge --depth 2 --delete` of base <- snap1 <- snap2 <- top,
// offline and through a read-write mount's control file, removes exactly the image the
// merge left invalid (snap2: the old top's data goes into the fresh top's parent
// snap1, and the fresh top keeps the top's name); the directory then holds base, snap1
// and top and nothing else, and the chain reads as the test's model, through vhdfs and
// through libvhdi. With a sibling chain made on snap2 beforehand (`vhdfs create
// --parent snap2`), snap2 stays and the output names the sibling; without --delete
// nothing is removed.
func TestMergeDelete(t *testing.T) {
	requireTool(t, "vhdimount")
	forEachFormat(t, func(t *testing.T, format string) {
		for _, mounted := range []bool{false, true} {
			for _, tc := range []struct {
				name           string
				delete, sibl   bool
				wantDeleted    bool
				wantMsgContain func(snap2, sib string) string
			}{
				{"delete", true, false, true, func(snap2, _ string) string { return "deleted the images it left invalid: " + snap2 }},
				{"delete with a sibling", true, true, false, func(snap2, sib string) string {
					return fmt.Sprintf("kept %s: %s records it as its parent", snap2, sib)
				}},
				{"no delete", false, false, false, func(snap2, _ string) string { return "(left on disk, now invalid): " + snap2 }},
			} {
				t.Run(fmt.Sprintf("mounted=%v/%s", mounted, tc.name), func(t *testing.T) {
					c := makeChain(t, chainOptions{Format: format, Depth: 4, Create: []string{"--size", "16M"}, Writes: 20, Seed: 11})
					top, snap1, snap2 := c.Top(), c.Images[1], c.Images[2]
					want := []string{c.Images[0], snap1, top}
					var sib string
					if tc.sibl {
						sib = createChild(t, snap2, "sibling")
						want = append(want, sib)
					}
					if !tc.wantDeleted {
						want = append(want, snap2)
					}
					args := []string{"merge", "--depth", "2"}
					if tc.delete {
						args = append(args, "--delete")
					}
					var mnt string
					if mounted {
						mnt = mountEnv(t, top, nil)
					}
					out, errs, code := vhdfs(t, append(args, top)...)
					if code != 0 {
						t.Fatalf("vhdfs %v: exit %d\nstdout %s\nstderr %s", args, code, out, errs)
					}
					if mounted && !strings.Contains(errs, mnt) {
						t.Errorf("the merge did not go through the mount at %s: %q", mnt, errs)
					}
					if w := tc.wantMsgContain(snap2, sib); !strings.Contains(out, w) {
						t.Errorf("output %q does not say %q", out, w)
					}
					if mounted {
						assertFileEquals(t, filepath.Join(mnt, "disk.raw"), c.Model())
						st := readMergeStatus(t, mnt)
						wantDetached := []string{snap2}
						if tc.wantDeleted {
							wantDetached = nil
						}
						if !slices.Equal(st.Detached, wantDetached) || len(st.Chain) != 3 {
							t.Errorf("status after the merge: detached %v (want %v), chain %+v", st.Detached, wantDetached, st.Chain)
						}
						mustVhdfs(t, "umount", mnt)
					}
					if got, w := dirNames(t, c.Dir), baseNames(want...); !slices.Equal(got, w) {
						t.Errorf("directory after the merge: %v, want %v", got, w)
					}
					assertFileEquals(t, exportImage(t, top), c.Model())
					// libvhdi reads a VHDX's fresh top wrongly (see TestMergeDepths): it reads
					// the target there, whose view is the same.
					libvhdiImage := top
					if format == "vhdx" {
						libvhdiImage = snap1
					}
					assertFileEquals(t, vhdimountView(t, libvhdiImage), c.Model())
					if out, errs, code := vhdfs(t, "check", top); code != 0 {
						t.Errorf("check after the merge: exit %d\n%s%s", code, out, errs)
					}
				})
			}
		}
	})
}

// TestMergeDeleteControl: `merge from=1 depth=2 delete` written to the control file
// merges snap2 and snap1 into the base while the top stays; a sibling made on snap2
// keeps snap2 and, below it, snap1 (snap2 records it as its parent), each named with
// why. Without a sibling both go. A repeated or unknown word is EINVAL and changes
// nothing.
func TestMergeDeleteControl(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, sibl := range []bool{false, true} {
			t.Run(fmt.Sprintf("sibling=%v", sibl), func(t *testing.T) {
				c := makeChain(t, chainOptions{Format: format, Depth: 4, Create: []string{"--size", "16M"}, Writes: 20, Seed: 5})
				base, snap1, snap2, top := c.Images[0], c.Images[1], c.Images[2], c.Top()
				want := []string{base, top}
				var sib string
				if sibl {
					sib = createChild(t, snap2, "sibling")
					want = append(want, sib, snap1, snap2)
				}
				mnt := mountEnv(t, top, nil)
				for _, bad := range []string{"merge from=1 depth=2 delete delete", "merge from=1 depth=2 remove"} {
					if e := control(mnt, bad); e != syscall.EINVAL {
						t.Errorf("%q: errno %v, want EINVAL", bad, e)
					}
				}
				if st := readMergeStatus(t, mnt); len(st.Chain) != 4 {
					t.Fatalf("a refused merge changed the chain: %+v", st.Chain)
				}
				if e := control(mnt, "merge from=1 depth=2 delete"); e != 0 {
					t.Fatalf("merge from=1 depth=2 delete: %v: %+v", e, readMergeStatus(t, mnt).Last)
				}
				st := readMergeStatus(t, mnt)
				if st.Last == nil {
					t.Fatal("no result in the status")
				}
				msg := st.Last.Message
				if sibl {
					for _, w := range []string{
						fmt.Sprintf("kept %s: %s records it as its parent", snap2, sib),
						fmt.Sprintf("kept %s: %s records it as its parent", snap1, snap2),
					} {
						if !strings.Contains(msg, w) {
							t.Errorf("result %q does not say %q", msg, w)
						}
					}
					if !slices.Equal(st.Detached, []string{snap2, snap1}) {
						t.Errorf("detached %v, want %v", st.Detached, []string{snap2, snap1})
					}
				} else if w := "deleted the images it left invalid: " + snap2 + ", " + snap1; !strings.Contains(msg, w) || len(st.Detached) != 0 {
					t.Errorf("result %q (detached %v), want it to say %q", msg, st.Detached, w)
				}
				assertFileEquals(t, filepath.Join(mnt, "disk.raw"), c.Model())
				mustVhdfs(t, "umount", mnt)
				if got, w := dirNames(t, c.Dir), baseNames(want...); !slices.Equal(got, w) {
					t.Errorf("directory after the merge: %v, want %v", got, w)
				}
				assertFileEquals(t, exportImage(t, top), c.Model())
			})
		}
	})
}

// TestMergeDeleteUnreadable: an image in the directory that a format's signature
// marks but that does not open (a truncated copy) may record a merged-away image as
// its parent: `merge --delete` keeps them and says so. A file no format claims (a
// text file) is no image and keeps nothing.
func TestMergeDeleteUnreadable(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, damaged := range []bool{false, true} {
			t.Run(fmt.Sprintf("damaged=%v", damaged), func(t *testing.T) {
				c := makeChain(t, chainOptions{Format: format, Depth: 4, Create: []string{"--size", "16M"}, Writes: 10, Seed: 3})
				top, snap2 := c.Top(), c.Images[2]
				if err := os.WriteFile(filepath.Join(c.Dir, "notes.txt"), []byte("not an image\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				want := []string{c.Images[0], c.Images[1], top, "notes.txt"}
				bad := filepath.Join(c.Dir, "truncated"+filepath.Ext(snap2))
				if damaged {
					// The first KiB of an image: its signature, and not the rest.
					if err := os.WriteFile(bad, fileBytes(t, snap2)[:1024], 0o644); err != nil {
						t.Fatal(err)
					}
					want = append(want, bad, snap2)
				}
				out, errs, code := vhdfs(t, "merge", "--depth", "2", "--delete", top)
				if code != 0 {
					t.Fatalf("merge --delete: exit %d\n%s%s", code, out, errs)
				}
				w := "deleted the images it left invalid: " + snap2
				if damaged {
					w = fmt.Sprintf("kept %s: %s cannot be read, so it may record it as its parent", snap2, bad)
				}
				if !strings.Contains(out, w) {
					t.Errorf("output %q does not say %q", out, w)
				}
				if got, w := dirNames(t, c.Dir), baseNames(want...); !slices.Equal(got, w) {
					t.Errorf("directory after the merge: %v, want %v", got, w)
				}
				assertFileEquals(t, exportImage(t, top), c.Model())
			})
		}
	})
}

// TestMergeDeleteTwoDirectories: base <- snap1 in directory A, snap2 <- top in
// directory B; `merge --from 1 --depth 2 --delete` takes snap2 and snap1 out. A
// sibling made on snap2 but living in A (its locator leads to B) keeps snap2 and,
// below it, snap1, though it is not in snap2's directory; so does an image in A that
// cannot be read (a truncated copy), which may be such a child. Without either, both go.
func TestMergeDeleteTwoDirectories(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, other := range []string{"none", "sibling", "unreadable"} {
			t.Run(other, func(t *testing.T) {
				c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "16M"}, Writes: 10, Seed: 9})
				dirA, dirB := c.Dir, t.TempDir()
				base, snap1 := c.Images[0], c.Images[1]
				snap2 := filepath.Join(dirB, imageName(format, "snap2", true))
				mustVhdfs(t, append([]string{"create", "--parent", snap1}, childFormatArgs(format, snap2)...)...)
				top := createChild(t, snap2, "top")
				wantA, wantB := []string{base}, []string{top}
				var msgs []string
				switch other {
				case "none":
					msgs = []string{"deleted the images it left invalid: " + snap2 + ", " + snap1}
				case "sibling":
					sib := filepath.Join(dirA, imageName(format, "sibling", true))
					mustVhdfs(t, append([]string{"create", "--parent", snap2}, childFormatArgs(format, sib)...)...)
					wantA = append(wantA, sib)
					msgs = []string{fmt.Sprintf("kept %s: %s records it as its parent", snap2, sib)}
				case "unreadable":
					bad := filepath.Join(dirA, "truncated"+filepath.Ext(snap2))
					if err := os.WriteFile(bad, fileBytes(t, snap2)[:1024], 0o644); err != nil {
						t.Fatal(err)
					}
					wantA = append(wantA, bad)
					msgs = []string{fmt.Sprintf("kept %s: %s cannot be read, so it may record it as its parent", snap2, bad)}
				}
				if other != "none" {
					wantA, wantB = append(wantA, snap1), append(wantB, snap2)
					msgs = append(msgs, fmt.Sprintf("kept %s: ", snap1))
				}
				out, errs, code := vhdfs(t, "merge", "--from", "1", "--depth", "2", "--delete", top)
				if code != 0 {
					t.Fatalf("merge --delete: exit %d\n%s%s", code, out, errs)
				}
				for _, w := range msgs {
					if !strings.Contains(out, w) {
						t.Errorf("output %q does not say %q", out, w)
					}
				}
				if got, w := dirNames(t, dirA), baseNames(wantA...); !slices.Equal(got, w) {
					t.Errorf("directory A after the merge: %v, want %v", got, w)
				}
				if got, w := dirNames(t, dirB), baseNames(wantB...); !slices.Equal(got, w) {
					t.Errorf("directory B after the merge: %v, want %v", got, w)
				}
				assertFileEquals(t, exportImage(t, top), c.Model())
			})
		}
	})
}
