package vhd

import (
	"fmt"

	"github.com/vhdfs/vhdfs/internal/fileio"
)

// Discard makes [off, off+n) read as zeros, block by block (see image.Image):
//
//   - a fixed image: the range is punched in the file;
//   - a whole allocated block with nothing below it (below false, or no parent):
//     the block's bitmap and data are punched, then its BAT entry is cleared
//     (on disk at the next Sync). A cut between the two leaves the entry pointing
//     at zeros: a zero bitmap shows the parent, which holds nothing there, and
//     zero data reads as zeros, so both read right. The space is never reused
//     while an entry on disk may point at it: blocks are only ever allocated past
//     the footer, at the end of the file;
//   - part of an allocated block with nothing below: its data range is punched (a
//     sector whose bit is set reads zeros from the hole, one whose bit is clear
//     reads the parent's nothing);
//   - an unallocated block with nothing below: nothing to do;
//   - a differencing image with data below: as a write of zeros would, the block is
//     allocated if it is not (see allocateLocked) and the sectors' bits are set, on
//     disk at the next Sync; their data range is punched rather than written, first,
//     so a cut shows every sector old (bit still clear, or old data) or zero.
//
// off and n must be multiples of 512, the range inside Size.
func (img *Image) Discard(off, n int64, below func(off, n int64) (bool, error)) error {
	if !img.writable {
		return fmt.Errorf("%s: discard at %d: %w", img.name, off, ErrReadOnly)
	}
	if off%SectorSize != 0 || n%SectorSize != 0 {
		return fmt.Errorf("%s: discard of %d bytes at %d: not whole sectors: %w", img.name, n, off, ErrInvalidArg)
	}
	if off < 0 || n < 0 || off+n > img.size {
		return fmt.Errorf("%s: discard of %d bytes at %d past the size %d: %w", img.name, n, off, img.size, ErrOutOfRange)
	}
	if img.header == nil {
		if err := fileio.Punch(img.f, off, n); err != nil {
			return fmt.Errorf("%s: punch %d bytes at %d: %w", img.name, n, off, err)
		}
		return nil
	}
	if img.footer.DiskType != TypeDifferencing {
		below = nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	for o := off; o < off+n; {
		blk, in := o/img.blockSize, o%img.blockSize
		k := min(off+n-o, img.blockSize-in)
		if err := img.discardBlockLocked(uint32(blk), in, k, below); err != nil {
			return err
		}
		o += k
	}
	if len(img.dirtyBAT) > maxDirtyBlocks || img.dirtyBytes > maxDirtyBitmapBytes {
		return img.syncLocked()
	}
	return nil
}

// discardBlockLocked discards the k bytes at in of block blk. The caller holds mu
// for writing.
func (img *Image) discardBlockLocked(blk uint32, in, k int64, below func(off, n int64) (bool, error)) error {
	start := int64(blk) * img.blockSize
	blockLen := min(img.blockSize, img.size-start)
	whole := in == 0 && k == blockLen
	under := false
	if below != nil {
		var err error
		if whole {
			// Past the last sector of the disk, the block holds nothing of it.
			if under, err = below(start, blockLen); err != nil {
				return err
			}
		} else if under, err = below(start+in, k); err != nil {
			return err
		}
	}
	e := img.bat.get(int64(blk))
	switch {
	case !under && e == unallocated:
		return nil
	case !under && whole:
		return img.dropBlockLocked(blk, e)
	case !under:
		return img.punchLocked(blk, e, in, k)
	}
	if e == unallocated {
		var err error
		if e, err = img.allocateLocked(blk); err != nil {
			return err
		}
	}
	if err := img.punchLocked(blk, e, in, k); err != nil {
		return err
	}
	return img.markWrittenLocked(blk, e, in, k)
}

// punchLocked punches the data of the k bytes at in of block blk (BAT entry e).
func (img *Image) punchLocked(blk, e uint32, in, k int64) error {
	at := int64(e)*SectorSize + img.bitmapSize + in
	if err := fileio.Punch(img.f, at, k); err != nil {
		return fmt.Errorf("%s: punch %d bytes of block %d at %d: %w", img.name, k, blk, at, err)
	}
	return nil
}

// dropBlockLocked punches block blk (BAT entry e), bitmap and data, and marks it
// unallocated, forgetting its bitmap pages, pending and cached: a later write
// allocates it anew elsewhere, with a bitmap of its own.
func (img *Image) dropBlockLocked(blk, e uint32) error {
	at := int64(e) * SectorSize
	if err := fileio.Punch(img.f, at, img.bitmapSize+img.blockSize); err != nil {
		return fmt.Errorf("%s: punch block %d at %d: %w", img.name, blk, at, err)
	}
	for pg := int64(0); pg*bitmapPage < img.bitmapSize; pg++ {
		k := pageKey(img.id, blk, uint32(pg))
		if bm, ok := img.dirty[k]; ok {
			delete(img.dirty, k)
			img.dirtyBytes -= int64(len(bm))
		}
		bitmapCache.Take(k)
	}
	img.bat.set(int64(blk), unallocated)
	img.dirtyBAT[blk] = true
	return nil
}
