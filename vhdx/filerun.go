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
	if !isFile || img.src.ov != nil || off < 0 || off >= g.size || n <= 0 {
		return nil, 0, 0, false
	}
	n = min(n, g.size-off)
	img.mu.RLock()
	defer img.mu.RUnlock()
	blk, in := off/g.blockSize, off%g.blockSize
	e := img.bat[g.payloadIndex(blk)]
	switch e.state() {
	case FullyPresent:
		k = min(n, g.blockSize-in)
		for next := e.offset() + g.blockSize; k < n; next += g.blockSize {
			blk++
			ne := img.bat[g.payloadIndex(blk)]
			if ne.state() != FullyPresent || ne.offset() != next {
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
	return f, e.offset() + in, k, true
}

// CopyFrom copies n bytes at srcOff of src into the image at off with
// copy_file_range(2), so the kernel moves the bytes (and XFS or btrfs share them by
// reflink). It copies only into a FULLY_PRESENT block, which stores the range in
// place, and stops at the block's end (the caller calls again for the rest); any
// other block is ErrNotInPlace (WriteAt allocates it and logs its BAT entry). It
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
	dst, ok := faults.OSFile(img.src.f)
	if !ok {
		return 0, fmt.Errorf("%s: copy to %d: not a plain file: %w", img.name, off, ErrNotInPlace)
	}
	if n == 0 {
		return 0, nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	blk, in := off/g.blockSize, off%g.blockSize
	e := img.bat[g.payloadIndex(blk)]
	if e.state() != FullyPresent {
		return 0, fmt.Errorf("%s: copy to block %d, which is %v: %w", img.name, blk, e.state(), ErrNotInPlace)
	}
	if err := img.usableLocked(off); err != nil {
		return 0, err
	}
	if err := img.beginWriteLocked(); err != nil {
		return 0, err
	}
	return fileio.CopyRange(src, srcOff, dst, e.offset()+in, min(n, g.blockSize-in), g.sectorSize, img.name)
}

// NoReservation does nothing: new blocks are holes the file grows by (extendLocked)
// and are never reserved ahead with fallocate.
func (img *Image) NoReservation() {}

// StartWriteback asks the kernel to begin writing the file's dirty pages without
// waiting for them (sync_file_range with SYNC_FILE_RANGE_WRITE).
func (img *Image) StartWriteback() {
	if f, ok := faults.OSFile(img.src.f); ok && img.writable {
		_ = unix.SyncFileRange(int(f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	}
}
