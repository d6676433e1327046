package vhdx

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/internal/faults"
	"github.com/vhdfs/vhdfs/internal/pagecache"
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

// offset is where the entry's block lies in the file: unsigned, as on disk (bits
// 20–63 reach past 2^63). Only an entry checkEntry passed lies inside the file.
func (e batEntry) offset() uint64 { return uint64(e) &^ (1<<20 - 1) }

// at is offset as a file offset, for an entry checkEntry passed.
func (e batEntry) at() int64 { return int64(e.offset()) }

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

// isBitmap reports whether entry i is a sector bitmap entry; block is the payload
// block of a payload entry.
func (g geometry) isBitmap(i int64) bool { return (i+1)%(g.chunkRatio+1) == 0 }
func (g geometry) block(i int64) int64   { return i - i/(g.chunkRatio+1) }

// span is a range of the file.
type span struct {
	off, len int64
	name     string
}

func overlaps(a, alen, b, blen int64) bool { return a < b+blen && b < a+alen }

// The BAT is paged (as VHD's bitmaps are): pages of 4 KiB, one log sector, 512
// entries each, are read when first needed, checked (checkPage) and kept in the
// process's page cache (pagecache.Bitmaps) within its shared budget, so that memory
// and open time do not grow with the virtual size: a 64 TiB image with 1 MiB blocks
// has a 512 MiB table. A page is what commitLocked changes in the pending sectors,
// which the image reads through (source.readAt); it forgets the cached page then.
const (
	batPageBytes   = logSector
	batPageEntries = batPageBytes / 8
)

// batKey names page pg of the BAT of the image with id img in pagecache.Bitmaps;
// Block -1 keeps it apart from the bitmap slices, keyed by their block.
func batKey(img uint64, pg int64) pagecache.Key {
	return pagecache.Key{Image: img, Block: -1, Page: pg}
}

// checkBATRegion checks what can be checked of the BAT at open without reading it:
// the region (at off, n bytes long) holds the entries in use. The entries are
// checked a page at a time as they are read (checkPage); Check reads them all.
func (img *Image) checkBATRegion(off, n int64, meta []span) error {
	if img.geo.entries*8 > n {
		return fmt.Errorf("%s: BAT region of %d bytes cannot hold %d entries: %w", img.name, n, img.geo.entries, ErrCorrupt)
	}
	img.batOff, img.spans = off, meta
	return nil
}

// entry returns BAT entry i, from its page; NOT_PRESENT past the entries in use (a
// dynamic image's last chunk has no sector bitmap entry). The caller holds mu.
func (img *Image) entry(i int64) (batEntry, error) {
	if i >= img.geo.entries {
		return 0, nil
	}
	pg := i / batPageEntries
	h := img.hot.Load()
	if h == nil || h.pg != pg {
		b, err := img.batPage(pg)
		if err != nil {
			return 0, err
		}
		h = &hotPage{pg, b}
		img.hot.Store(h)
	}
	return batEntry(binary.LittleEndian.Uint64(h.data[8*(i%batPageEntries):])), nil
}

// hotPage is the BAT page an image read last: most lookups are of that one, and it
// spares them the shared cache's lock. commitLocked forgets it with the page.
type hotPage struct {
	pg   int64
	data []byte
}

// batPage returns page pg of the BAT, cached, or read (through the log's overlay and
// the pending sectors), checked and cached. Entries past the count in use read as
// zeros. The caller holds mu and must not change the page.
func (img *Image) batPage(pg int64) ([]byte, error) {
	k := batKey(img.id, pg)
	if b := pagecache.Bitmaps.Get(k); b != nil {
		return b, nil
	}
	first := pg * batPageEntries
	n := min(batPageEntries, img.geo.entries-first)
	b := make([]byte, batPageBytes)
	off := img.batOff + 8*first
	if err := img.src.readAt(b[:8*n], off); err != nil {
		return nil, fmt.Errorf("%s: read BAT at %d: %w", img.name, off, err)
	}
	if err := img.checkPage(first, b[:8*n]); err != nil {
		return nil, err
	}
	pagecache.Bitmaps.Put(k, b)
	return b, nil
}

