package vhd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"time"

	"github.com/vhdfs/vhdfs/image"
)

// Sizes of the on-disk structures, in bytes.
const (
	SectorSize = 512
	FooterSize = 512
	HeaderSize = 1024
)

// DiskType is the footer's Disk Type field; image.Type has its values.
type DiskType = image.Type

// Disk types from the specification; the others are deprecated or reserved.
const (
	TypeFixed        = image.Fixed
	TypeDynamic      = image.Dynamic
	TypeDifferencing = image.Differencing
)

var (
	footerCookie = [8]byte{'c', 'o', 'n', 'e', 'c', 't', 'i', 'x'}
	headerCookie = [8]byte{'c', 'x', 's', 'p', 'a', 'r', 's', 'e'}
)

const (
	featureReserved = 0x2 // "must be set to 1" by the specification
	formatVersion   = 0x00010000
	noDataOffset    = ^uint64(0)
	// maxDynamicSize is qemu's VHD_MAX_SECTORS: 32-bit sector offsets in the BAT.
	maxDynamicSize = 0xff000000 * SectorSize
)

// MaxDynamicSize is the largest virtual size of a dynamic or differencing VHD: 2040
// GiB (qemu's VHD_MAX_SECTORS; Microsoft's limit too).
const MaxDynamicSize int64 = maxDynamicSize

// vhdEpoch is the zero of VHD time stamps: 2000-01-01 00:00:00 UTC.
var vhdEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// Geometry is the CHS geometry of the footer (offset 56).
type Geometry struct {
	Cylinders uint16
	Heads     uint8
	Sectors   uint8
}

// Bytes is the size the geometry describes.
func (g Geometry) Bytes() int64 {
	return int64(g.Cylinders) * int64(g.Heads) * int64(g.Sectors) * SectorSize
}

// Footer is the hard disk footer (specification: "Hard Disk Footer Format").
type Footer struct {
	Cookie         [8]byte  // 0
	Features       uint32   // 8
	FormatVersion  uint32   // 12
	DataOffset     uint64   // 16: dynamic header offset; all ones for fixed disks
	Timestamp      uint32   // 24: seconds since 2000-01-01 UTC
	CreatorApp     [4]byte  // 28
	CreatorVersion uint32   // 32
	CreatorHostOS  uint32   // 36
	OriginalSize   uint64   // 40
	CurrentSize    uint64   // 48: the disk size
	Geometry       Geometry // 56
	DiskType       DiskType // 60
	Checksum       uint32   // 64
	UniqueID       UUID     // 68
	SavedState     uint8    // 84
	Reserved       [427]byte
}

// checksum is the ones' complement of the byte sum with the checksum field
// (at checksumOff, 4 bytes) taken as zero.
func checksum(b []byte, checksumOff int) uint32 {
	var sum uint32
	for i, c := range b {
		if i >= checksumOff && i < checksumOff+4 {
			continue
		}
		sum += uint32(c)
	}
	return ^sum
}

const footerChecksumOff = 64

// Marshal encodes the footer with a fresh checksum. It works on a copy: an open
// image's footer is read by other goroutines while a writer marshals it.
func (f Footer) Marshal() []byte { return marshalSummed(f, FooterSize, footerChecksumOff) }

// marshalSummed encodes a footer or a header, given by value, big-endian, and puts
// the checksum of the result at sumOff.
func marshalSummed(v any, size, sumOff int) []byte {
	var buf bytes.Buffer
	buf.Grow(size)
	_ = binary.Write(&buf, binary.BigEndian, v)
	b := buf.Bytes()
	binary.BigEndian.PutUint32(b[sumOff:], checksum(b, sumOff))
	return b
}

// parseFooter decodes 512 bytes (a 511-byte footer is passed zero-padded) and checks
// the cookie and the checksum. what names the place for errors ("footer at 1024").
func parseFooter(b []byte, name, what string) (*Footer, error) {
	var f Footer
	if err := binary.Read(bytes.NewReader(b[:FooterSize]), binary.BigEndian, &f); err != nil {
		return nil, fmt.Errorf("%s: %s: %w", name, what, err)
	}
	if f.Cookie != footerCookie {
		// Not a VHD, maybe not ours to show: never quote its bytes.
		return nil, fmt.Errorf("%s: %s: no VHD footer: cookie is not \"conectix\": %w", name, what, ErrNotVHD)
	}
	if sum := checksum(b[:FooterSize], footerChecksumOff); sum != f.Checksum {
		return nil, fmt.Errorf("%s: %s: checksum field is %#08x, computed %#08x: %w", name, what, f.Checksum, sum, ErrChecksum)
	}
	return &f, nil
}

// validate checks the fields every image type shares; fileSize is the file's length.
func (f *Footer) validate(name string) error {
	if f.FormatVersion>>16 != formatVersion>>16 {
		return fmt.Errorf("%s: footer file format version %#08x, want 0x00010000: %w", name, f.FormatVersion, ErrUnsupported)
	}
	switch f.DiskType {
	case TypeFixed, TypeDynamic, TypeDifferencing:
	default:
		return fmt.Errorf("%s: footer disk type %d is not fixed (2), dynamic (3) or differencing (4): %w", name, f.DiskType, ErrUnsupported)
	}
	if f.CurrentSize == 0 || f.CurrentSize%SectorSize != 0 {
		return fmt.Errorf("%s: footer current size %d is not a positive multiple of 512: %w", name, f.CurrentSize, ErrCorrupt)
	}
	if f.DiskType != TypeFixed {
		if f.CurrentSize > maxDynamicSize {
			return fmt.Errorf("%s: footer current size %d exceeds the %d bytes a BAT can address: %w", name, f.CurrentSize, uint64(maxDynamicSize), ErrCorrupt)
		}
		if f.DataOffset == noDataOffset || f.DataOffset%SectorSize != 0 || f.DataOffset < FooterSize {
			return fmt.Errorf("%s: footer data offset %#x is not a sector-aligned header offset: %w", name, f.DataOffset, ErrCorrupt)
		}
	}
	return nil
}

// Time converts a VHD time stamp to a time.
func Time(ts uint32) time.Time { return vhdEpoch.Add(time.Duration(ts) * time.Second) }

// Timestamp converts a time to a VHD time stamp (clamped to the epoch).
func Timestamp(t time.Time) uint32 {
	d := t.Sub(vhdEpoch)
	if d < 0 {
		return 0
	}
	return uint32(d / time.Second)
}

func printable(b []byte) string {
	out := make([]byte, len(b))
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			c = '.'
		}
		out[i] = c
	}
	return string(out)
}

// HasSignature reports whether the file r, of size bytes, has the footer's cookie
// where a VHD puts it: its footer at the end (512 bytes, or 511 as old Virtual PC
// wrote it) or the footer's copy at offset 0. A file that has it is a VHD, however
// damaged the rest.
func HasSignature(r io.ReaderAt, size int64) bool {
	for _, off := range []int64{0, size - FooterSize, size - FooterSize + 1} {
		var b [8]byte
		if off >= 0 && off+8 <= size {
			if _, err := r.ReadAt(b[:], off); err == nil && b == footerCookie {
				return true
			}
		}
	}
	return false
}
