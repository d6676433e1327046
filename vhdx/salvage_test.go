package vhdx

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
)

// TestSalvageTruncated: an 8 MiB dynamic image with blocks 0-3 stored in order, cut
// halfway through block 2: a strict open refuses the read, a salvage open reads
// blocks 0-1 and half of block 2, zeros for the rest, and notes blocks 2 and 3.
func TestSalvageTruncated(t *testing.T) {
	b := newBuilder(8*MiB, MiB)
	want := make([]byte, 8*MiB)
	for i := int64(0); i < 4; i++ {
		b.states[i] = FullyPresent
		b.data[i] = pattern(MiB, byte(i+1))
	}
	f := b.build()
	cut := b.blockOffset(2) + MiB/2
	f = f[:cut]
	for i := int64(0); i < 4; i++ {
		copy(want[i*MiB:], b.data[i])
	}
	clear(want[2*MiB+MiB/2 : 4*MiB])
	p := writeFile(t, f)
	before := sha256.Sum256(f)

	if img, err := Open(p, false); err == nil {
		buf := make([]byte, 8*MiB)
		_, err = img.ReadAt(buf, 0)
		img.Close()
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("strict read of the truncated image: %v, want ErrCorrupt", err)
		}
	} else if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrTruncated) {
		t.Fatalf("strict open: %v", err)
	}

	img, err := OpenSalvage(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	got := make([]byte, img.Size())
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("salvaged disk differs from the model")
	}
	if _, err := img.WriteAt(make([]byte, 512), 0); err == nil {
		t.Fatal("a salvage open wrote")
	}
	notes := img.Notes()
	t.Logf("notes: %q", notes)
	wantNotes := []string{
		"block 2 is cut by the end of the file at " + strconv.FormatInt(cut, 10) + ": disk bytes 2621440-3145727 read as zeros",
		"block 3 (disk bytes 3145728-4194303) lies past the end of the file",
	}
	if len(notes) != len(wantNotes) {
		t.Fatalf("%d notes, want %d", len(notes), len(wantNotes))
	}
	for i, w := range wantNotes {
		if !strings.HasPrefix(notes[i], p+": ") || !strings.Contains(notes[i], w) {
			t.Errorf("note %d %q lacks %q", i, notes[i], w)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if after, err := os.ReadFile(p); err != nil || sha256.Sum256(after) != before {
		t.Fatalf("the salvage open changed the file (%v)", err)
	}
}
