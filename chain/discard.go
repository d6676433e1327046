package chain

import (
	"fmt"

	"github.com/vhdfs/vhdfs/image"
)

// Discard makes [off, off+n) of the disk read as zeros, as fallocate(PUNCH_HOLE)
// does to a file, and gives back the top image's space where its format allows
// (image.Image.Discard): whole logical sectors go to the top's Discard, told which
// ranges a layer below holds data in; a partial sector at either edge is written
// with zeros, as an unaligned write would be. The part at or past Size is ignored.
// It takes the locks WriteAt takes, so it orders with writes, merges and snapshots
// exactly as a write does.
func (c *Chain) Discard(off, n int64) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.RLock()
	defer c.mu.RUnlock()
	top := c.layers[0]
	if !top.Image.Writable() {
		return fmt.Errorf("%s: %w", top.Path, ErrReadOnly)
	}
	if off < 0 || n < 0 {
		return fmt.Errorf("%s: discard of %d bytes at %d: %w", top.Path, n, off, image.ErrInvalidArg)
	}
	end := min(off+n, top.Image.Size())
	if off >= end {
		return nil
	}
	sector := top.Image.SectorSize()
	first, last := (off+sector-1)/sector*sector, end/sector*sector
	if first >= last {
		_, err := c.writeLocked(make([]byte, end-off), off)
		return err
	}
	if first > off {
		if _, err := c.writeLocked(make([]byte, first-off), off); err != nil {
			return err
		}
	}
	if end > last {
		if _, err := c.writeLocked(make([]byte, end-last), last); err != nil {
			return err
		}
	}
	var below func(off, n int64) (bool, error)
	if len(c.layers) > 1 {
		lower := c.layers[1:]
		below = func(off, n int64) (bool, error) { return stored(lower, off, n) }
	}
	return top.Image.Discard(first, last-first, below)
}

// stored reports whether any of layers stores a byte of [off, off+n).
func stored(layers []*Layer, off, n int64) (bool, error) {
	for n > 0 {
		k, present, err := runFrom(layers, off, n)
		if err != nil || present {
			return present, err
		}
		off, n = off+k, n-k
	}
	return false, nil
}
