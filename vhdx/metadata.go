package vhdx

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"unicode/utf16"
)

// The metadata region (MS-VHDX §2.6): a 64 KiB table, then the items it points at.
const (
	metadataTableSize = 64 * KiB
	metadataHeaderLen = 32
	metadataEntryLen  = 32
	maxMetadataItems  = 2047

	minBlockSize     = 1 * MiB
	maxBlockSize     = 256 * MiB
	maxVirtualSize   = 64 << 40
	maxLocatorLength = 1 * MiB
)

// MaxSize is the largest virtual size of a VHDX: 64 TiB.
const MaxSize int64 = maxVirtualSize

// metadataTableHeader is the start of the metadata table (§2.6.1.1).
type metadataTableHeader struct {
	Signature  [8]byte  // "metadata", at 0
	Reserved   uint16   // at 8
	EntryCount uint16   // at 10: at most 2047
	Reserved2  [20]byte // at 12
}

// MetadataEntry is one entry of the metadata table (§2.6.1.2).
type MetadataEntry struct {
	ItemID   GUID   // at 0
	Offset   uint32 // at 16: from the start of the region, at least 64 KiB
	Length   uint32 // at 20
	Flags    uint32 // at 24: bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired
	Reserved uint32 // at 28
}

const (
	itemIsUser        = 1 << 0
	itemIsVirtualDisk = 1 << 1
	itemIsRequired    = 1 << 2
)

// fileParameters is the File Parameters item (§2.6.2.1).
type fileParameters struct {
	BlockSize uint32 // at 0
	Flags     uint32 // at 4: bit 0 LeaveBlockAllocated, bit 1 HasParent
}

// KeyValue is one parent locator entry (§2.6.2.6.2), decoded from UTF-16LE.
type KeyValue struct{ Key, Value string }

// Metadata holds the known metadata items of an image.
type Metadata struct {
	BlockSize           uint32
	LeaveBlockAllocated bool
	HasParent           bool
	VirtualDiskSize     uint64
	LogicalSectorSize   uint32
	PhysicalSectorSize  uint32
	Page83Data          GUID       // the VirtualDiskId; children copy it
	LocatorType         GUID       // zero without a parent locator
	ParentLocator       []KeyValue // in the order of the file
}

// locatorHeader starts the parent locator item (§2.6.2.6.1).
type locatorHeader struct {
	LocatorType   GUID   // at 0
	Reserved      uint16 // at 16
	KeyValueCount uint16 // at 18
}

// locatorEntry is one key/value entry's place (§2.6.2.6.2), relative to the item.
type locatorEntry struct {
	KeyOffset   uint32 // at 0
	ValueOffset uint32 // at 4
	KeyLength   uint16 // at 8
	ValueLength uint16 // at 10
}

const (
	locatorHeaderLen = 20
	locatorEntryLen  = 12
)

// readMetadata reads and checks the metadata region at off, length n.
func (img *Image) readMetadata(off, n int64) (*Metadata, error) {
	name := img.name
	tbl := make([]byte, metadataTableSize)
	if err := img.src.readAt(tbl, off); err != nil {
		return nil, fmt.Errorf("%s: read metadata table at %d: %w", name, off, err)
	}
	var h metadataTableHeader
	if _, err := binary.Decode(tbl, binary.LittleEndian, &h); err != nil {
		return nil, fmt.Errorf("%s: metadata table at %d: %w", name, off, ErrCorrupt)
	}
	if string(h.Signature[:]) != "metadata" {
		return nil, fmt.Errorf("%s: metadata table at %d: signature is %q, want \"metadata\": %w", name, off, h.Signature[:], ErrCorrupt)
	}
	if h.EntryCount > maxMetadataItems {
		return nil, fmt.Errorf("%s: metadata table at %d: entry count %d exceeds %d: %w", name, off, h.EntryCount, maxMetadataItems, ErrCorrupt)
	}
	entries := make([]MetadataEntry, h.EntryCount)
	if _, err := binary.Decode(tbl[metadataHeaderLen:], binary.LittleEndian, entries); err != nil {
		return nil, fmt.Errorf("%s: metadata table at %d: %w", name, off, ErrCorrupt)
	}
	items := map[GUID][]byte{}
	for i, e := range entries {
		what := fmt.Sprintf("metadata item %d (%v)", i, e.ItemID)
		if e.Length > 0 && (int64(e.Offset) < metadataTableSize || int64(e.Offset)+int64(e.Length) > n) {
			return nil, fmt.Errorf("%s: %s at offset %d, length %d, lies outside the metadata region (64 KiB to %d): %w", name, what, e.Offset, e.Length, n, ErrCorrupt)
		}
		known := e.Flags&itemIsUser == 0 && isKnownItem(e.ItemID)
		if !known {
			if e.Flags&itemIsRequired != 0 {
				return nil, fmt.Errorf("%s: %s is required but not known: %w", name, what, ErrUnsupported)
			}
			continue
		}
		if _, dup := items[e.ItemID]; dup {
			return nil, fmt.Errorf("%s: %s appears twice: %w", name, what, ErrCorrupt)
		}
		if e.ItemID == ItemParentLocator && e.Length > maxLocatorLength {
			return nil, fmt.Errorf("%s: parent locator item of %d bytes exceeds %d: %w", name, e.Length, maxLocatorLength, ErrUnsupported)
		}
		b := make([]byte, e.Length)
		if err := img.src.readAt(b, off+int64(e.Offset)); err != nil {
			return nil, fmt.Errorf("%s: read %s at %d: %w", name, what, off+int64(e.Offset), err)
		}
		items[e.ItemID] = b
	}
	return parseItems(items, name)
}

