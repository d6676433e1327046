package chain

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/faults"
	"github.com/vhdfs/vhdfs/vhd"
)

// TestCompactPowerLoss compacts the top of a three-image chain through Compact, the
// way the command does, with every durable step cut in turn (internal/faults): after
// each cut the chain opens, check finds no error and the view is the model; zeros
// over data two levels down stay, zeros over zeros in every level go; the
// dry run reports what the completed run does, and writes nothing.
func TestCompactPowerLoss(t *testing.T) {
	const bs, blocks = 4096, 32
	size := int64(bs * blocks)
	dir := t.TempDir()
	r := newRand(t, 18)
	base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, size, bs)
	mid := createChild(t, dir, "mid.vhd", base, bs)
	top := createChild(t, dir, "top.vhd", mid, bs)
	model := make([]byte, size)
	write := func(path string, off int64, d []byte) {
		t.Helper()
		c := openChain(t, path, true)
		if _, err := c.WriteAt(d, off); err != nil {
			t.Fatal(err)
		}
		closeChain(t, c)
		copy(model[off:], d)
	}
	// The base has data in blocks 0-7, the middle image zeros in 8-11 (over base
	// zeros); the top data in every block, then zeros in every odd block.
	write(base, 0, randBytes(r, 8*bs))
	write(mid, 8*bs, make([]byte, 4*bs))
	write(top, 0, randBytes(r, int(size)))
	for b := int64(1); b < blocks; b += 2 {
		write(top, b*bs, make([]byte, bs))
	}
	pristine := readFile(t, top)

	dry, err := Compact(context.Background(), top, image.CompactOptions{DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, top), pristine) {
		t.Fatal("the dry run changed the top")
	}
	// Odd blocks 1-7 lie over base data: kept; 9-31 over zeros: dropped.
	if dry.Blocks != blocks || dry.Dropped != 12 || dry.Kept != 4 {
		t.Fatalf("dry run: %+v, want 32 blocks, 12 dropped, 4 kept", dry)
	}
	for k := 0; ; k++ {
		if k > 1000 {
			t.Fatal("compact never completed")
		}
		writeFile(t, top, pristine)
		faults.Arm(k)
		res, err := Compact(context.Background(), top, image.CompactOptions{})
		faults.Disarm()
		if err != nil && !errors.Is(err, faults.ErrPowerLost) {
			t.Fatalf("k=%d: %v", k, err)
		}
		for _, p := range CheckWith(top, OpenOptions{}) {
			if p.Severity >= image.Error {
				t.Fatalf("k=%d: check: %v", k, p)
			}
		}
		c := openChain(t, top, false)
		got := make([]byte, size)
		if _, err := c.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		closeChain(t, c)
		if !bytes.Equal(got, model) {
			t.Fatalf("k=%d: the view changed at %d", k, firstDiff(got, model))
		}
		if err == nil {
			if res != dry {
				t.Fatalf("the run did %+v, the dry run said %+v", res, dry)
			}
			if st := fileSizeOf(t, top); st != res.NewSize || res.NewSize >= res.OldSize {
				t.Fatalf("%+v, file %d bytes", res, st)
			}
			t.Logf("%d cut points, then %+v", k, res)
			return
		}
	}
}

func fileSizeOf(t *testing.T, p string) int64 {
	t.Helper()
	return int64(len(readFile(t, p)))
}
