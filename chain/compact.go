package chain

import (
	"context"
	"fmt"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
)

// Compact opens the chain whose top is path, the top for writing (read-only for a
// dry run, which writes nothing) and its ancestors read-only, and compacts the top
// (image.Image.Compact): a differencing top drops an all-zero block only where the
// chain below it reads zeros too. The locks are those of Open: an image in use by a
// mount or a qemu is refused (image.ErrLocked).
func Compact(ctx context.Context, path string, o image.CompactOptions) (image.CompactResult, error) {
	c, err := OpenWith(path, OpenOptions{Writable: !o.DryRun})
	if err != nil {
		return image.CompactResult{}, err
	}
	layers := c.Layers()
	if len(layers) > 1 {
		below := layers[1:]
		o.BelowZero = func(off, n int64) (bool, error) { return zerosIn(below, off, n) }
	}
	res, err := layers[0].Image.Compact(ctx, o)
	if cerr := c.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return res, fmt.Errorf("compact %s: %w", path, err)
	}
	return res, nil
}

// zerosIn reports whether the view of layers (top first) reads zeros over all of
// [off, off+n): runs no layer stores are zeros without a read, and past the view's
// size everything is.
func zerosIn(layers []*Layer, off, n int64) (bool, error) {
	size := layers[0].Image.Size()
	end := min(off+n, size)
	buf := make([]byte, 0, 1<<20)
	for off < end {
		k, present, err := runFrom(layers, off, end-off)
		if err != nil {
			return false, err
		}
		if present {
			for pos := off; pos < off+k; {
				c := min(int64(cap(buf)), off+k-pos)
				p := buf[:c]
				if err := readFrom(layers, p, pos); err != nil {
					return false, err
				}
				if !fileio.AllZero(p) {
					return false, nil
				}
				pos += c
			}
		}
		off += k
	}
	return true, nil
}
