package vhdx

import (
	"bytes"
	"errors"
	"os"
	"syscall"
	"testing"
)

// discardImage is an 8 MiB image of 1 MiB blocks to discard in. kind "dynamic":
// blocks 0-2 and 5 FULLY_PRESENT, 3 ZERO. "differencing": over a parent that holds
// data (parentByte) in blocks 4-7 only, blocks 0 and 4 FULLY_PRESENT, 1 and 5
// PARTIALLY_PRESENT (every other sector), 6 ZERO; "differencing-4k" the same with
// 4096-byte logical sectors. "fixed": LeaveBlockAllocated,
// every block FULLY_PRESENT.
func discardImage(kind string) (*builder, []byte, func(off, n int64) (bool, error)) {
	b := newBuilder(8*MiB, MiB)
	var parent []byte
	var below func(off, n int64) (bool, error)
	switch kind {
	case "dynamic":
		for i, p := range []int64{0, 1, 2, 5} {
			b.states[p], b.data[p] = FullyPresent, pattern(MiB, byte(16*i+1))
		}
		b.states[3] = Zero
	case "fixed":
		b.leaveAlloc = true
		for p := int64(0); p < 8; p++ {
			b.states[p], b.data[p] = FullyPresent, pattern(MiB, byte(16*p+1))
		}
	case "differencing", "differencing-4k":
		b.parent = true
		ss := int64(512)
		if kind == "differencing-4k" {
			b.logical, ss = 4096, 4096
		}
		b.locator = []KeyValue{{"parent_linkage", "{" + NewGUID().String() + "}"}, {"relative_path", `parent.vhdx`}}
		for i, p := range []int64{0, 1, 4, 5} {
			b.data[p] = pattern(MiB, byte(16*i+1))
			b.states[p] = FullyPresent
			if p == 1 || p == 5 {
				b.states[p] = PartiallyPresent
				for s := int64(0); s < MiB/ss; s += 2 {
					b.bits[p] = append(b.bits[p], s)
				}
			}
		}
		b.states[6] = Zero
		parent = make([]byte, 8*MiB)
		copy(parent[4*MiB:], fill(4*MiB, parentByte))
		below = func(off, n int64) (bool, error) { return off+n > 4*MiB, nil }
	}
	return b, parent, below
}

// viewOver is what a chain of img over parent (nil: none) shows.
func viewOver(t *testing.T, img *Image, parent []byte) []byte {
	t.Helper()
	v := make([]byte, img.Size())
	if _, err := img.ReadAt(v, 0); err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < img.Size(); {
		n, ok, err := img.Run(off, img.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			if parent != nil {
				copy(v[off:off+n], parent[off:])
			} else {
				clear(v[off : off+n])
			}
		}
		off += n
	}
	return v
}

func allocated(t *testing.T, p string) int64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}