func isKnownItem(id GUID) bool {
	switch id {
	case ItemFileParameters, ItemVirtualDiskSize, ItemPage83Data, ItemLogicalSectorSize, ItemPhysicalSectorSize, ItemParentLocator:
		return true
	}
	return false
}

// parseItems decodes and checks the known items.
func parseItems(items map[GUID][]byte, name string) (*Metadata, error) {
	m := &Metadata{}
	need := func(id GUID, what string, n int) ([]byte, error) {
		b, ok := items[id]
		if !ok {
			return nil, fmt.Errorf("%s: metadata has no %s item: %w", name, what, ErrCorrupt)
		}
		if len(b) < n {
			return nil, fmt.Errorf("%s: metadata %s item is %d bytes, want %d: %w", name, what, len(b), n, ErrCorrupt)
		}
		return b, nil
	}
	b, err := need(ItemFileParameters, "file parameters", 8)
	if err != nil {
		return nil, err
	}
	var fp fileParameters
	_, _ = binary.Decode(b, binary.LittleEndian, &fp)
	m.BlockSize, m.LeaveBlockAllocated, m.HasParent = fp.BlockSize, fp.Flags&1 != 0, fp.Flags&2 != 0
	if fp.BlockSize < minBlockSize || fp.BlockSize > maxBlockSize || bits.OnesCount32(fp.BlockSize) != 1 {
		return nil, fmt.Errorf("%s: block size %d is not a power of two from 1 MiB to 256 MiB: %w", name, fp.BlockSize, ErrCorrupt)
	}
	for _, s := range []struct {
		id   GUID
		what string
		dst  *uint32
	}{{ItemLogicalSectorSize, "logical sector size", &m.LogicalSectorSize}, {ItemPhysicalSectorSize, "physical sector size", &m.PhysicalSectorSize}} {
		b, err := need(s.id, s.what, 4)
		if err != nil {
			return nil, err
		}
		*s.dst = binary.LittleEndian.Uint32(b)
		if *s.dst != 512 && *s.dst != 4096 {
			return nil, fmt.Errorf("%s: %s is %d, want 512 or 4096: %w", name, s.what, *s.dst, ErrCorrupt)
		}
	}
	if b, err = need(ItemVirtualDiskSize, "virtual disk size", 8); err != nil {
		return nil, err
	}
	m.VirtualDiskSize = binary.LittleEndian.Uint64(b)
	if m.VirtualDiskSize == 0 || m.VirtualDiskSize > maxVirtualSize || m.VirtualDiskSize%uint64(m.LogicalSectorSize) != 0 {
		return nil, fmt.Errorf("%s: virtual disk size %d is not a positive multiple of the logical sector size %d up to 64 TiB: %w", name, m.VirtualDiskSize, m.LogicalSectorSize, ErrCorrupt)
	}
	if b, err = need(ItemPage83Data, "page 83 data", 16); err != nil {
		return nil, err
	}
	copy(m.Page83Data[:], b)
	b, ok := items[ItemParentLocator]
	switch {
	case m.HasParent && !ok:
		return nil, fmt.Errorf("%s: file parameters say the image has a parent, but there is no parent locator item: %w", name, ErrCorrupt)
	case ok:
		if err := m.parseLocator(b, name); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// parseLocator decodes the parent locator item b (§2.6.2.6). Offsets are relative to
// the start of the item; keys and values are UTF-16LE without terminators.
func (m *Metadata) parseLocator(b []byte, name string) error {
	var h locatorHeader
	if _, err := binary.Decode(b, binary.LittleEndian, &h); err != nil {
		return fmt.Errorf("%s: parent locator item of %d bytes is shorter than its header: %w", name, len(b), ErrCorrupt)
	}
	if h.LocatorType != LocatorTypeVHDX {
		return fmt.Errorf("%s: parent locator type %v is not the VHDX type %v: %w", name, h.LocatorType, LocatorTypeVHDX, ErrUnsupported)
	}
	if locatorHeaderLen+int(h.KeyValueCount)*locatorEntryLen > len(b) {
		return fmt.Errorf("%s: parent locator: %d entries do not fit in %d bytes: %w", name, h.KeyValueCount, len(b), ErrCorrupt)
	}
	entries := make([]locatorEntry, h.KeyValueCount)
	_, _ = binary.Decode(b[locatorHeaderLen:], binary.LittleEndian, entries)
	seen := map[string]bool{}
	str := func(i int, what string, off uint32, n uint16) (string, error) {
		if int64(off)+int64(n) > int64(len(b)) || n%2 != 0 {
			return "", fmt.Errorf("%s: parent locator entry %d: %s at %d, length %d, lies outside the %d-byte item or is not UTF-16: %w", name, i, what, off, n, len(b), ErrCorrupt)
		}
		u := make([]uint16, n/2)
		for k := range u {
			u[k] = binary.LittleEndian.Uint16(b[int(off)+2*k:])
		}
		return string(utf16.Decode(u)), nil
	}
	m.LocatorType = h.LocatorType
	for i, e := range entries {
		if e.KeyLength == 0 {
			return fmt.Errorf("%s: parent locator entry %d has an empty key: %w", name, i, ErrCorrupt)
		}
		k, err := str(i, "key", e.KeyOffset, e.KeyLength)
		if err != nil {
			return err
		}
		v, err := str(i, "value", e.ValueOffset, e.ValueLength)
		if err != nil {
			return err
		}
		if seen[k] {
			return fmt.Errorf("%s: parent locator key %q appears twice: %w", name, k, ErrCorrupt)
		}
		seen[k] = true
		m.ParentLocator = append(m.ParentLocator, KeyValue{k, v})
	}
	return nil
}
