package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

// relinkCase is a differencing image to point at a new parent.
type relinkCase struct {
	name                  string
	child                 string // the image's path
	parentID              image.ID
	parentPath, childPath string
	want                  map[string]string // the new locator
	moves                 bool              // the item does not fit where it is
	parentData            bool              // the new parent exists, for vhdimount
}

// relinkCases makes the images: one Create made, with data, re-pointed at a real
// second parent beside it (in place: Create puts the locator last); and a
// builder-made one whose locator (Windows's five keys) is followed by another
// item, re-pointed at a long path, so that the item moves.
func relinkCases(t *testing.T) []relinkCase {
	t.Helper()
	dir := t.TempDir()
	a, b, c := filepath.Join(dir, "a.vhdx"), filepath.Join(dir, "b.vhdx"), filepath.Join(dir, "c.avhdx")
	for _, p := range []string{a, b} {
		if err := Create(p, CreateOptions{Type: TypeDynamic, Size: 6 * MiB, BlockSize: MiB}); err != nil {
			t.Fatal(err)
		}
	}
	pb, err := Open(b, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pb.WriteAt(fill(2*MiB, 0xb0), MiB); err != nil {
		t.Fatal(err)
	}
	pb.Close()
	pa, err := Open(a, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := pa.CreateChild(c, image.ChildOptions{}); err != nil {
		t.Fatal(err)
	}
	pa.Close()
	ci, err := Open(c, true)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []write{{0, 8192, 0xc1}, {2*MiB + 4096, 4096, 0xc2}, {4 * MiB, MiB, 0xc3}} {
		if _, err := ci.WriteAt(fill(w.n, w.c), w.off); err != nil {
			t.Fatal(err)
		}
	}
	ci.Close()
	pb, err = Open(b, false)
	if err != nil {
		t.Fatal(err)
	}
	bid, _ := image.ParseID(pb.DataWriteGuid().String())
	pb.Close()

	bl, _ := differencingImage(512)
	bl.extraItems = []MetadataEntry{{ItemID: NewGUID(), Length: 24, Flags: itemIsUser}}
	w := writeFile(t, bl.build())
	long := filepath.Join(dir, strings.Repeat("d", 200), "new parent.vhdx")
	wid := image.NewID()
	return []relinkCase{
		{name: "created", child: c, parentID: bid, parentPath: b, childPath: c, parentData: true,
			want: map[string]string{"parent_linkage": "{" + bid.String() + "}", "relative_path": `.\b.vhdx`, "absolute_win32_path": strings.ReplaceAll(b, "/", `\`)}},
		{name: "moved", child: w, parentID: wid, parentPath: long, childPath: filepath.Join(dir, "sub", "w.avhdx"), moves: true,
			want: map[string]string{"parent_linkage": "{" + wid.String() + "}", "relative_path": `..\` + strings.Repeat("d", 200) + `\new parent.vhdx`,
				"absolute_win32_path": strings.ReplaceAll(long, "/", `\`)}},
	}
}

// locatorTableEntry returns the parent locator's metadata table entry of the file at p, and
// all the entries.
func locatorTableEntry(t *testing.T, p string) (MetadataEntry, []MetadataEntry) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tbl := make([]byte, metadataTableSize)
	if _, err := f.ReadAt(tbl, bMetaOff); err != nil { // Create and the builder both put it at 2 MiB
		t.Fatal(err)
	}
	entries := make([]MetadataEntry, binary.LittleEndian.Uint16(tbl[10:]))
	if _, err := binary.Decode(tbl[metadataHeaderLen:], binary.LittleEndian, entries); err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.ItemID == ItemParentLocator {
			return e, entries
		}
	}
	t.Fatal("no parent locator entry")
	return MetadataEntry{}, nil
}

// TestSetParent points differencing images at new parents and checks, after a
// reopen, the new locator (and nothing of the old: no parent_linkage2, no
// volume_path), the DataWriteGuid and the view unchanged, the item in place or
// moved into free space with the other items intact, an empty log; and that
// vhdimount then finds the new parent. A read-only or non-differencing image is
// refused.
func TestSetParent(t *testing.T) {
	for _, tc := range relinkCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			before, others := locatorTableEntry(t, tc.child)
			img, err := Open(tc.child, true)
			if err != nil {
				t.Fatal(err)
			}
			dwg, fwg := img.DataWriteGuid(), img.FileWriteGuid()
			v := view(t, img)
			if err := img.SetParent(tc.parentID, tc.parentPath, tc.childPath); err != nil {
				t.Fatal(err)
			}
			if got := img.ParentLocator(); fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("in memory: locator %v, want %v", got, tc.want)
			}
			img.Close()
			img, err = Open(tc.child, false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			h := img.Header()
			if got := img.ParentLocator(); fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("locator %v, want %v", got, tc.want)
			}
			if h.DataWriteGuid != dwg || h.FileWriteGuid == fwg || !h.LogGuid.IsZero() || img.LogReplayed() != 0 {
				t.Errorf("DataWriteGuid kept %v, FileWriteGuid changed %v, log %v", h.DataWriteGuid == dwg, h.FileWriteGuid != fwg, h.LogGuid)
			}
			if !bytes.Equal(view(t, img), v) {
				t.Error("the view changed")
			}
			after, entries := locatorTableEntry(t, tc.child)
			if moved := after.Offset != before.Offset; moved != tc.moves {
				t.Errorf("locator item at %d, was at %d: moved %v, want %v", after.Offset, before.Offset, moved, tc.moves)
			}
			for i, e := range entries {
				if e.ItemID != ItemParentLocator && e != others[i] {
					t.Errorf("metadata entry %d changed: %+v, was %+v", i, e, others[i])
				}
				if e.ItemID != ItemParentLocator && e.Length > 0 && overlaps(int64(e.Offset), int64(e.Length), int64(after.Offset), int64(after.Length)) {
					t.Errorf("the new locator at %d+%d overlaps item %d", after.Offset, after.Length, i)
				}
			}
			if tc.parentData {
				model := bytes.Repeat([]byte{0}, int(img.Size()))
				copy(model[MiB:], fill(2*MiB, 0xb0))
				for off := int64(0); off < img.Size(); {
					n, ok, _ := img.Run(off, img.Size()-off)
					if ok {
						copy(model[off:off+n], v[off:off+n])
					}
					off += n
				}
				if got := vhdimount(t, tc.child, img.Size()); got != nil && !bytes.Equal(got, model) {
					t.Error("vhdimount of the re-pointed child differs from the new parent under the child's data")
				}
			}
			if err := img.SetParent(tc.parentID, tc.parentPath, tc.childPath); !errors.Is(err, ErrReadOnly) {
				t.Errorf("SetParent on a read-only image: %v", err)
			}
		})
	}
	p := filepath.Join(t.TempDir(), "d.vhdx")
	if err := Create(p, CreateOptions{Type: TypeDynamic, Size: 4 * MiB}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.SetParent(image.NewID(), "/x.vhdx", p); !errors.Is(err, ErrInvalidArg) {
		t.Errorf("SetParent on a dynamic image: %v", err)
	}
}

// TestSetParentCrash cuts SetParent after every k-th write, fsync or truncate
// (cutFile): every cut file opens, replaying its log, read-only in memory and
// writable into the file, and shows the old locator or the new one, never anything
// else, with the DataWriteGuid and the view unchanged; uncut, the new one.
func TestSetParentCrash(t *testing.T) {
	for _, tc := range relinkCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			img, err := Open(tc.child, false)
			if err != nil {
				t.Fatal(err)
			}
			old, dwg, v := fmt.Sprint(img.ParentLocator()), img.DataWriteGuid(), view(t, img)
			img.Close()
			want := fmt.Sprint(tc.want)
			sawOld, sawNew := false, false
			for k := 0; ; k++ {
				p, img, _ := openCut(t, tc.child, k)
				err = img.SetParent(tc.parentID, tc.parentPath, tc.childPath)
				if err != nil && !errors.Is(err, errCut) {
					t.Fatalf("cut after %d: %v", k, err)
				}
				img.Close()
				for _, writable := range []bool{false, true} {
					ro, err := Open(p, writable)
					if err != nil {
						t.Fatalf("cut after %d: the file does not open (writable %v): %v", k, writable, err)
					}
					got := fmt.Sprint(ro.ParentLocator())
					if got != old && got != want || ro.DataWriteGuid() != dwg || !bytes.Equal(view(t, ro), v) {
						t.Fatalf("cut after %d (writable %v): locator %s, DataWriteGuid kept %v; want %s or %s", k, writable, got, ro.DataWriteGuid() == dwg, old, want)
					}
					sawOld, sawNew = sawOld || got == old, sawNew || got == want
					ro.Close()
				}
				if err == nil {
					if !sawNew || !sawOld {
						t.Fatalf("uncut after %d: saw the old locator %v, the new %v", k, sawOld, sawNew)
					}
					if got := fmt.Sprint(readLocator(t, p)); got != want {
						t.Fatalf("uncut: locator %s, want %s", got, want)
					}
					t.Logf("%d cut points", k)
					return
				}
			}
		})
	}
}

func readLocator(t *testing.T, p string) map[string]string {
	t.Helper()
	img, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	return img.ParentLocator()
}
