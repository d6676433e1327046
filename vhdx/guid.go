package vhdx

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/vhdfs/vhdfs/image"
)

// GUID is a GUID as VHDX stores it (MS-VHDX §2.2.3.2): the first three fields
// little-endian, the last eight bytes as they are. String gives the usual form.
type GUID [16]byte

// IsZero reports whether g is all zeros.
func (g GUID) IsZero() bool { return g == GUID{} }

// String is the lowercase canonical form, without braces.
func (g GUID) String() string {
	return fmt.Sprintf("%08x-%04x-%04x-%x-%x", binary.LittleEndian.Uint32(g[0:]),
		binary.LittleEndian.Uint16(g[4:]), binary.LittleEndian.Uint16(g[6:]), g[8:10], g[10:16])
}

// ParseGUID reads the canonical form, with or without braces, in either case.
func ParseGUID(s string) (GUID, error) {
	var g GUID
	t := strings.TrimSuffix(strings.TrimPrefix(s, "{"), "}")
	parts := strings.Split(t, "-")
	if len(parts) != 5 || len(parts[0]) != 8 || len(parts[1]) != 4 || len(parts[2]) != 4 || len(parts[3]) != 4 || len(parts[4]) != 12 {
		return g, fmt.Errorf("GUID %q: %w", s, ErrInvalidArg)
	}
	b, err := hex.DecodeString(strings.Join(parts, ""))
	if err != nil {
		return g, fmt.Errorf("GUID %q: %w", s, ErrInvalidArg)
	}
	binary.LittleEndian.PutUint32(g[0:], binary.BigEndian.Uint32(b[0:]))
	binary.LittleEndian.PutUint16(g[4:], binary.BigEndian.Uint16(b[4:]))
	binary.LittleEndian.PutUint16(g[6:], binary.BigEndian.Uint16(b[6:]))
	copy(g[8:], b[8:])
	return g, nil
}

// NewGUID returns a random (version 4) GUID.
func NewGUID() GUID {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	g, _ := ParseGUID(fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]))
	return g
}

// ID is g in the byte order of its text form, as package image keeps IDs.
func (g GUID) ID() image.ID {
	var u image.ID
	binary.BigEndian.PutUint32(u[0:], binary.LittleEndian.Uint32(g[0:]))
	binary.BigEndian.PutUint16(u[4:], binary.LittleEndian.Uint16(g[4:]))
	binary.BigEndian.PutUint16(u[6:], binary.LittleEndian.Uint16(g[6:]))
	copy(u[8:], g[8:])
	return u
}

// GUIDOf is the GUID whose ID is id: its first three fields turned little-endian.
func GUIDOf(id image.ID) GUID {
	var g GUID
	binary.LittleEndian.PutUint32(g[0:], binary.BigEndian.Uint32(id[0:]))
	binary.LittleEndian.PutUint16(g[4:], binary.BigEndian.Uint16(id[4:]))
	binary.LittleEndian.PutUint16(g[6:], binary.BigEndian.Uint16(id[6:]))
	copy(g[8:], id[8:])
	return g
}

func mustGUID(s string) GUID {
	g, err := ParseGUID(s)
	if err != nil {
		panic(err)
	}
	return g
}

// Region and metadata item IDs (MS-VHDX §2.2.3.2, §2.6.2).
var (
	RegionBAT      = mustGUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
	RegionMetadata = mustGUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

	ItemFileParameters     = mustGUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
	ItemVirtualDiskSize    = mustGUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
	ItemPage83Data         = mustGUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
	ItemLogicalSectorSize  = mustGUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
	ItemPhysicalSectorSize = mustGUID("CDA348C7-445D-4471-9CC9-E9885251C556")
	ItemParentLocator      = mustGUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

	// LocatorTypeVHDX is the parent locator type of a VHDX parent (§2.6.2.6.3).
	LocatorTypeVHDX = mustGUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
)
