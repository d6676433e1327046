// Package vhdx reads one Microsoft VHDX (virtual hard disk version 2) file: fixed,
// dynamic or differencing, as the MS-VHDX specification describes it. It knows
// nothing of parents beyond what the metadata records; package chain composes
// images into one view. A file whose log is not empty is replayed before any of its
// metadata is trusted: in memory when it is opened read-only, into the file when it
// is opened for writing.
package vhdx

import (
	"errors"

	"github.com/vhdfs/vhdfs/image"
)

// Sentinel errors; every error this package returns wraps one of these or an I/O
// error, and names the file and the field. The second group are package image's,
// shared by every format, under this package's names.
var (
	ErrNotVHDX     = errors.New("not a VHDX image")
	ErrChecksum    = image.ErrChecksum
	ErrTruncated   = image.ErrTruncated
	ErrCorrupt     = image.ErrCorrupt
	ErrUnsupported = image.ErrUnsupported

	ErrReadOnly     = image.ErrReadOnly
	ErrOutOfRange   = image.ErrOutOfRange
	ErrInvalidArg   = image.ErrInvalidArg
	ErrLocked       = image.ErrLocked // another process (or handle) uses the image
	ErrReplaced     = image.ErrReplaced
	ErrNotInPlace   = image.ErrNotInPlace
	ErrNoKernelCopy = image.ErrNoKernelCopy
)