// checkPage checks the entries of raw, entry first onwards (checkEntry), that no two
// of them overlap, and that the chunk of a PARTIALLY_PRESENT one has its sector
// bitmap block present. Overlaps between pages are Check's to find.
func (img *Image) checkPage(first int64, raw []byte) error {
	g := img.geo
	var used []span
	lastBI, lastBE := int64(-1), batEntry(0) // a chunk's many PARTIALLY_PRESENT entries read its bitmap entry once
	for k := range int64(len(raw)) / 8 {
		i := first + k
		e := batEntry(binary.LittleEndian.Uint64(raw[8*k:]))
		n, err := img.checkEntry(i, e)
		if err != nil {
			return err
		}
		if n == 0 {
			continue
		}
		if e.state() == PartiallyPresent && !g.isBitmap(i) {
			bi := g.bitmapIndex(g.block(i))
			be := lastBE
			switch {
			case bi == lastBI:
			case bi < first+int64(len(raw))/8:
				be = batEntry(binary.LittleEndian.Uint64(raw[8*(bi-first):]))
			default:
				b := make([]byte, 8)
				if err := img.src.readAt(b, img.batOff+8*bi); err != nil {
					return fmt.Errorf("%s: read BAT at %d: %w", img.name, img.batOff+8*bi, err)
				}
				be = batEntry(binary.LittleEndian.Uint64(b))
			}
			lastBI, lastBE = bi, be
			if be.state() != Present {
				return fmt.Errorf("%s: %s is PARTIALLY_PRESENT but its sector bitmap entry %d is %v: %w", img.name, g.entryName(i), bi, be.state(), ErrCorrupt)
			}
		}
		used = append(used, span{e.at(), n, g.entryName(i)})
	}
	slices.SortFunc(used, func(a, b span) int { return cmp.Compare(a.off, b.off) })
	for k := 1; k < len(used); k++ {
		if used[k].off < used[k-1].off+used[k-1].len {
			return fmt.Errorf("%s: %s and %s overlap at %d: %w", img.name, used[k-1].name, used[k].name, used[k].off, ErrCorrupt)
		}
	}
	return nil
}

// checkEntry checks entry i: a state valid for its place and the kind of file, and
// for a block that is stored, space inside the file (an offset below 2^63) that no
// metadata uses (img.spans). It returns the bytes of the file the entry uses, 0 for
// none.
func (img *Image) checkEntry(i int64, e batEntry) (int64, error) {
	n, problem := img.entryProblem(i, e)
	if problem != "" {
		return 0, fmt.Errorf("%s: %s: %w", img.name, problem, ErrCorrupt)
	}
	return n, nil
}

// entryProblem is checkEntry's: the length, or what is wrong.
func (img *Image) entryProblem(i int64, e batEntry) (int64, string) {
	g := img.geo
	// Named only for a problem: formatting it for every entry of a paged table
	// costs more than checking it.
	name := func() string { return g.entryName(i) }
	bitmap := g.isBitmap(i)
	var length int64
	switch s := e.state(); {
	case bitmap && s == NotPresent:
		return 0, ""
	case bitmap && s == Present:
		length = sectorBitmapBlockSize
	case bitmap:
		return 0, fmt.Sprintf("%s has invalid state %d", name(), s)
	case s == NotPresent, s == Undefined, s == Zero, s == Unmapped, s == unmappedDraft:
		return 0, ""
	case s == FullyPresent, s == PartiallyPresent && img.meta.Load().HasParent:
		length = min(g.blockSize, g.size-g.block(i)*g.blockSize)
	case s == PartiallyPresent:
		return 0, fmt.Sprintf("%s is PARTIALLY_PRESENT in an image without a parent", name())
	default:
		return 0, fmt.Sprintf("%s has invalid state %d", name(), s)
	}
	off := e.offset()
	if off >= 1<<63-uint64(length) || !img.salvage && img.fileSize(int64(off)+length) < int64(off)+length {
		return 0, fmt.Sprintf("%s points to %d+%d, past the end of the file at %d", name(), off, length, img.src.vsize)
	}
	for _, m := range img.spans {
		if overlaps(int64(off), length, m.off, m.len) {
			return 0, fmt.Sprintf("%s points to %d, overlapping %s at %d", name(), off, m.name, m.off)
		}
	}
	return length, ""
}

