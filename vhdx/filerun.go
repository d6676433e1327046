package vhdx

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/internal/faults"
	"github.com/vhdfs/vhdfs/internal/fileio"
)

// FileRun returns where the bytes from off lie in the image's file in one piece: the
// file, the offset in it and the length k, at most n. The bytes must be this image's
// own data: a FULLY_PRESENT block (whatever its bitmap says, as ReadAt), or the
// sectors of a PARTIALLY_PRESENT block whose bits are set. A run goes on into the
// next block when that block is FULLY_PRESENT and follows in the file. ok is false
// for anything else (zeros this file does not store, sectors from the parent, off
// past Size), when the file is not a plain file, and while the log is replayed only
// in memory (the file does not hold what the image shows).
func (img *Image) FileRun(off, n int64) (f *os.File, fileOff, k int64, ok bool) {
	g := img.geo
	f, isFile := faults.OSFile(img.src.f)
	if !isFile || img.salvage || img.src.ov != nil || off < 0 || off >= g.size || n <= 0 {
		return nil, 0, 0, false
	}
	n = min(n, g.size-off)
	img.mu.RLock()
	defer img.mu.RUnlock()
	blk, in := off/g.blockSize, off%g.blockSize
	e, err := img.entry(g.payloadIndex(blk))
	if err != nil {
		return nil, 0, 0, false
	}
	switch e.state() {
	case FullyPresent:
		k = min(n, g.blockSize-in)
		for next := e.at() + g.blockSize; k < n; next += g.blockSize {
			blk++
			ne, err := img.entry(g.payloadIndex(blk))
			if err != nil || ne.state() != FullyPresent || ne.at() != next {
				break
			}
			k = min(n, k+g.blockSize)
		}
	case PartiallyPresent:
		var set bool
		var err error
		if k, set, err = img.bitmapRun(blk, in, min(n, g.blockSize-in)); err != nil || !set {
			return nil, 0, 0, false
		}
	default:
		return nil, 0, 0, false
	}
	return f, e.at() + in, k, true
}

// CopyFrom copies n bytes at srcOff of src into the image at off with
// copy_file_range(2), so the kernel moves the bytes (and XFS or btrfs share them by
// reflink). It copies only into a block that is stored (FULLY_PRESENT, or
// PARTIALLY_PRESENT, whose bits for the range it then sets), and stops at the
// block's end (the caller calls again for the rest); any other block is
// ErrNotInPlace (WriteAt allocates it). It
// follows WriteAt's rules: off and n are whole logical sectors inside Size, and the
// first change of data gives the header a new DataWriteGuid unless SetID gave one.
// The bytes are durable at the next Sync. It returns the bytes copied (whole logical
// sectors) and, when it copied less than it could up to the block's end, an error;
// one wrapping ErrNotInPlace or ErrNoKernelCopy says to copy by ReadAt and WriteAt.
func (img *Image) CopyFrom(src *os.File, srcOff, off, n int64) (int64, error) {
	g := img.geo
	if !img.writable {
		return 0, fmt.Errorf("%s: copy to %d: %w", img.name, off, ErrReadOnly)
	}
	if off%g.sectorSize != 0 || n%g.sectorSize != 0 || n < 0 || srcOff < 0 {
		return 0, fmt.Errorf("%s: copy of %d bytes to %d: not whole %d-byte logical sectors: %w", img.name, n, off, g.sectorSize, ErrInvalidArg)
	}
	if off < 0 || off+n > g.size {
		return 0, fmt.Errorf("%s: copy of %d bytes to %d past the size %d: %w", img.name, n, off, g.size, ErrOutOfRange)
	}
	// Only a plain file: a File that injects faults must see every write.
	dst, ok := img.src.f.(*os.File)
	if !ok {
		return 0, fmt.Errorf("%s: copy to %d: not a plain file: %w", img.name, off, ErrNotInPlace)
	}
	if n == 0 {
		return 0, nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	blk, in := off/g.blockSize, off%g.blockSize
	e, err := img.entry(g.payloadIndex(blk))
	if err != nil {
		return 0, err
	}
	if e.state() != FullyPresent && e.state() != PartiallyPresent {
		return 0, fmt.Errorf("%s: copy to block %d, which is %v: %w", img.name, blk, e.state(), ErrNotInPlace)
	}
	if err := img.usableLocked(off); err != nil {
		return 0, err
	}
	if err := img.beginWriteLocked(); err != nil {
		return 0, err
	}
	k, err := fileio.CopyRange(src, srcOff, dst, e.at()+in, min(n, g.blockSize-in), g.sectorSize, img.name)
	if k > 0 && e.state() == PartiallyPresent {
		// The copied sectors are the block's now: their bits are set as a write's.
		if berr := img.commitLocked(nil, &bitRange{blk, in / g.sectorSize, k / g.sectorSize, false}); berr != nil {
			return 0, berr
		}
	}
	return k, err
}

// NoReservation stops reserving the space of new blocks (reserveLocked): for a
// writer whose writes count only once its own Sync succeeds (a merge copying into its
// target, which fails as a whole on ENOSPC). Call it before the first write.
func (img *Image) NoReservation() {
	img.mu.Lock()
	img.noReserve = true
	img.mu.Unlock()
}

// StartWriteback asks the kernel to begin writing the file's dirty pages without
// waiting for them (sync_file_range with SYNC_FILE_RANGE_WRITE).
func (img *Image) StartWriteback() {
	if f, ok := faults.OSFile(img.src.f); ok && img.writable {
		_ = unix.SyncFileRange(int(f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	}
}
