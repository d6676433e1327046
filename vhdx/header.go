package vhdx

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
)

// The header section (MS-VHDX §2.2): the file identifier, two headers and two region
// tables, each in its own 64 KiB, in the first 1 MiB of the file.
const (
	KiB = 1 << 10
	MiB = 1 << 20

	fileIDOff       = 0
	header1Off      = 64 * KiB
	header2Off      = 128 * KiB
	headerSize      = 4 * KiB // the part of the 64 KiB the checksum covers
	regionTable1Off = 192 * KiB
	regionTable2Off = 256 * KiB
	regionTableSize = 64 * KiB
	headerSection   = 1 * MiB

	maxRegions = 2047
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksum is the CRC-32C of b with the 4 bytes at off taken as zero.
func checksum(b []byte, off int) uint32 {
	c := crc32.Update(0, castagnoli, b[:off])
	c = crc32.Update(c, castagnoli, []byte{0, 0, 0, 0})
	return crc32.Update(c, castagnoli, b[off+4:])
}

// Header is one of the two headers (§2.2.2), little-endian on disk.
type Header struct {
	Signature      [4]byte // "head", at 0
	Checksum       uint32  // at 4: CRC-32C of the 4 KiB header
	SequenceNumber uint64  // at 8: the valid header with the higher one is current
	FileWriteGuid  GUID    // at 16
	DataWriteGuid  GUID    // at 32
	LogGuid        GUID    // at 48: non-zero while the log holds entries to replay
	LogVersion     uint16  // at 64: 0
	Version        uint16  // at 66: 1
	LogLength      uint32  // at 68: a multiple of 1 MiB
	LogOffset      uint64  // at 72: a multiple of 1 MiB
}

const headerChecksumOff = 4

// Marshal returns the 4 KiB header with its checksum computed.
func (h *Header) Marshal() []byte {
	b := make([]byte, headerSize)
	copy(h.Signature[:], "head")
	if _, err := binary.Encode(b, binary.LittleEndian, h); err != nil {
		panic(err)
	}
	binary.LittleEndian.PutUint32(b[headerChecksumOff:], checksum(b, headerChecksumOff))
	h.Checksum = binary.LittleEndian.Uint32(b[headerChecksumOff:])
	return b
}

// parseHeader decodes and checks the header in b (4 KiB) read at off.
// The error does not name the file: the caller does.
func parseHeader(b []byte, off int64) (*Header, error) {
	var h Header
	if _, err := binary.Decode(b, binary.LittleEndian, &h); err != nil {
		return nil, fmt.Errorf("header at %d: %w", off, ErrCorrupt)
	}
	if string(h.Signature[:]) != "head" {
		return nil, fmt.Errorf("header at %d: signature is %q, want \"head\": %w", off, h.Signature[:], ErrCorrupt)
	}
	if c := checksum(b, headerChecksumOff); c != h.Checksum {
		return nil, fmt.Errorf("header at %d: checksum is %#08x, computed %#08x: %w", off, h.Checksum, c, ErrChecksum)
	}
	if h.Version != 1 {
		return nil, fmt.Errorf("header at %d: version is %d, want 1: %w", off, h.Version, ErrUnsupported)
	}
	return &h, nil
}

// RegionEntry is one entry of the region table (§2.2.3.2).
type RegionEntry struct {
	Guid       GUID   // at 0
	FileOffset uint64 // at 16: a multiple of 1 MiB, at least 1 MiB
	Length     uint32 // at 24: a multiple of 1 MiB
	Flags      uint32 // at 28: bit 0 Required
}

// Required reports the entry's Required bit.
func (e RegionEntry) Required() bool { return e.Flags&1 != 0 }

// regionTableHeader is the start of a region table (§2.2.3.1).
type regionTableHeader struct {
	Signature  [4]byte // "regi", at 0
	Checksum   uint32  // at 4: CRC-32C of the 64 KiB table
	EntryCount uint32  // at 8: at most 2047
	Reserved   uint32  // at 12
}

const (
	regionTableChecksumOff = 4
	regionHeaderLen        = 16
	regionEntryLen         = 32
)

// parseRegionTable decodes and checks the region table in b (64 KiB) read at off.
// The error does not name the file: the caller does.
func parseRegionTable(b []byte, off int64) ([]RegionEntry, error) {
	var h regionTableHeader
	if _, err := binary.Decode(b, binary.LittleEndian, &h); err != nil {
		return nil, fmt.Errorf("region table at %d: %w", off, ErrCorrupt)
	}
	if string(h.Signature[:]) != "regi" {
		return nil, fmt.Errorf("region table at %d: signature is %q, want \"regi\": %w", off, h.Signature[:], ErrCorrupt)
	}
	if c := checksum(b, regionTableChecksumOff); c != h.Checksum {
		return nil, fmt.Errorf("region table at %d: checksum is %#08x, computed %#08x: %w", off, h.Checksum, c, ErrChecksum)
	}
	if h.EntryCount > maxRegions {
		return nil, fmt.Errorf("region table at %d: entry count %d exceeds %d: %w", off, h.EntryCount, maxRegions, ErrCorrupt)
	}
	entries := make([]RegionEntry, h.EntryCount)
	if _, err := binary.Decode(b[regionHeaderLen:], binary.LittleEndian, entries); err != nil {
		return nil, fmt.Errorf("region table at %d: %w", off, ErrCorrupt)
	}
	return entries, nil
}

// marshalRegionTable returns a 64 KiB region table holding entries.
func marshalRegionTable(entries []RegionEntry) []byte {
	b := make([]byte, regionTableSize)
	copy(b, "regi")
	binary.LittleEndian.PutUint32(b[8:], uint32(len(entries)))
	if _, err := binary.Encode(b[regionHeaderLen:], binary.LittleEndian, entries); err != nil {
		panic(err)
	}
	binary.LittleEndian.PutUint32(b[regionTableChecksumOff:], checksum(b, regionTableChecksumOff))
	return b
}

// isFileID reports whether b starts with the file identifier's signature (§2.2.1).
func isFileID(b []byte) bool { return bytes.HasPrefix(b, []byte("vhdxfile")) }

// HasSignature reports whether the file r has the file identifier's signature at
// offset 0: a file that has it is a VHDX, however damaged the rest.
func HasSignature(r io.ReaderAt, size int64) bool {
	b := make([]byte, 8)
	n, _ := r.ReadAt(b, fileIDOff)
	return n == len(b) && isFileID(b)
}
