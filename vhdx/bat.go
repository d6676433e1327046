package vhdx

import (
	"encoding/binary"
	"fmt"
	"sort"
)

// BlockState is the state of a BAT entry (MS-VHDX §2.5.1), its bits 0–2.
type BlockState uint8

// Payload block states (§2.5.1.1); sector bitmap entries use NotPresent and Present.
const (
	NotPresent       BlockState = 0
	Undefined        BlockState = 1
	Zero             BlockState = 2
	Unmapped         BlockState = 3
	unmappedDraft    BlockState = 5 // UNMAPPED in the 0.95 draft; qemu still accepts it
	FullyPresent     BlockState = 6
	PartiallyPresent BlockState = 7 // differencing files only

	Present BlockState = 6 // a sector bitmap block (§2.5.1.2)
)

func (s BlockState) String() string {
	switch s {
	case NotPresent:
		return "NOT_PRESENT"
	case Undefined:
		return "UNDEFINED"
	case Zero:
		return "ZERO"
	case Unmapped, unmappedDraft:
		return "UNMAPPED"
	case FullyPresent:
		return "FULLY_PRESENT"
	case PartiallyPresent:
		return "PARTIALLY_PRESENT"
	}
	return fmt.Sprintf("state %d", uint8(s))
}

// batEntry is one 64-bit BAT entry (§2.5.1): state in bits 0–2, reserved bits 3–19,
// the file offset in MiB in bits 20–63.
type batEntry uint64

func (e batEntry) state() BlockState { return BlockState(e & 7) }
func (e batEntry) offset() int64     { return int64(e>>20) << 20 }

func makeEntry(s BlockState, off int64) batEntry { return batEntry(uint64(off>>20)<<20 | uint64(s)) }

// geometry is the layout of blocks and chunks (§2.4, §2.5).
type geometry struct {
	size        int64 // virtual disk size
	blockSize   int64
	sectorSize  int64 // logical
	chunkRatio  int64 // payload blocks per sector bitmap block
	blocks      int64 // payload blocks
	entries     int64 // BAT entries in use
	bitmapSlice int64 // bytes of one block's bits in a sector bitmap block
}

const sectorBitmapBlockSize = 1 * MiB

func newGeometry(size, blockSize, sectorSize int64, differencing bool) geometry {
	g := geometry{size: size, blockSize: blockSize, sectorSize: sectorSize}
	g.chunkRatio = (1 << 23) * sectorSize / blockSize
	g.blocks = (size + blockSize - 1) / blockSize
	if differencing {
		g.entries = (g.blocks + g.chunkRatio - 1) / g.chunkRatio * (g.chunkRatio + 1)
	} else {
		g.entries = g.blocks + (g.blocks-1)/g.chunkRatio
	}
	g.bitmapSlice = blockSize / sectorSize / 8
	return g
}

// payloadIndex is the BAT index of payload block p; bitmapIndex that of the sector
// bitmap block of the chunk holding p. Sector bitmap entries are interleaved after
// every chunkRatio payload entries in every kind of file.
func (g geometry) payloadIndex(p int64) int64 { return p + p/g.chunkRatio }
func (g geometry) bitmapIndex(p int64) int64 {
	return p/g.chunkRatio*(g.chunkRatio+1) + g.chunkRatio
}

// span is a range of the file.
type span struct {
	off, len int64
	name     string
}

func overlaps(a, alen, b, blen int64) bool { return a < b+blen && b < a+alen }

// readBAT reads the BAT region at off, length n, and checks every entry in use: a
// state valid for the kind of file, and space inside the file that no metadata and
// no other block uses. Entries past the count in use are ignored.
func (img *Image) readBAT(off, n int64, meta []span) error {
	g := img.geo
	name := img.name
	if g.entries*8 > n {
		return fmt.Errorf("%s: BAT region of %d bytes cannot hold %d entries: %w", name, n, g.entries, ErrCorrupt)
	}
	img.bat = make([]batEntry, g.entries)
	buf := make([]byte, 1*MiB)
	for base := int64(0); base < g.entries; base += int64(len(buf)) / 8 {
		k := min(int64(len(buf))/8, g.entries-base)
		if err := img.src.readAt(buf[:8*k], off+8*base); err != nil {
			return fmt.Errorf("%s: read BAT at %d: %w", name, off+8*base, err)
		}
		for i := range k {
			img.bat[base+i] = batEntry(binary.LittleEndian.Uint64(buf[8*i:]))
		}
	}
	var used []span
	diff := img.meta.Load().HasParent
	for i, e := range img.bat {
		i := int64(i)
		bitmap := (i+1)%(g.chunkRatio+1) == 0
		var length int64
		switch s := e.state(); {
		case bitmap && s == NotPresent:
			continue
		case bitmap && s == Present:
			length = sectorBitmapBlockSize
		case bitmap:
			return fmt.Errorf("%s: BAT entry %d (sector bitmap) has invalid state %d: %w", name, i, s, ErrCorrupt)
		case s == NotPresent, s == Undefined, s == Zero, s == Unmapped, s == unmappedDraft:
			continue
		case s == FullyPresent, s == PartiallyPresent && diff:
			p := i - i/(g.chunkRatio+1)
			length = min(g.blockSize, g.size-p*g.blockSize)
		case s == PartiallyPresent:
			return fmt.Errorf("%s: BAT entry %d is PARTIALLY_PRESENT in an image without a parent: %w", name, i, ErrCorrupt)
		default:
			return fmt.Errorf("%s: BAT entry %d has invalid state %d: %w", name, i, s, ErrCorrupt)
		}
		start := e.offset()
		if start+length > img.src.vsize {
			return fmt.Errorf("%s: BAT entry %d points to %d+%d, past the end of the file at %d: %w", name, i, start, length, img.src.vsize, ErrCorrupt)
		}
		for _, m := range meta {
			if overlaps(start, length, m.off, m.len) {
				return fmt.Errorf("%s: BAT entry %d points to %d, overlapping %s at %d: %w", name, i, start, m.name, m.off, ErrCorrupt)
			}
		}
		used = append(used, span{start, length, fmt.Sprint(i)})
	}
	if diff {
		for p := int64(0); p < g.blocks; p++ {
			if img.bat[g.payloadIndex(p)].state() == PartiallyPresent && img.bat[g.bitmapIndex(p)].state() != Present {
				return fmt.Errorf("%s: BAT entry %d is PARTIALLY_PRESENT but its sector bitmap entry %d is not present: %w", name, g.payloadIndex(p), g.bitmapIndex(p), ErrCorrupt)
			}
		}
	}
	sort.Slice(used, func(a, b int) bool { return used[a].off < used[b].off })
	for k := 1; k < len(used); k++ {
		if used[k].off < used[k-1].off+used[k-1].len {
			return fmt.Errorf("%s: BAT entries %s and %s overlap at %d: %w", name, used[k-1].name, used[k].name, used[k].off, ErrCorrupt)
		}
	}
	return nil
}