// entryName names entry i in messages: "BAT entry 9 (block 8)", "BAT entry 4096
// (sector bitmap)".
func (g geometry) entryName(i int64) string {
	if g.isBitmap(i) {
		return fmt.Sprintf("BAT entry %d (sector bitmap)", i)
	}
	return fmt.Sprintf("BAT entry %d (block %d)", i, g.block(i))
}

// fileSize is the size of the file to check an entry that ends at need against: the
// size this handle knows (at open, or since its own writes), or, for a read-only
// handle reading the file itself (no log replayed in memory), the size now when that
// is larger: the joint writable handle of a merge grows a file the chain reads
// through its own handle.
func (img *Image) fileSize(need int64) int64 {
	size := img.src.vsize
	if need <= size || img.writable || img.src.ov != nil {
		return size
	}
	if g := img.grown.Load(); g >= need {
		return g
	}
	st, err := img.src.f.Stat()
	if err != nil {
		return size
	}
	for {
		g := img.grown.Load()
		if st.Size() <= g || img.grown.CompareAndSwap(g, st.Size()) {
			break
		}
	}
	return max(size, img.grown.Load())
}

// readData reads file bytes a checked entry points at: through the source, or, past
// the size it knows, from the file that another handle grew (see fileSize).
func (img *Image) readData(p []byte, off int64) error {
	if end := off + int64(len(p)); img.salvage && end > img.src.vsize {
		keep := max(img.src.vsize-off, 0)
		clear(p[keep:])
		if keep == 0 {
			return nil
		}
		p = p[:keep]
	}
	if end := off + int64(len(p)); end > img.src.vsize && end <= img.grown.Load() {
		n, err := img.src.f.ReadAt(p, off)
		if err == io.EOF {
			clear(p[n:])
			err = nil
		}
		return err
	}
	return img.src.readAt(p, off)
}

// scanBAT calls fn with every entry of the table that is not zero (a zero entry is
// NOT_PRESENT), in index order, until fn returns false. It reads the file through
// the source 1 MiB at a time and skips the holes of a plain file (a new image's
// table is one), so it costs what the table holds, not its size. Entries are not
// checked. The caller holds mu.
func (img *Image) scanBAT(fn func(i int64, e batEntry) bool) error {
	g := img.geo
	buf := make([]byte, MiB)
	per := int64(len(buf)) / 8
	for base := int64(0); base < g.entries; {
		off := img.batOff + 8*base
		if next := img.nextBATData(off); next >= off+batPageBytes {
			base = (next - img.batOff) / 8 / batPageEntries * batPageEntries
			continue
		}
		k := min(per, g.entries-base)
		if err := img.src.readAt(buf[:8*k], off); err != nil {
			return fmt.Errorf("%s: read BAT at %d: %w", img.name, off, err)
		}
		for j := range k {
			if e := batEntry(binary.LittleEndian.Uint64(buf[8*j:])); e != 0 && !fn(base+j, e) {
				return nil
			}
		}
		base += k
	}
	return nil
}

// nextBATData returns where, from off in the BAT, the next bytes that may not be
// zero are: off itself unless off lies in a hole of a plain file with no pending
// sector and no log overlay there; past the table when only holes follow.
func (img *Image) nextBATData(off int64) int64 {
	f, ok := faults.OSFile(img.src.f)
	if !ok || img.src.ov != nil {
		return off
	}
	end := img.batOff + 8*img.geo.entries
	next, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		next = end
	case err != nil:
		return off
	}
	for k := range img.src.pending {
		if k+logSector > off && k < next {
			next = max(k, off)
		}
	}
	return min(max(next, off), end)
}
