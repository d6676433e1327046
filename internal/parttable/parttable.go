// Package parttable reads the partition table of a disk, MBR (with the logical
// partitions of its extended partitions) or GPT (the backup when the primary is
// damaged), numbered as Linux numbers them. It trusts nothing it reads: every count
// is bounded, every chain followed has a cap, and every offset is checked.
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
	Index      int    // 1-based, as Linux numbers them: MBR logical partitions from 5
	Start, End int64  // in bytes
	Type       string // MBR type byte ("0x83") or GPT type GUID
	// Extended marks an MBR extended partition: the container of the logical
	// partitions, listed whole (End covers them), itself no data.
	Extended bool
}

// Table is what Read found.
type Table struct {
	Scheme string // "mbr", "gpt", or "" when the disk has no partition table
	Parts  []Partition
	// Tail is the room a GPT keeps after its last usable sector for its backup
	// (entries and header), in bytes: 0 for MBR.
	Tail int64
	// FromBackup says the GPT came from its backup at the end of the disk: the
	// primary (header or entries) was damaged.
	FromBackup bool
}

// End is the end of the last partition, in bytes; 0 if there is none.
func (t *Table) End() int64 {
	var end int64
	for _, p := range t.Parts {
		end = max(end, p.End)
	}
	return end
}

// Devices are the partitions a disk of size bytes shows as block devices, as Linux
// adds them: no extended containers, no index past 255, none that starts at or past the end, and one
// that runs past the end cut there.
func (t *Table) Devices(size int64) []Partition {
	var out []Partition
	for _, p := range t.Parts {
		if p.Extended || p.Index > maxIndex || p.Start >= size || p.End <= p.Start {
			continue
		}
		p.End = min(p.End, size)
		out = append(out, p)
	}
	return out
}

// MBR layout (offsets in sector 0 and in each EBR).
const (
	mbrEntries   = 446
	mbrEntrySize = 16
	mbrSignature = 510
	typeGPT      = 0xEE
)

// Bounds of the logical partitions. Linux numbers partitions below 256
// (DISK_MAX_PARTS); an EBR chain is followed for at most maxEBRs links and stops
// at the first EBR it already read (a loop), keeping what it found before.
const (
	maxIndex = 255
	maxEBRs  = 256
)

// isExtended reports the MBR types of an extended partition that Linux follows:
// DOS (0x05), Windows LBA (0x0F), Linux (0x85).
func isExtended(typ byte) bool { return typ == 0x05 || typ == 0x0F || typ == 0x85 }

// GPT header fields (UEFI specification §5.3.2), little-endian.
const (
	gptHeaderCRC  = 16
	gptHeaderSize = 12
	gptMyLBA      = 24
	gptAltLBA     = 32
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
		t.Parts = append(t.Parts, Partition{Index: i + 1, Start: start, End: start + n, Type: fmt.Sprintf("0x%02x", typ), Extended: isExtended(typ)})
	}
	next := 5
	for _, p := range append([]Partition(nil), t.Parts...) {
		if p.Extended {
			if err := readLogical(r, size, sectorSize, p, t, &next); err != nil {
				return nil, err
			}
		}
	}
	return t, nil
}

// readLogical appends the logical partitions of the extended partition ext to t,
// numbered from *next on, as Linux's parse_extended finds them: in each EBR every
// data entry is a partition (the third and fourth only if they lie inside the
// extended partition), and the first extended entry, relative to ext's start, links
// to the next EBR. A missing EBR signature, an EBR past the end of the disk, a loop
// or the caps end the chain without an error.
func readLogical(r io.ReaderAt, size, sectorSize int64, ext Partition, t *Table, next *int) error {
	seen := map[int64]bool{}
	ebr, ebrSize := ext.Start, ext.End-ext.Start
	s := make([]byte, 512)
	for links := 0; links < maxEBRs && *next <= maxIndex; links++ {
		if seen[ebr] || ebr+512 > size {
			return nil
		}
		seen[ebr] = true
		if _, err := r.ReadAt(s, ebr); err != nil {
			return fmt.Errorf("read EBR at %d: %w", ebr, err)
		}
		if s[mbrSignature] != 0x55 || s[mbrSignature+1] != 0xAA {
			return nil
		}
		link := int64(-1)
		for i := 0; i < 4; i++ {
			e := s[mbrEntries+i*mbrEntrySize:][:mbrEntrySize]
			typ := e[4]
			rel := int64(binary.LittleEndian.Uint32(e[8:])) * sectorSize
			n := int64(binary.LittleEndian.Uint32(e[12:])) * sectorSize
			if n == 0 || typ == 0 {
				continue
			}
			if isExtended(typ) {
				if link < 0 {
					link = ext.Start + rel
					ebrSize = n
				}
				continue
			}
			start := ebr + rel
			if i >= 2 && (rel+n > ebrSize || start < ext.Start || start+n > ext.End) {
				continue // garbage in the unused entries, as Linux treats it
			}
			if *next > maxIndex {
				return nil
			}
			t.Parts = append(t.Parts, Partition{Index: *next, Start: start, End: start + n, Type: fmt.Sprintf("0x%02x", typ)})
			*next++
		}
		if link < 0 {
			return nil
		}
		ebr = link
	}
	return nil
}

