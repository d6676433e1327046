package probe

import (
	"fmt"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/vhd"
	"github.com/vhdfs/vhdfs/vhdx"
)

// CreateOptions describe a new base image (fixed or dynamic) for Create.
type CreateOptions struct {
	Format string     // "vhd" or "vhdx"
	Type   image.Type // image.Fixed or image.Dynamic
	// Size is the virtual size. A VHD's is rounded up to a whole CHS geometry unless
	// ExactSize (a multiple of 512, then); a VHDX's is a multiple of its logical
	// sector.
	Size      int64
	ExactSize bool // VHD only
	// BlockSize of a dynamic image; 0 for the format's default (DefaultBlockSize).
	BlockSize int64
	// LogicalSector and PhysicalSector sizes of a VHDX: 512 or 4096; 0 for the
	// defaults (512 and 4096). A VHD has 512-byte sectors: anything else is refused.
	LogicalSector, PhysicalSector int64
}

// Create makes a new base image at path, which must not exist, in the format o
// names, and syncs it. Options the format cannot take return an error wrapping
// image.ErrInvalidArg before anything is made.
func Create(path string, o CreateOptions) error {
	if o.Type != image.Fixed && o.Type != image.Dynamic {
		return fmt.Errorf("create %s: type %v: want fixed or dynamic: %w", path, o.Type, image.ErrInvalidArg)
	}
	switch o.Format {
	case "vhd":
		if o.LogicalSector != 0 && o.LogicalSector != vhd.SectorSize || o.PhysicalSector != 0 && o.PhysicalSector != vhd.SectorSize {
			return fmt.Errorf("create %s: a VHD has 512-byte sectors: %w", path, image.ErrInvalidArg)
		}
		return vhd.Create(path, vhd.CreateOptions{Type: o.Type, Size: o.Size, ExactSize: o.ExactSize, BlockSize: o.BlockSize})
	case "vhdx":
		if o.ExactSize {
			return fmt.Errorf("create %s: exact size is for VHD: a VHDX keeps the size asked for: %w", path, image.ErrInvalidArg)
		}
		return vhdx.Create(path, vhdx.CreateOptions{Type: o.Type, Size: o.Size, BlockSize: o.BlockSize,
			LogicalSectorSize: o.LogicalSector, PhysicalSectorSize: o.PhysicalSector})
	}
	return fmt.Errorf("create %s: format %q: want vhd or vhdx: %w", path, o.Format, image.ErrInvalidArg)
}

// DefaultBlockSize is the block size Create and CreateChild give an image of format
// when asked for none: VHD 2 MiB; VHDX 32 MiB for a base and 2 MiB for a
// differencing image, as Hyper-V makes them.
func DefaultBlockSize(format string, differencing bool) int64 {
	switch {
	case format == "vhdx" && differencing:
		return vhdx.DefaultDifferencingBlockSize
	case format == "vhdx":
		return vhdx.DefaultBlockSize
	}
	return vhd.DefaultBlockSize
}

// MaxSize is the largest virtual size an image of format ("vhd" or "vhdx") and type t
// can have: 2040 GiB for a dynamic VHD (its BAT holds 32-bit sector offsets), 64 TiB
// for a VHDX; 0 where the format sets no limit of its own (a fixed VHD).
func MaxSize(format string, t image.Type) int64 {
	switch {
	case format == "vhdx":
		return vhdx.MaxSize
	case format == "vhd" && t != image.Fixed:
		return vhd.MaxDynamicSize
	}
	return 0
}
