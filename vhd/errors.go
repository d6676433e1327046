// Package vhd reads, writes and creates one Microsoft VHD (version 1) image file:
// fixed, dynamic or differencing. It knows nothing of parents beyond what the
// differencing header records; package chain composes images into one view.
package vhd

import (
	"errors"

	"github.com/vhdfs/vhdfs/image"
)

// Sentinel errors; every error this package returns wraps one of these or an I/O error,
// and names the file and the field.
var (
	ErrNotVHD         = errors.New("not a VHD image")
	ErrChecksum       = image.ErrChecksum
	ErrTruncated      = image.ErrTruncated
	ErrCorrupt        = image.ErrCorrupt
	ErrUnsupported    = image.ErrUnsupported
	ErrReadOnly       = image.ErrReadOnly
	ErrOutOfRange     = image.ErrOutOfRange
	ErrUnaligned      = errors.New("offset or length not a multiple of 512")
	ErrParentMismatch = image.ErrParentMismatch
	ErrParentMissing  = image.ErrParentMissing
	ErrInvalidArg     = image.ErrInvalidArg
	ErrLocked         = image.ErrLocked // another process (or handle) uses the image
	ErrReplaced       = image.ErrReplaced
)