func TestDiscard(t *testing.T) {
	cases := []struct {
		kind, name string
		off, n     int64
		err        error
		states     map[int64]BlockState // payload block -> state after
		freed      int64                // at least this much file space comes back (negative: at most this much more is taken, reserved for a new block as a write reserves it)
	}{
		{kind: "dynamic", name: "drop a whole block", off: MiB, n: MiB, states: map[int64]BlockState{1: Zero}, freed: MiB},
		{kind: "dynamic", name: "punch part of a block", off: MiB + 4096, n: 64 * 1024, states: map[int64]BlockState{1: FullyPresent}, freed: 64 * 1024},
		{kind: "dynamic", name: "punch across a block boundary", off: MiB + MiB/2, n: MiB, states: map[int64]BlockState{1: FullyPresent, 2: FullyPresent}, freed: MiB},
		{kind: "dynamic", name: "punch unaligned sectors", off: 5*MiB + 512, n: 3 * 512, states: map[int64]BlockState{5: FullyPresent}},
		{kind: "dynamic", name: "punch a never-written block", off: 4 * MiB, n: MiB, states: map[int64]BlockState{4: NotPresent}},
		{kind: "dynamic", name: "punch a ZERO block", off: 3 * MiB, n: MiB, states: map[int64]BlockState{3: Zero}},
		{kind: "dynamic", name: "punch the whole disk", off: 0, n: 8 * MiB, states: map[int64]BlockState{0: Zero, 1: Zero, 2: Zero, 4: NotPresent, 5: Zero}, freed: 4 * MiB},
		{kind: "dynamic", name: "punch past the end", off: 7 * MiB, n: 2 * MiB, err: ErrOutOfRange},
		{kind: "dynamic", name: "punch half a sector", off: 0, n: 256, err: ErrInvalidArg},
		{kind: "fixed", name: "punch whole blocks of a fixed image", off: 2 * MiB, n: 2 * MiB, states: map[int64]BlockState{2: FullyPresent, 3: FullyPresent}, freed: 2 * MiB},
		{kind: "differencing", name: "drop a whole block with nothing below", off: 0, n: MiB, states: map[int64]BlockState{0: NotPresent}, freed: MiB},
		{kind: "differencing", name: "drop a partial block with nothing below", off: MiB, n: MiB, states: map[int64]BlockState{1: NotPresent}, freed: MiB},
		{kind: "differencing", name: "whole block over parent data becomes ZERO", off: 4 * MiB, n: MiB, states: map[int64]BlockState{4: Zero}, freed: MiB},
		{kind: "differencing", name: "never-written block over parent data becomes ZERO", off: 7 * MiB, n: MiB, states: map[int64]BlockState{7: Zero}},
		{kind: "differencing", name: "part of a never-written block over parent data", off: 7*MiB + 512, n: 8192, states: map[int64]BlockState{7: PartiallyPresent}, freed: -2 * MiB},
		{kind: "differencing", name: "part of a partial block over parent data", off: 5*MiB + 512, n: 8192, states: map[int64]BlockState{5: PartiallyPresent}},
		{kind: "differencing", name: "punch across a block boundary", off: 3*MiB + MiB/2, n: MiB, states: map[int64]BlockState{3: NotPresent, 4: FullyPresent}},
		{kind: "differencing", name: "punch a ZERO block", off: 6 * MiB, n: MiB, states: map[int64]BlockState{6: Zero}},
		{kind: "differencing", name: "punch a never-written block", off: 2 * MiB, n: MiB, states: map[int64]BlockState{2: NotPresent}},
		{kind: "differencing-4k", name: "part of a partial block over parent data", off: 5*MiB + 4096, n: 3 * 4096, states: map[int64]BlockState{5: PartiallyPresent}},
		{kind: "differencing-4k", name: "part of a never-written block over parent data", off: 7*MiB + 8192, n: 4096, states: map[int64]BlockState{7: PartiallyPresent}, freed: -2 * MiB},
		{kind: "differencing-4k", name: "punch across a block boundary", off: 4*MiB - 4096, n: MiB, states: map[int64]BlockState{3: NotPresent, 4: FullyPresent}},
		{kind: "differencing-4k", name: "punch half a logical sector", off: 5 * MiB, n: 512, err: ErrInvalidArg},
		{kind: "differencing", name: "punch the whole disk", off: 0, n: 8 * MiB, states: map[int64]BlockState{0: NotPresent, 1: NotPresent, 4: Zero, 5: Zero, 7: Zero}, freed: 4 * MiB},
	}
	for _, c := range cases {
		t.Run(c.kind+"/"+c.name, func(t *testing.T) {
			b, parent, below := discardImage(c.kind)
			p := writeFile(t, b.build())
			img, err := Open(p, true)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			want := viewOver(t, img, parent)
			before := allocated(t, p)
			err = img.Discard(c.off, c.n, below)
			if c.err != nil {
				if !errors.Is(err, c.err) {
					t.Fatalf("Discard(%d, %d) = %v, want %v", c.off, c.n, err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Discard(%d, %d): %v", c.off, c.n, err)
			}
			clear(want[c.off : c.off+c.n])
			if !bytes.Equal(viewOver(t, img, parent), want) {
				t.Fatal("the view after Discard differs from the model")
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			ro, err := Open(p, false)
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			if !bytes.Equal(viewOver(t, ro, parent), want) {
				t.Fatal("the view after a reopen differs from the model")
			}
			if ps := problems(t, ro); len(ps) > 0 {
				t.Fatalf("Check: %v", ps)
			}
			for blk, st := range c.states {
				e, err := ro.entry(ro.geo.payloadIndex(blk))
				if err != nil {
					t.Fatal(err)
				}
				if e.state() != st {
					t.Errorf("block %d is %v, want %v", blk, e.state(), st)
				}
			}
			if a := allocated(t, p); a > before-c.freed {
				t.Errorf("allocation %d -> %d: want at least %d back", before, a, c.freed)
			}
		})
	}
}
