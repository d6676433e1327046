// Package image is what the rest of vhdfs knows of one virtual disk file, whatever
// its format: the Image interface that vhd and vhdx implement, the identifiers that
// link a child to its parent, and the errors every format shares. It imports no
// format; package probe opens a file with the format it has.
package image

import (
	"context"
	"io"
	"os"
	"strconv"
	"time"
)

// Image is one open virtual disk file. ReadAt and Run may run concurrently with each
// other and with WriteAt; WriteAt calls serialise inside the image.
type Image interface {
	// ReadAt reads the image's own view: what it stores, zeros where it stores
	// nothing (its parent is the chain's business). Offsets and lengths are any.
	io.ReaderAt
	// WriteAt writes whole logical sectors (SectorSize): off and len(p) are multiples
	// of it, or the call fails with ErrInvalidArg.
	io.WriterAt
	// Discard makes [off, off+n) read as zeros in the view of the chain this image
	// tops, giving back the file space its format allows. off and n are whole
	// logical sectors (else ErrInvalidArg), the range inside Size (else
	// ErrOutOfRange); a read-only image fails with ErrReadOnly. below reports
	// whether an image under this one stores any byte of [off, off+n) (nil: none
	// does, as for an image without a parent); it runs under the image's lock and
	// must not call into the image. Durable at the next Sync, as writes are.
	Discard(off, n int64, below func(off, n int64) (bool, error)) error
	// Run reports whether the byte at off is stored in this image (present) and how
	// many bytes from off, at most n, share that answer. off < Size.
	Run(off, n int64) (k int64, present bool, err error)

	Format() string // "vhd" or "vhdx"
	Type() Type
	Size() int64       // the virtual size
	SectorSize() int64 // the logical sector: the unit of WriteAt
	BlockSize() int64  // 0 for a fixed image
	AllocatedBytes() int64
	Name() string
	SetName(name string)
	Writable() bool

	// ID is what a child of this image records to name it: a VHD's unique ID, a
	// VHDX's DataWriteGuid.
	ID() ID
	// ParentID is what a differencing image records of its parent (zero otherwise).
	ParentID() ID
	// AcceptsParent reports whether an image with this ID is this image's parent.
	AcceptsParent(id ID) bool
	// ParentHints lists where the image's locators say its parent is, in the order
	// to try them.
	ParentHints() ([]ParentHint, error)
	// SetParent records parentID as the parent's ID and parentPath as where it is,
	// relative to childPath (where this image is) as well as absolute. Durable on
	// return; a crash leaves the old record or the new one.
	SetParent(parentID ID, parentPath, childPath string) error
	// SetID gives the image a new ID, durably; its children stop accepting it.
	SetID(id ID) error
	// CreateChild makes a new empty differencing image of the same format, size and
	// block size whose parent is this image.
	CreateChild(path string, o ChildOptions) error

	// Reopen opens the file this image has open once more, through its descriptor
	// (never by path), with a lock that shares with this handle's.
	Reopen(writable bool) (Image, error)
	// SameFile reports an error unless path names the file this image has open.
	SameFile(path string) error
	FileID() (dev, ino uint64)

	// FileRun returns the file and offset that hold [off, off+k) in one piece, k at
	// most n, if they do (for copy_file_range and splice); ok is false otherwise.
	FileRun(off, n int64) (f *os.File, fileOff, k int64, ok bool)
	// CopyFrom copies [srcOff, srcOff+n) of src to [off, off+n) of the image by
	// copy_file_range, where the image stores that range in place; it returns
	// ErrNotInPlace if it does not, ErrNoKernelCopy if the kernel refuses.
	CopyFrom(src *os.File, srcOff, off, n int64) (int64, error)
	// NoReservation stops reserving space for new blocks ahead of their writes.
	NoReservation()
	// Resize changes the virtual size (a multiple of SectorSize) of a writable image
	// no one else does I/O on, durably: a crash leaves the old size or the new one,
	// the shared part unchanged. Grown space reads as stored nothing (zeros, or a
	// differencing image's parent); what lay past a smaller size is dropped.
	Resize(size int64) error

	Sync() error
	// StartWriteback starts writing dirty pages back without waiting for them.
	StartWriteback()
	Close() error

	// Compact drops the blocks that read all zeros where that keeps the view and
	// moves the last blocks into the holes, so the file shrinks (see compact.go).
	Compact(ctx context.Context, o CompactOptions) (CompactResult, error)

	// Check returns every problem found in the file; it writes nothing.
	Check() []Problem
	// Describe says what the file records, for people and for JSON.
	Describe() Description
}

// Noter is implemented by images that can open around damage or in a way that
// bears saying: Notes lists what was done, one line each naming the file, for the
// caller to print on stderr.
type Noter interface {
	Notes() []string
}

// LogHolder is implemented by formats with a metadata log (VHDX): LogPending reports
// whether the file holds log entries not yet replayed into it, which this handle
// (opened read-only) replays in memory. A writable open replays them into the file.
type LogHolder interface {
	LogPending() bool
}

// ZeroStorer is implemented by formats that can store a range as zeros without file
// data (VHDX's ZERO and UNMAPPED block states in a differencing image): ZeroRun
// reports whether the byte at off, which the image stores (Run says present), is
// stored that way, and how many bytes from off, at most n, share that answer.
type ZeroStorer interface {
	ZeroRun(off, n int64) (k int64, zero bool, err error)
}

// SizeRounder is implemented by formats whose sizes round to something other
// tools expect (VHD: a whole CHS geometry); RoundSize is the size create gives for
// a request of size.
type SizeRounder interface {
	RoundSize(size int64) int64
}

// Type is the kind of image. The values are the VHD footer's.
type Type uint32

const (
	Fixed        Type = 2
	Dynamic      Type = 3
	Differencing Type = 4
)

func (t Type) String() string {
	switch t {
	case Fixed:
		return "fixed"
	case Dynamic:
		return "dynamic"
	case Differencing:
		return "differencing"
	}
	return "type " + strconv.FormatUint(uint64(t), 10)
}

// ParentHint is one place a locator names for the parent: a slash-separated path,
// absolute or relative to the child, and the locator it came from ("W2ru",
// "relative_path", ...).
type ParentHint struct {
	Path   string
	Source string
}

// ChildOptions of CreateChild.
type ChildOptions struct {
	// ParentPath is where the child's locators say the parent is (default: the
	// parent's name); LocatorPath is where the child will be read from, for the
	// relative locator (default: path).
	ParentPath, LocatorPath string
	// ID is the child's own ID; zero for a random one.
	ID ID
	// BlockSize of the child; 0 for the parent's (or the format's default, if the
	// parent has none).
	BlockSize int64
}

// Description is what Describe reports.
type Description struct {
	Creator         string
	ParentName      string    // the parent's name as the header records it, if it does
	ParentTimestamp time.Time // the parent's modification time as recorded; zero if none
	Locators        []Locator
	// Fields holds what only this format has, in order, for info's text output.
	Fields [][2]string
}

// Locator is one parent locator entry as the file stores it.
type Locator struct {
	Slot     int    `json:"slot"`
	Platform string `json:"platform"`
	Path     string `json:"path,omitempty"`
	Offset   uint64 `json:"offset,omitempty"`
	Space    int64  `json:"space,omitempty"`
	Length   uint32 `json:"length,omitempty"`
}
