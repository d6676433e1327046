package chain

import (
	"errors"
	"fmt"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/parttable"
)

// ErrUnsafeResize is returned when a shrink would cut off a partition or data, or
// growth would show a parent's data, and the caller did not force it.
var ErrUnsafeResize = errors.New("resize would lose or expose data")

// ResizeOptions are what Resize does, as ResizeVirtualDisk's flags.
type ResizeOptions struct {
	// Size is the new virtual size, rounded up to the top's logical sector and, for
	// a VHD, to a whole CHS geometry unless ExactSize.
	Size      int64
	ExactSize bool
	// Smallest ignores Size and shrinks to the end of the last partition
	// (RESIZE_TO_SMALLEST_SAFE_VIRTUAL_SIZE), with a GPT's backup after it.
	Smallest bool
	// Force shrinks past partitions and stored data, and grows a differencing top
	// over its parent's data.
	Force bool
}

// ResizeResult says what Resize did.
type ResizeResult struct {
	Old, New int64
	Table    *parttable.Table // nil unless a shrink read it
}

// Resize changes the virtual size of the chain's top, which was opened writable. A
// shrink is refused (ErrUnsafeResize) when a partition of the disk, or data stored in
// any layer that is not all zeros, lies past the new size, unless Force; a GPT's
// backup at the old end does not count (a shrink always leaves it behind). Growing a
// differencing top where its parent is larger than the top would show the parent's
// data in the grown space: refused too, unless Force.
func Resize(c *Chain, o ResizeOptions) (ResizeResult, error) {
	layers := c.Layers()
	top := layers[0]
	old := top.Image.Size()
	res := ResizeResult{Old: old, New: old}
	var tab *parttable.Table
	readTable := func() error {
		if tab != nil {
			return nil
		}
		t, err := parttable.Read(c, old, top.Image.SectorSize())
		if err != nil {
			return fmt.Errorf("%s: partition table: %w", top.Path, err)
		}
		tab, res.Table = t, t
		return nil
	}
	size := o.Size
	if o.Smallest {
		if err := readTable(); err != nil {
			return res, err
		}
		if len(tab.Parts) == 0 {
			return res, fmt.Errorf("%s: no partition table with partitions: the smallest safe size is not known", top.Path)
		}
		size = tab.End() + tab.Tail
	}
	size = roundSize(top.Image, size, o.ExactSize)
	if size <= 0 {
		return res, fmt.Errorf("%s: resize to %d: %w", top.Path, o.Size, image.ErrInvalidArg)
	}
	if o.Smallest && size >= old {
		return res, nil // already no larger than the smallest safe size
	}
	if size < old && !o.Force {
		if err := readTable(); err != nil {
			return res, fmt.Errorf("%v (--force shrinks anyway): %w", err, ErrUnsafeResize)
		}
		for _, p := range tab.Parts {
			if p.End > size {
				return res, fmt.Errorf("%s: partition %d (%s) ends at %d, past the new size %d; --smallest shrinks to %d (--force cuts it): %w",
					top.Path, p.Index, tab.Scheme, p.End, size, roundSize(top.Image, tab.End()+tab.Tail, o.ExactSize), ErrUnsafeResize)
			}
		}
		// A GPT's backup, at the end, is the table's own: it goes with any shrink.
		if off, found, err := dataPast(c, size, old-tab.Tail); err != nil {
			return res, err
		} else if found {
			return res, fmt.Errorf("%s: data is stored at %d, past the new size %d (--force drops it): %w", top.Path, off, size, ErrUnsafeResize)
		}
	}
	if size > old && len(layers) > 1 && !o.Force {
		if ps := layers[1].Image.Size(); ps > old {
			return res, fmt.Errorf("%s: its parent %s is %d bytes: growing the child past its %d bytes would show the parent's data there instead of zeros (--force grows it anyway): %w",
				top.Path, layers[1].Path, ps, old, ErrUnsafeResize)
		}
	}
	if size == old {
		return res, nil
	}
	if err := top.Image.Resize(size); err != nil {
		return res, err
	}
	res.New = size
	return res, nil
}

func roundSize(img image.Image, size int64, exact bool) int64 {
	ss := img.SectorSize()
	size = (size + ss - 1) / ss * ss
	if r, ok := img.(image.SizeRounder); ok && !exact {
		size = r.RoundSize(size)
	}
	return size
}

// dataPast finds the first non-zero byte the chain stores in [from, to).
func dataPast(c *Chain, from, to int64) (int64, bool, error) {
	buf := make([]byte, 1<<20)
	for off := from; off < to; {
		n, present, err := c.Run(0, off, to-off)
		if err != nil {
			return 0, false, err
		}
		if present {
			for k := off; k < off+n; {
				m := min(int64(len(buf)), off+n-k)
				if _, err := c.ReadAt(buf[:m], k); err != nil {
					return 0, false, err
				}
				if !fileio.AllZero(buf[:m]) {
					return k, true, nil
				}
				k += m
			}
		}
		off += n
	}
	return 0, false, nil
}
