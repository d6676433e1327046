package vhd

import (
	"bytes"
	"fmt"
	"math/bits"
	"os"
	"time"

	"github.com/vhdfs/vhdfs/internal/faults"
)

// CreatorApp is what vhdfs writes into the footer's Creator Application field.
var CreatorApp = [4]byte{'v', 'h', 'd', 'f'}

const (
	creatorVersion = 0x00010000
	hostOSWindows  = 0x5769326B // "Wi2k", what qemu and Windows write
)

// CreateOptions describe a new image.
type CreateOptions struct {
	// Type is TypeFixed, TypeDynamic or TypeDifferencing.
	Type DiskType
	// Size is the requested virtual size; rounded up to a whole CHS geometry unless
	// ExactSize. Ignored for differencing images, which take the parent's size.
	Size      int64
	ExactSize bool
	// BlockSize of dynamic and differencing images; 0 means 2 MiB (differencing:
	// the parent's block size if it has one).
	BlockSize int64
	// Parent of a differencing image, open, and the path it was found at.
	Parent     *Image
	ParentPath string
	// LocatorPath is the path the locators are computed from when the image is
	// written somewhere else first (a temporary file renamed into place); default name.
	LocatorPath string
	// UniqueID of the new image; zero means a new random one. A merge gives the
	// image that replaces a merged top that top's ID.
	UniqueID UUID
	// ParentID recorded in a differencing image; zero means the parent's own.
	ParentID UUID
}

// Create writes a new image at name, which must not exist, and syncs it.
func Create(name string, opts CreateOptions) error {
	b, err := build(opts)
	if err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	if opts.LocatorPath == "" {
		opts.LocatorPath = name
	}
	if opts.Type == TypeDifferencing {
		pid := opts.ParentID
		if pid.IsZero() {
			pid = opts.Parent.footer.UniqueID
		}
		locs, err := parentFields(b.header, pid, opts.ParentPath, opts.LocatorPath)
		if err != nil {
			return fmt.Errorf("create %s: %w", name, err)
		}
		b.locData, b.end = reserveLocators(b.header, locs, b.end)
	}
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	err = faults.Step()
	if err == nil {
		err = b.write(f)
	}
	if err == nil {
		err = faults.Step()
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(name)
		return fmt.Errorf("create %s: %w", name, err)
	}
	return nil
}

type builder struct {
	footer  Footer
	header  *Header
	locData map[int][]byte // locator slot → data
	end     int64          // where the end footer goes
}

func build(opts CreateOptions) (*builder, error) {
	b := &builder{}
	f := &b.footer
	f.Cookie = footerCookie
	f.Features = featureReserved
	f.FormatVersion = formatVersion
	f.Timestamp = Timestamp(time.Now())
	f.CreatorApp = CreatorApp
	f.CreatorVersion = creatorVersion
	f.CreatorHostOS = hostOSWindows
	f.DiskType = opts.Type
	f.UniqueID = opts.UniqueID
	if f.UniqueID.IsZero() {
		f.UniqueID = NewUUID()
	}

	size := opts.Size
	blockSize := opts.BlockSize
	switch opts.Type {
	case TypeDifferencing:
		if opts.Parent == nil {
			return nil, fmt.Errorf("differencing image needs a parent: %w", ErrInvalidArg)
		}
		size = opts.Parent.Size()
		if blockSize == 0 {
			blockSize = opts.Parent.BlockSize()
		}
		f.Geometry = opts.Parent.footer.Geometry
	case TypeFixed, TypeDynamic:
		if size <= 0 {
			return nil, fmt.Errorf("size %d must be positive: %w", size, ErrInvalidArg)
		}
		if !opts.ExactSize {
			size = RoundUpCHS(size)
		} else if size%SectorSize != 0 {
			return nil, fmt.Errorf("exact size %d is not a multiple of 512: %w", size, ErrInvalidArg)
		}
		f.Geometry = CHS(size)
		if f.Geometry.Bytes() != size {
			// No geometry describes an exact size: write the 65535/16/255 marker,
			// as qemu's force_size and Azure do, which tells qemu (and every tool
			// that sizes by geometry) to use the current size instead.
			f.Geometry = MaxGeometry
		}
	default:
		return nil, fmt.Errorf("disk type %v: %w", opts.Type, ErrInvalidArg)
	}
	f.OriginalSize, f.CurrentSize = uint64(size), uint64(size)
	if opts.Type == TypeFixed {
		f.DataOffset = noDataOffset
		b.end = size
		return b, nil
	}
	if size > maxDynamicSize {
		return nil, fmt.Errorf("size %d exceeds the %d bytes a dynamic image can hold: %w", size, int64(maxDynamicSize), ErrInvalidArg)
	}
	if blockSize == 0 {
		blockSize = DefaultBlockSize
	}
	if blockSize < SectorSize || blockSize > MaxBlockSize || bits.OnesCount64(uint64(blockSize)) != 1 {
		return nil, fmt.Errorf("block size %d is not a power of two from 512 to %d: %w", blockSize, MaxBlockSize, ErrInvalidArg)
	}
	entries := (size + blockSize - 1) / blockSize
	if entries > maxBATEntries {
		return nil, fmt.Errorf("size %d in blocks of %d needs %d BAT entries, more than %d: use a larger block size: %w", size, blockSize, entries, maxBATEntries, ErrInvalidArg)
	}
	f.DataOffset = FooterSize
	h := &Header{
		Cookie:          headerCookie,
		DataOffset:      noDataOffset,
		TableOffset:     FooterSize + HeaderSize,
		HeaderVersion:   formatVersion,
		MaxTableEntries: uint32(entries),
		BlockSize:       uint32(blockSize),
	}
	b.header = h
	b.end = int64(h.TableOffset) + roundUp(entries*4, SectorSize)
	return b, nil
}

func (b *builder) write(f *os.File) error {
	foot := b.footer.Marshal()
	if b.header == nil {
		if err := f.Truncate(b.end); err != nil {
			return err
		}
		_, err := f.WriteAt(foot, b.end)
		return err
	}
	// Footer copy and header; the BAT in pieces of all-ones (unallocated); the
	// locator data; the footer.
	if _, err := f.WriteAt(append(foot, b.header.Marshal()...), 0); err != nil {
		return err
	}
	batEnd := int64(b.header.TableOffset) + roundUp(int64(b.header.MaxTableEntries)*4, SectorSize)
	ones := bytes.Repeat([]byte{0xff}, 1<<20)
	for off := int64(b.header.TableOffset); off < batEnd; off += int64(len(ones)) {
		if _, err := f.WriteAt(ones[:min(int64(len(ones)), batEnd-off)], off); err != nil {
			return err
		}
	}
	for slot, data := range b.locData {
		if _, err := f.WriteAt(data, int64(b.header.ParentLocators[slot].PlatformDataOffset)); err != nil {
			return err
		}
	}
	_, err := f.WriteAt(foot, b.end)
	return err
}
