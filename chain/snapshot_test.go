package chain

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/vhd"
)

// TestSnapshot: a snapshot of a writable chain freezes the top as the new name (the
// same file, with its unique ID) and keeps the top's path as the live top, a fresh
// empty image on it; later writes land there, the frozen file stays as it was, the
// chain opens again from the top's path with the same view, and the frozen name
// opens alone with the view of the moment of the snapshot. The old top's child
// stays valid through the frozen name.
func TestSnapshot(t *testing.T) {
	const size, bs = 8 << 20, 1 << 20
	dir := t.TempDir()
	base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, size, bs)
	top := createChild(t, dir, "top.vhd", base, bs)
	r := newRand(t, 5)
	model := make([]byte, size)
	c := openChain(t, top, true)
	writeRandom(t, r, c, model, 20, bs)
	oldTop := c.Layers()[0]
	oldID := oldTop.Image.ID()
	oldDev, oldIno := oldTop.Image.FileID()
	// A child of the top made before the snapshot (through the chain's handle: the
	// top is locked for writing).
	child := filepath.Join(dir, "child.vhd")
	if err := oldTop.Image.CreateChild(child, image.ChildOptions{}); err != nil {
		t.Fatal(err)
	}

	snap := filepath.Join(dir, "snap.vhd")
	l, err := c.Snapshot(snap)
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	layers := c.Layers()
	if len(layers) != 3 || layers[1] != l || layers[0].Path != top || layers[1].Path != snap || layers[1].Image.Writable() || !layers[0].Image.Writable() {
		t.Fatalf("layers after the snapshot: %+v", layers)
	}
	if dev, ino := l.Image.FileID(); dev != oldDev || ino != oldIno || l.Image.ID() != oldID {
		t.Errorf("the frozen layer is not the old top's file with its ID")
	}
	if layers[0].Image.ID() == oldID || layers[0].Image.ParentID() != oldID {
		t.Errorf("the live top has ID %v and parent ID %v; the old top's ID is %v", layers[0].Image.ID(), layers[0].Image.ParentID(), oldID)
	}
	if err := layers[0].Image.SameFile(top); err != nil {
		t.Errorf("the live top is not at the top's path: %v", err)
	}
	if n := layers[0].Image.AllocatedBytes(); n != 0 {
		t.Errorf("the live top holds %d bytes, want none", n)
	}
	for _, p := range []string{JournalPath(top), filepath.Join(dir, ".top.vhd"+snapshotSuffix)} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after the snapshot: %v", filepath.Base(p), err)
		}
	}
	checkReads(t, r, c, 0, model)
	frozenModel := bytes.Clone(model)
	frozen := readFile(t, snap)
	writeRandom(t, r, c, model, 20, bs)
	checkReads(t, r, c, 0, model)
	if layers[0].Image.AllocatedBytes() == 0 {
		t.Errorf("writes after the snapshot did not reach the live top")
	}

	for _, tc := range []struct {
		name string
		path string
		want error
	}{
		{"an existing file", snap, os.ErrExist},
		{"an image of the chain", base, os.ErrExist},
		{"the top", top, os.ErrExist},
		{"a journal's name", filepath.Join(dir, "other.vhd"+JournalSuffix), image.ErrInvalidArg},
		{"a journal's temporary name", filepath.Join(dir, "top.vhd"+JournalSuffix+".tmp"), image.ErrInvalidArg},
		{"the name of a merge's fresh top", filepath.Join(dir, ".top.vhd.vhdfs-new"), image.ErrInvalidArg},
		{"the name of a merge's old top", filepath.Join(dir, ".top.vhd.vhdfs-merging"), image.ErrInvalidArg},
		{"the name of a snapshot's fresh top", filepath.Join(dir, ".top.vhd"+snapshotSuffix), image.ErrInvalidArg},
	} {
		if _, err := c.Snapshot(tc.path); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	// A symlink at the name (to nowhere) is not followed: refused, left as it is.
	link := filepath.Join(dir, "link.vhd")
	if err := os.Symlink(filepath.Join(dir, "nowhere.vhd"), link); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Snapshot(link); !errors.Is(err, os.ErrExist) {
		t.Errorf("a symlink: %v, want os.ErrExist", err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "nowhere.vhd")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a snapshot through a symlink made its target: %v", err)
	}
	if len(c.Layers()) != 3 {
		t.Errorf("a refused snapshot changed the chain")
	}
	closeChain(t, c)
	if !bytes.Equal(readFile(t, snap), frozen) {
		t.Errorf("the frozen image changed after the snapshot")
	}
	again := openChain(t, top, false)
	if again.Len() != 3 {
		t.Errorf("the top opens a chain of %d", again.Len())
	}
	checkReads(t, r, again, 0, model)
	if _, err := again.Snapshot(filepath.Join(dir, "ro.vhd")); !errors.Is(err, ErrReadOnly) {
		t.Errorf("snapshot of a read-only chain: %v, want ErrReadOnly", err)
	}
	closeChain(t, again)
	alone := openChain(t, snap, false)
	checkReads(t, r, alone, 0, frozenModel)
	closeChain(t, alone)
	// The old top's child still names the top's path, whose image is no longer its
	// parent; given the frozen name, it opens (checked by unique ID) through it.
	if ch, err := Open(child, false); !errors.Is(err, image.ErrParentMismatch) {
		if err == nil {
			ch.Close()
		}
		t.Errorf("the old top's child opens through the live top: %v", err)
	}
	ch, err := OpenWith(child, OpenOptions{Parents: []string{snap}})
	if err != nil {
		t.Fatalf("the old top's child, given the frozen image: %v", err)
	}
	if ch.Len() != 3 {
		t.Errorf("the old top's child opens a chain of %d", ch.Len())
	}
	checkReads(t, r, ch, 0, frozenModel)
	closeChain(t, ch)
}
