package vhd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"
)

// Header is the dynamic disk header (specification: "Dynamic Disk Header Format").
type Header struct {
	Cookie            [8]byte    // 0
	DataOffset        uint64     // 8: unused, all ones
	TableOffset       uint64     // 16: absolute offset of the BAT
	HeaderVersion     uint32     // 24
	MaxTableEntries   uint32     // 28
	BlockSize         uint32     // 32: data bytes per block, bitmap excluded
	Checksum          uint32     // 36
	ParentUniqueID    UUID       // 40
	ParentTimestamp   uint32     // 56
	Reserved1         uint32     // 60
	ParentUnicodeName [512]byte  // 64: UTF-16BE, NUL padded
	ParentLocators    [8]Locator // 576
	Reserved2         [256]byte  // 768
}

// Locator is a parent locator entry (24 bytes at header offset 576 + 24·i).
type Locator struct {
	PlatformCode       uint32 // 0
	PlatformDataSpace  uint32 // 4: sectors by the specification, bytes in practice
	PlatformDataLength uint32 // 8
	Reserved           uint32 // 12
	PlatformDataOffset uint64 // 16
}

const (
	headerChecksumOff = 36
	// DefaultBlockSize is the block size Windows and qemu use.
	DefaultBlockSize = 2 << 20
	// MaxBlockSize is the largest power of two the header's 32-bit field holds.
	MaxBlockSize = 1 << 31
	// maxBATEntries: a BAT entry is a 32-bit sector offset, so no file holds more
	// blocks than this, and Create refuses to make a larger table.
	maxBATEntries = 1 << 26
)

// Marshal encodes the header with a fresh checksum.
func (h Header) Marshal() []byte { return marshalSummed(h, HeaderSize, headerChecksumOff) }

func parseHeader(b []byte, name string, off int64) (*Header, error) {
	var h Header
	if err := binary.Read(bytes.NewReader(b), binary.BigEndian, &h); err != nil {
		return nil, fmt.Errorf("%s: dynamic header at %d: %w", name, off, err)
	}
	if h.Cookie != headerCookie {
		return nil, fmt.Errorf("%s: dynamic header at %d: cookie is %q, want \"cxsparse\": %w", name, off, printable(h.Cookie[:]), ErrCorrupt)
	}
	if sum := checksum(b, headerChecksumOff); sum != h.Checksum {
		return nil, fmt.Errorf("%s: dynamic header at %d: checksum field is %#08x, computed %#08x: %w", name, off, h.Checksum, sum, ErrChecksum)
	}
	if h.HeaderVersion>>16 != formatVersion>>16 {
		return nil, fmt.Errorf("%s: dynamic header version %#08x, want 0x00010000: %w", name, h.HeaderVersion, ErrUnsupported)
	}
	if h.BlockSize < SectorSize || bits.OnesCount32(h.BlockSize) != 1 {
		return nil, fmt.Errorf("%s: dynamic header block size %d is not a power of two of at least 512: %w", name, h.BlockSize, ErrCorrupt)
	}
	return &h, nil
}

// bitmapBytes is the size of a block's sector bitmap, padded to whole sectors.
func bitmapBytes(blockSize uint32) int64 {
	n := (int64(blockSize)/SectorSize + 7) / 8 // one bit per sector, rounded up to a byte
	return (n + SectorSize - 1) / SectorSize * SectorSize
}
