package vhdx

import (
	"fmt"

	"github.com/vhdfs/vhdfs/internal/fileio"
)

// Discard makes [off, off+n) read as zeros, block by block (see image.Image), by the
// rules of §2.5.1.1. Data holes come first, each BAT or bitmap change after them and
// through the log at the next Sync (commitLocked), so a cut shows every sector old or
// zero. New space is only ever taken at the end of the file (extendLocked), so a
// block given back is never reused while an entry on disk may still point at it.
//
//   - a whole block with nothing below: its data is punched, then it becomes
//     NOT_PRESENT in a differencing file (the layers below hold nothing there), ZERO
//     in a file without a parent (whose NOT_PRESENT blocks are undefined); in a fixed
//     image (LeaveBlockAllocated) it stays FULLY_PRESENT, punched;
//   - a whole block of a differencing image with data below: punched, then ZERO;
//   - part of a block with nothing below: the data of a present block is punched;
//     other blocks read zeros already;
//   - part of a block with data below: the sectors' data is punched and their bits
//     set (FULLY_PRESENT needs no bits); a NOT_PRESENT block is allocated first, as
//     a write would, its data range punched rather than written. A block in ZERO,
//     UNMAPPED or UNDEFINED reads zeros from this file already.
//
// off and n must be whole logical sectors, the range inside Size.
func (img *Image) Discard(off, n int64, below func(off, n int64) (bool, error)) error {
	g := img.geo
	if !img.writable {
		return fmt.Errorf("%s: discard at %d: %w", img.name, off, ErrReadOnly)
	}
	if off%g.sectorSize != 0 || n%g.sectorSize != 0 {
		return fmt.Errorf("%s: discard of %d bytes at %d: not whole %d-byte logical sectors: %w", img.name, n, off, g.sectorSize, ErrInvalidArg)
	}
	if off < 0 || n < 0 || off+n > g.size {
		return fmt.Errorf("%s: discard of %d bytes at %d past the size %d: %w", img.name, n, off, g.size, ErrOutOfRange)
	}
	if n == 0 {
		return nil
	}
	if !img.meta.Load().HasParent {
		below = nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.usableLocked(off); err != nil {
		return err
	}
	for blk := off / g.blockSize; blk*g.blockSize < off+n; blk++ {
		if _, err := img.entry(g.payloadIndex(blk)); err != nil {
			return err
		}
		if below != nil {
			if _, err := img.entry(g.bitmapIndex(blk)); err != nil {
				return err
			}
		}
	}
	if err := img.beginWriteLocked(); err != nil {
		return err
	}
	for o := off; o < off+n; {
		blk, in := o/g.blockSize, o%g.blockSize
		k := min(off+n-o, g.blockSize-in)
		if err := img.discardBlockLocked(blk, in, k, below); err != nil {
			return err
		}
		o += k
	}
	return nil
}

// discardBlockLocked discards the k bytes at in of payload block blk. The caller
// holds mu.
func (img *Image) discardBlockLocked(blk, in, k int64, below func(off, n int64) (bool, error)) error {
	g, meta := img.geo, img.meta.Load()
	idx := g.payloadIndex(blk)
	e, err := img.entry(idx)
	if err != nil {
		return err
	}
	start := blk * g.blockSize
	blockLen := min(g.blockSize, g.size-start)
	whole := in == 0 && k == blockLen
	under := false
	if below != nil {
		if under, err = below(start+in, k); err != nil {
			return err
		}
	}
	s := e.state()
	stored := s == FullyPresent || s == PartiallyPresent
	switch {
	case !stored && (s != NotPresent || !under):
		return nil // zeros already: ZERO, UNMAPPED, UNDEFINED, or nothing anywhere
	case whole && meta.LeaveBlockAllocated && !meta.HasParent:
		return img.punchLocked(blk, e.at(), blockLen)
	case whole:
		if stored {
			if err := img.punchLocked(blk, e.at(), blockLen); err != nil {
				return err
			}
		}
		// Without a parent, NOT_PRESENT's content is undefined (§2.5.1.1): only
		// ZERO promises the zeros a discard does. In a differencing file, NOT_PRESENT
		// shows the layers below, which hold nothing here unless under.
		state := NotPresent
		if under || !meta.HasParent {
			state = Zero
		}
		// Its sector bits (if any) mean nothing now; a block written again
		// clears them first (writeBlockLocked).
		return img.commitLocked(map[int64]batEntry{idx: makeEntry(state, 0)}, nil)
	case !under, s == FullyPresent:
		return img.punchLocked(blk, e.at()+in, k)
	}
	var bat map[int64]batEntry
	if s == NotPresent {
		if e, bat, _, err = img.allocateBlockLocked(blk, in, k, e); err != nil {
			return err
		}
	}
	if err := img.punchLocked(blk, e.at()+in, k); err != nil {
		return err
	}
	return img.commitLocked(bat, &bitRange{blk, in / g.sectorSize, k / g.sectorSize, bat != nil})
}

// punchLocked punches the k bytes at at, in block blk, of the file.
func (img *Image) punchLocked(blk, at, k int64) error {
	if err := fileio.Punch(img.src.f, at, k); err != nil {
		return fmt.Errorf("%s: punch %d bytes of block %d at %d: %w", img.name, k, blk, at, err)
	}
	return nil
}