// readGPT reads the primary GPT at LBA 1 and, if it is damaged, the backup: at the
// primary header's alternate LBA when that header itself is intact, else at the last
// sector of the disk (as sfdisk and gdisk do; Linux itself only does so when booted
// with "gpt"). When both are damaged, the primary's error is returned.
func readGPT(r io.ReaderAt, size, sectorSize int64) (*Table, error) {
	if size < 2*sectorSize {
		return nil, fmt.Errorf("protective MBR on a disk of %d bytes: %w", size, ErrBadTable)
	}
	last := size/sectorSize - 1
	t, alt, err := readGPTAt(r, size, sectorSize, 1)
	if err == nil || !errors.Is(err, ErrBadTable) {
		return t, err
	}
	var backups []int64
	if alt > 1 && alt < last {
		backups = append(backups, alt)
	}
	for _, lba := range append(backups, last) {
		if b, _, berr := readGPTAt(r, size, sectorSize, lba); berr == nil {
			b.FromBackup = true
			return b, nil
		}
	}
	return nil, err
}

// readGPTAt reads the GPT whose header is at sector lba. It returns the header's
// alternate LBA whenever the header's checksum held (0 otherwise), also with an error
// about the entries.
func readGPTAt(r io.ReaderAt, size, sectorSize, lba int64) (*Table, int64, error) {
	at := lba * sectorSize
	h := make([]byte, sectorSize)
	if _, err := r.ReadAt(h, at); err != nil {
		return nil, 0, fmt.Errorf("read GPT header at %d: %w", at, err)
	}
	if !bytes.Equal(h[:8], gptSignature) {
		return nil, 0, fmt.Errorf("no GPT header at %d: %w", at, ErrBadTable)
	}
	hs := int64(binary.LittleEndian.Uint32(h[gptHeaderSize:]))
	if hs < 92 || hs > sectorSize {
		return nil, 0, fmt.Errorf("GPT header at %d: size %d: %w", at, hs, ErrBadTable)
	}
	hdr := append([]byte(nil), h[:hs]...)
	want := binary.LittleEndian.Uint32(hdr[gptHeaderCRC:])
	clear(hdr[gptHeaderCRC : gptHeaderCRC+4])
	if crc32.ChecksumIEEE(hdr) != want {
		return nil, 0, fmt.Errorf("GPT header at %d: checksum mismatch: %w", at, ErrBadTable)
	}
	alt := int64(binary.LittleEndian.Uint64(h[gptAltLBA:]) & (1<<62 - 1))
	if my := binary.LittleEndian.Uint64(h[gptMyLBA:]); my != uint64(lba) {
		return nil, alt, fmt.Errorf("GPT header at %d says it is at sector %d: %w", at, my, ErrBadTable)
	}
	elba := int64(binary.LittleEndian.Uint64(h[gptEntriesLBA:]) & (1<<62 - 1))
	count := int64(binary.LittleEndian.Uint32(h[gptNumEntries:]))
	esize := int64(binary.LittleEndian.Uint32(h[gptEntrySize:]))
	if esize < 128 || esize%8 != 0 || esize > maxGPTEntries || count*esize > maxGPTEntries || elba < 2 || (elba*sectorSize+count*esize) > size {
		return nil, alt, fmt.Errorf("GPT header at %d: entries: %d of %d bytes at sector %d: %w", at, count, esize, elba, ErrBadTable)
	}
	ents := make([]byte, count*esize)
	if _, err := r.ReadAt(ents, elba*sectorSize); err != nil {
		return nil, alt, fmt.Errorf("read GPT entries at %d: %w", elba*sectorSize, err)
	}
	if crc32.ChecksumIEEE(ents) != binary.LittleEndian.Uint32(h[gptEntriesCRC:]) {
		return nil, alt, fmt.Errorf("GPT entries at %d: checksum mismatch: %w", elba*sectorSize, ErrBadTable)
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
		if first < 0 || last < first || last > 1<<62/sectorSize {
			return nil, alt, fmt.Errorf("GPT entry %d: sectors %d to %d: %w", i+1, first, last, ErrBadTable)
		}
		t.Parts = append(t.Parts, Partition{Index: int(i + 1), Start: first * sectorSize, End: (last + 1) * sectorSize, Type: guidString(e[:16])})
	}
	return t, alt, nil
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
