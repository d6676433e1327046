// Package probe opens a virtual disk file with the format it has: the one place that
// knows the list of formats. A file no format claims is refused, never read as raw.
package probe

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/vhd"
	"github.com/vhdfs/vhdfs/vhdx"
)

// Mode says how Open opens a file.
type Mode int

const (
	ReadOnly   Mode = iota // read-only, locked against writers (qemu's protocol)
	Writable               // read-write, locked against other writers and readers' writes
	ForceShare             // read-only, no lock at all (qemu-img -U)
	// Salvage is ReadOnly that reads around damage rather than refusing it (each
	// format says what it can; image.Noter says what it did). A file no format
	// claims opens as the data of a fixed VHD whose footer is gone.
	Salvage
	SalvageForceShare // Salvage without any lock
)

func (m Mode) salvage() bool { return m == Salvage || m == SalvageForceShare }

func (m Mode) noLock() bool { return m == ForceShare || m == SalvageForceShare }

// format is one format vhdfs knows: how to open a file with it, and the error that
// says the file is not of this format (as opposed to a damaged one of it).
type format struct {
	name    string
	open    func(path string, m Mode) (image.Image, error)
	notMine error
}

// VHD first: its check of the file's two ends is as cheap as VHDX's signature, and
// a file no format claims then says what a VHD would need first.
var formats = []format{
	{"VHD", openVHD, vhd.ErrNotVHD},
	{"VHDX", openVHDX, vhdx.ErrNotVHDX},
}

func openVHD(path string, m Mode) (image.Image, error) {
	var img *vhd.Image
	var err error
	switch {
	case m.salvage():
		img, err = vhd.OpenSalvage(path, m.noLock())
	case m == ForceShare:
		img, err = vhd.OpenForceShare(path)
	default:
		img, err = vhd.Open(path, m == Writable)
	}
	if err != nil {
		return nil, err
	}
	return img, nil
}

func openVHDX(path string, m Mode) (image.Image, error) {
	var img *vhdx.Image
	var err error
	switch {
	case m.salvage():
		img, err = vhdx.OpenSalvage(path, m.noLock())
	case m.noLock():
		img, err = vhdx.OpenForceShare(path)
	default:
		img, err = vhdx.Open(path, m == Writable)
	}
	if err != nil {
		return nil, err
	}
	return img, nil
}

// Open opens the image at path with the first format that claims it. A file that no
// format claims gives an error that wraps image.ErrUnknownFormat and says why each
// format refused it, or what the file is when it has another format's signature
// (OtherFormat), with how to convert it.
func Open(path string, m Mode) (image.Image, error) {
	// A device or a FIFO is refused before any format opens it.
	if err := fileio.CheckRegular(path); err != nil {
		return nil, err
	}
	var why []string
	var errs []error
	for _, f := range formats {
		img, err := f.open(path, m)
		if err == nil {
			return img, nil
		}
		if !errors.Is(err, f.notMine) {
			// A short text VMDK descriptor is a truncated VHD to the VHD reader:
			// another image format's signature says more than the damage found.
			if o, ok := OtherFormat(path); ok && o.Name != "raw" {
				return nil, otherError(path, o, err)
			}
			return nil, err
		}
		why = append(why, fmt.Sprintf("as %s: %s", f.name, strings.TrimPrefix(err.Error(), path+": ")))
		errs = append(errs, err)
	}
	if m.salvage() {
		if img, err := vhd.OpenSalvageRaw(path, m.noLock()); err == nil {
			return img, nil
		}
	}
	if o, ok := OtherFormat(path); ok {
		// Say what the file is, rather than why it is neither VHD nor VHDX.
		return nil, otherError(path, o, errs...)
	}
	return nil, &unknownError{msg: fmt.Sprintf("%s: %s: %v", path, strings.Join(why, "; "), image.ErrUnknownFormat), errs: append(errs, image.ErrUnknownFormat)}
}

// otherError is the error for a file of another format, o: it says what the file is
// and how to convert it, and wraps errs (the formats' refusals) and
// image.ErrUnknownFormat.
func otherError(path string, o Other, errs ...error) error {
	return &unknownError{msg: fmt.Sprintf("%s: %s, not VHD or VHDX (%s)", path, o.Describe(), convertHint(path, o)),
		errs: append(errs, image.ErrUnknownFormat)}
}

// unknownError says why no format claimed a file; it wraps every format's refusal
// and image.ErrUnknownFormat.
type unknownError struct {
	msg  string
	errs []error
}

func (e *unknownError) Error() string   { return e.msg }
func (e *unknownError) Unwrap() []error { return e.errs }

// Signed reports whether the file at path has the signature of a format vhdfs knows
// where that format puts it: such a file is an image of that format, even one that
// does not open; a file without is no image. It reads a few bytes, never follows
// anything the file says, and opens only a regular file (else false).
func Signed(path string) (bool, error) {
	f, err := fileio.OpenRegular(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOCTTY)
	if errors.Is(err, fileio.ErrNotRegular) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return false, err
	}
	return vhd.HasSignature(f, st.Size()) || vhdx.HasSignature(f, st.Size()), nil
}
