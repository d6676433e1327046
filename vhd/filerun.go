package vhd

import (
	"fmt"
	"os"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
)

// Errors of CopyFrom after which the caller copies the range with ReadAt and WriteAt.
var (
	// ErrNotInPlace: the target does not store the range in place yet (an
	// unallocated block of a dynamic image), or its file is not a plain file.
	ErrNotInPlace = image.ErrNotInPlace
	// ErrNoKernelCopy: the kernel or file system refused copy_file_range.
	ErrNoKernelCopy = image.ErrNoKernelCopy
)

// FileRun returns where the bytes from off lie in the image's file in one piece: the
// file, the offset in it and the length k (at most n, never past the end of a block).
// ok is false where the file holds no data for off (an unallocated block, off past
// Size) or is not a plain file. In a differencing image the run's bitmap is not
// consulted: like ReadAt, FileRun gives the block's data whatever its bits say.
func (img *Image) FileRun(off, n int64) (f *os.File, fileOff, k int64, ok bool) {
	f, isFile := osFile(img.f)
	if !isFile || off < 0 || off >= img.size || n <= 0 {
		return nil, 0, 0, false
	}
	n = min(n, img.size-off)
	if img.header == nil {
		return f, off, n, true
	}
	blk, in := off/img.blockSize, off%img.blockSize
	img.mu.RLock()
	e := img.bat.get(blk)
	img.mu.RUnlock()
	if e == unallocated {
		return nil, 0, 0, false
	}
	return f, int64(e)*SectorSize + img.bitmapSize + in, min(n, img.blockSize-in), true
}

// CopyFrom copies n bytes at srcOff of src into the image at off with
// copy_file_range(2), so the kernel moves the bytes (and XFS or btrfs share them by
// reflink). It copies into a fixed image, an allocated block, or a block of a
// differencing image, which it allocates (it stops at the block's end); an
// unallocated block of a dynamic image is ErrNotInPlace. It follows
// WriteAt's rules: off and n are multiples of 512, the bitmap bits are set, and they
// reach the disk at the next Sync, after the data. It returns the bytes copied (a
// multiple of 512) and, when it copied fewer than n, an error; one wrapping
// ErrNotInPlace or ErrNoKernelCopy says to copy the rest by ReadAt and WriteAt.
func (img *Image) CopyFrom(src *os.File, srcOff, off, n int64) (int64, error) {
	if !img.writable {
		return 0, fmt.Errorf("%s: copy to %d: %w", img.name, off, ErrReadOnly)
	}
	if off%SectorSize != 0 || n%SectorSize != 0 {
		return 0, fmt.Errorf("%s: copy of %d bytes to %d: %w", img.name, n, off, ErrUnaligned)
	}
	if off < 0 || off+n > img.size {
		return 0, fmt.Errorf("%s: copy of %d bytes to %d past the size %d: %w", img.name, n, off, img.size, ErrOutOfRange)
	}
	// Only a plain file: a File that injects faults must see every write.
	dst, ok := img.f.(*os.File)
	if !ok {
		return 0, fmt.Errorf("%s: copy to %d: %w", img.name, off, ErrNotInPlace)
	}
	if img.header == nil {
		return fileio.CopyRange(src, srcOff, dst, off, n, SectorSize, img.name)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	blk, in := off/img.blockSize, off%img.blockSize
	n = min(n, img.blockSize-in)
	e := img.bat.get(blk)
	if e == unallocated {
		// A dynamic image leaves a block of zeros unallocated, which only a read
		// would tell; a differencing image allocates for any write, as WriteAt does.
		if img.footer.DiskType != TypeDifferencing {
			return 0, fmt.Errorf("%s: copy to unallocated block %d: %w", img.name, blk, ErrNotInPlace)
		}
		var err error
		if e, err = img.allocateLocked(uint32(blk)); err != nil {
			return 0, err
		}
	}
	k, err := fileio.CopyRange(src, srcOff, dst, int64(e)*SectorSize+img.bitmapSize+in, n, SectorSize, img.name)
	if k > 0 {
		if err := img.markWrittenLocked(uint32(blk), e, in, k); err != nil {
			return 0, err
		}
	}
	if err == nil && (len(img.dirtyBAT) > maxDirtyBlocks || img.dirtyBytes > maxDirtyBitmapBytes) {
		err = img.syncLocked()
	}
	return k, err
}
