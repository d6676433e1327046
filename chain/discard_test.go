package chain

import (
	"errors"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/vhd"
)

// TestDiscard discards random byte ranges (unaligned, across blocks, past the end)
// of a three-layer chain and compares the view with a model, then checks the chain
// and that the layers below the top kept their bytes.
func TestDiscard(t *testing.T) {
	const size = 1 * mib
	dir := t.TempDir()
	r := newRand(t, 18)
	model := make([]byte, size)
	base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, size, 4*kib)
	c := openChain(t, base, true)
	writeRandom(t, r, c, model, 40, 4*kib)
	closeChain(t, c)
	mid := createChild(t, dir, "mid.vhd", base, 4*kib)
	c = openChain(t, mid, true)
	writeRandom(t, r, c, model, 40, 4*kib)
	closeChain(t, c)
	top := createChild(t, dir, "top.vhd", mid, 8*kib)
	c = openChain(t, top, true)
	writeRandom(t, r, c, model, 60, 8*kib)
	below := [][]byte{readFile(t, mid), readFile(t, base)}

	for i := range 80 {
		off, n := randomWrite(r, size, 8*kib)
		switch {
		case i%10 == 0:
			off, n = size-3000, 10000 // past the end
		case i%3 == 0:
			off, n = r.Int64N(size/(8*kib)-3)*8*kib, 3*8*kib // whole blocks of the top
		}
		if err := c.Discard(off, n); err != nil {
			t.Fatalf("Discard(%d, %d): %v", off, n, err)
		}
		clear(model[off:min(off+n, size)])
		if i%20 == 0 {
			checkReads(t, r, c, 0, model)
		}
	}
	checkReads(t, r, c, 0, model)
	if err := c.Discard(-1, 10); !errors.Is(err, image.ErrInvalidArg) {
		t.Errorf("Discard at -1: %v, want ErrInvalidArg", err)
	}
	closeChain(t, c)
	if ps := Check(top); len(atLeast(ps, vhd.Warning)) > 0 {
		t.Errorf("Check: %v", ps)
	}
	if string(readFile(t, mid)) != string(below[0]) || string(readFile(t, base)) != string(below[1]) {
		t.Error("a layer below the top changed")
	}
	c = openChain(t, top, false)
	checkReads(t, r, c, 0, model)
	if err := c.Discard(0, 512); !errors.Is(err, ErrReadOnly) {
		t.Errorf("Discard on a read-only chain: %v, want ErrReadOnly", err)
	}
	closeChain(t, c)
}
