// Package parttable reads the partition table of a disk, MBR or GPT, as far as a
// resize needs it: where each partition ends. It trusts nothing it reads: every
// count is bounded and every offset checked against the disk.
package parttable

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// ErrBadTable is wrapped by every error about a table that is there but malformed.
var ErrBadTable = errors.New("bad partition table")

// Partition is one partition: bytes [Start, End) of the disk.
type Partition struct {
	Index      int    // 1-based, as fdisk numbers them
	Start, End int64  // in bytes
	Type       string // MBR type byte ("0x83") or GPT type GUID
}

// Table is what Read found.
type Table struct {
	Scheme string // "mbr", "gpt", or "" when the disk has no partition table
	Parts  []Partition
	// Tail is the room a GPT keeps after its last usable sector for its backup
	// (entries and header), in bytes: 0 for MBR.
	Tail int64
}

// End is the end of the last partition, in bytes; 0 if there is none.
func (t *Table) End() int64 {
	var end int64
	for _, p := range t.Parts {
		end = max(end, p.End)
	}
	return end
}

// MBR layout (offsets in sector 0).
const (
	mbrEntries   = 446
	mbrEntrySize = 16
	mbrSignature = 510
	typeGPT      = 0xEE
)

// GPT header fields (UEFI specification §5.3.2), little-endian.
const (
	gptHeaderCRC  = 16
	gptHeaderSize = 12
	gptEntriesLBA = 72
	gptNumEntries = 80
	gptEntrySize  = 84
	gptEntriesCRC = 88
	maxGPTEntries = 1 << 20 // bytes of entries read at most
)

var gptSignature = []byte("EFI PART")

// Read reads the table of a disk of size bytes with logical sectors of sectorSize
// (512 or 4096) through r.
func Read(r io.ReaderAt, size, sectorSize int64) (*Table, error) {
	if size < 512 {
		return &Table{}, nil
	}
	s0 := make([]byte, 512)
	if _, err := r.ReadAt(s0, 0); err != nil {
		return nil, fmt.Errorf("read sector 0: %w", err)
	}
	if s0[mbrSignature] != 0x55 || s0[mbrSignature+1] != 0xAA {
		return &Table{}, nil
	}
	t := &Table{Scheme: "mbr"}
	for i := 0; i < 4; i++ {
		e := s0[mbrEntries+i*mbrEntrySize:][:mbrEntrySize]
		if e[0] != 0 && e[0] != 0x80 {
			// A boot sector of a file system, not an MBR (the status byte is 0 or 0x80).
			return &Table{}, nil
		}
		typ := e[4]
		start := int64(binary.LittleEndian.Uint32(e[8:])) * sectorSize
		n := int64(binary.LittleEndian.Uint32(e[12:])) * sectorSize
		if typ == 0 || n == 0 {
			continue
		}
		if typ == typeGPT {
			return readGPT(r, size, sectorSize)
		}
		// An extended partition is kept whole: its logical partitions lie inside it.
		t.Parts = append(t.Parts, Partition{Index: i + 1, Start: start, End: start + n, Type: fmt.Sprintf("0x%02x", typ)})
	}
	return t, nil
}

func readGPT(r io.ReaderAt, size, sectorSize int64) (*Table, error) {
	if size < 2*sectorSize {
		return nil, fmt.Errorf("protective MBR on a disk of %d bytes: %w", size, ErrBadTable)
	}
	h := make([]byte, sectorSize)
	if _, err := r.ReadAt(h, sectorSize); err != nil {
		return nil, fmt.Errorf("read GPT header at %d: %w", sectorSize, err)
	}
	if !bytes.Equal(h[:8], gptSignature) {
		return nil, fmt.Errorf("protective MBR but no GPT header at %d: %w", sectorSize, ErrBadTable)
	}
	hs := int64(binary.LittleEndian.Uint32(h[gptHeaderSize:]))
	if hs < 92 || hs > sectorSize {
		return nil, fmt.Errorf("GPT header size %d: %w", hs, ErrBadTable)
	}
	hdr := append([]byte(nil), h[:hs]...)
	want := binary.LittleEndian.Uint32(hdr[gptHeaderCRC:])
	clear(hdr[gptHeaderCRC : gptHeaderCRC+4])
	if crc32.ChecksumIEEE(hdr) != want {
		return nil, fmt.Errorf("GPT header at %d: checksum mismatch: %w", sectorSize, ErrBadTable)
	}
	lba := int64(binary.LittleEndian.Uint64(h[gptEntriesLBA:]))
	count := int64(binary.LittleEndian.Uint32(h[gptNumEntries:]))
	esize := int64(binary.LittleEndian.Uint32(h[gptEntrySize:]))
	if esize < 128 || esize%8 != 0 || count*esize > maxGPTEntries || lba < 2 || lba > size/sectorSize {
		return nil, fmt.Errorf("GPT entries: %d of %d bytes at sector %d: %w", count, esize, lba, ErrBadTable)
	}
	ents := make([]byte, count*esize)
	if _, err := r.ReadAt(ents, lba*sectorSize); err != nil {
		return nil, fmt.Errorf("read GPT entries at %d: %w", lba*sectorSize, err)
	}
	if crc32.ChecksumIEEE(ents) != binary.LittleEndian.Uint32(h[gptEntriesCRC:]) {
		return nil, fmt.Errorf("GPT entries at %d: checksum mismatch: %w", lba*sectorSize, ErrBadTable)
	}
	// The backup: the entries array and a header sector at the end of the disk.
	t := &Table{Scheme: "gpt", Tail: (count*esize+sectorSize-1)/sectorSize*sectorSize + sectorSize}
	for i := int64(0); i < count; i++ {
		e := ents[i*esize:][:esize]
		if allZero(e[:16]) {
			continue
		}
		first := int64(binary.LittleEndian.Uint64(e[32:]))
		last := int64(binary.LittleEndian.Uint64(e[40:]))
		if last < first || last > 1<<62/sectorSize {
			return nil, fmt.Errorf("GPT entry %d: sectors %d to %d: %w", i+1, first, last, ErrBadTable)
		}
		t.Parts = append(t.Parts, Partition{Index: int(i + 1), Start: first * sectorSize, End: (last + 1) * sectorSize, Type: guidString(e[:16])})
	}
	return t, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// guidString formats a mixed-endian GUID as GPT stores it.
func guidString(b []byte) string {
	return fmt.Sprintf("%08X-%04X-%04X-%X-%X", binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint16(b[4:]), binary.LittleEndian.Uint16(b[6:]), b[8:10], b[10:16])
}
