package chain

import (
	"errors"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/vhd"
)

func TestMap(t *testing.T) {
	dir := t.TempDir()
	base := createBase(t, dir, "base.vhd", vhd.TypeDynamic, 4*mib, 512*kib)
	write := func(path string, off int64, n int) {
		t.Helper()
		c, err := Open(path, true)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.WriteAt(make([]byte, n), off); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	p := make([]byte, 4096)
	p[0] = 1
	c, err := Open(base, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(p, 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	top := createChild(t, dir, "top.vhd", base, 512*kib)
	write(top, 1024, 512)         // inside the base's block
	write(top, 512*kib-512, 1024) // across a block boundary: two blocks, one run

	c, err = Open(top, false)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	runs, err := Map(c, MapAll)
	if err != nil {
		t.Fatal(err)
	}
	type want struct {
		start, length int64
		depth         int
		present, data bool
	}
	wants := []want{
		{0, 1024, 1, true, true},
		{1024, 512, 0, true, true},
		{1536, 512*kib - 512 - 1536, 1, true, true},
		{512*kib - 512, 512, 0, true, true},
		{512 * kib, 512, 0, true, true},
		{512*kib + 512, 4*mib - 512*kib - 512, 2, false, false},
	}
	if len(runs) != len(wants) {
		t.Fatalf("runs %+v, want %+v", runs, wants)
	}
	for i, w := range wants {
		r := runs[i]
		if r.Start != w.start || r.Length != w.length || r.Depth != w.depth || r.Present != w.present || r.Data != w.data || r.Zero == w.data || (r.Offset != nil) != w.data {
			t.Errorf("run %d: %+v, want %+v", i, r, w)
		}
	}
	// The two top runs across the block boundary stay apart: their file offsets
	// are not contiguous (each block has its bitmap before it).
	if *runs[3].Offset+runs[3].Length == *runs[4].Offset {
		t.Errorf("runs 3 and 4 are contiguous in the file but not merged")
	}

	own, err := Map(c, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(own) != 3 || own[0].Start != 1024 || own[1].Start != 512*kib-512 || own[2].Start != 512*kib {
		t.Errorf("depth 0: %+v", own)
	}
	for _, d := range []int{-2, 2} {
		if _, err := Map(c, d); !errors.Is(err, image.ErrInvalidArg) {
			t.Errorf("depth %d: %v, want ErrInvalidArg", d, err)
		}
	}
}
