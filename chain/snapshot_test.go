package chain

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdfs/vhdfs/vhd"
)

// TestSnapshot: a snapshot of a writable chain puts an empty top above it; later
// writes land there, the old top's file stays as it was, and the chain opens again
// from the snapshot with the same view.
func TestSnapshot(t *testing.T) {
	const size, bs = 8 << 20, 1 << 20
	dir := t.TempDir()
	base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, size, bs)
	top := createChild(t, dir, "top.vhd", base, bs)
	r := newRand(t, 5)
	model := make([]byte, size)
	c := openChain(t, top, true)
	writeRandom(t, r, c, model, 20, bs)

	snap := filepath.Join(dir, "snap.vhd")
	l, err := c.Snapshot(snap)
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	layers := c.Layers()
	if len(layers) != 3 || layers[0] != l || layers[0].Path != snap || layers[1].Path != top || layers[1].Image.Writable() {
		t.Fatalf("layers after the snapshot: %+v", layers)
	}
	if n := l.Image.AllocatedBytes(); n != 0 {
		t.Errorf("the new top holds %d bytes, want none", n)
	}
	checkReads(t, r, c, 0, model)
	frozen := readFile(t, top)
	writeRandom(t, r, c, model, 20, bs)
	checkReads(t, r, c, 0, model)
	if l.Image.AllocatedBytes() == 0 {
		t.Errorf("writes after the snapshot did not reach the new top")
	}

	for _, tc := range []struct {
		name string
		path string
		want error
	}{
		{"an existing file", snap, os.ErrExist},
		{"an image of the chain", base, os.ErrExist},
	} {
		if _, err := c.Snapshot(tc.path); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	if len(c.Layers()) != 3 {
		t.Errorf("a refused snapshot changed the chain")
	}
	closeChain(t, c)
	if !bytes.Equal(readFile(t, top), frozen) {
		t.Errorf("the old top changed after the snapshot")
	}
	again := openChain(t, snap, false)
	if again.Len() != 3 {
		t.Errorf("the snapshot opens a chain of %d", again.Len())
	}
	checkReads(t, r, again, 0, model)
	if _, err := again.Snapshot(filepath.Join(dir, "ro.vhd")); !errors.Is(err, ErrReadOnly) {
		t.Errorf("snapshot of a read-only chain: %v, want ErrReadOnly", err)
	}
}
