package image

import (
	"errors"

	"github.com/vhdfs/vhdfs/internal/imagelock"
)

// Errors every format returns (wrapped, naming the file and the field); the
// formats' packages give them their own names too.
var (
	ErrUnknownFormat  = errors.New("not a VHD or VHDX image")
	ErrChecksum       = errors.New("checksum mismatch")
	ErrTruncated      = errors.New("file truncated")
	ErrCorrupt        = errors.New("corrupt image")
	ErrUnsupported    = errors.New("unsupported image")
	ErrMixedFormats   = errors.New("a chain is one format throughout")
	ErrReadOnly       = errors.New("image is read-only")
	ErrOutOfRange     = errors.New("offset past the end of the disk")
	ErrInvalidArg     = errors.New("invalid argument")
	ErrParentMismatch = errors.New("parent unique ID does not match")
	ErrParentMissing  = errors.New("parent not found")
	ErrLocked         = imagelock.ErrLocked // another process (or handle) uses the image
	// ErrWriteProtected: a file with no write bits, opened for writing without
	// --force-rw.
	ErrWriteProtected = errors.New("write-protected (no write bits)")
	ErrReplaced       = errors.New("image file was replaced")
	// ErrNotInPlace: CopyFrom's range is not stored in place in the image.
	ErrNotInPlace = errors.New("range not stored in place")
	// ErrNoKernelCopy: the file system refused copy_file_range.
	ErrNoKernelCopy = errors.New("copy_file_range refused")
)
