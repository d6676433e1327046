package vhdx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"

	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/pagecache"
)

// WriteAt writes whole logical sectors: off and len(p) must be multiples of the
// logical sector size and the range must lie inside Size. Data goes straight to its
// block; a block in any state but FULLY_PRESENT and PARTIALLY_PRESENT gets new space
// at the end of the file first. Every metadata change (BAT entries, sector bitmap
// bits) goes through the log (see commit), so a cut at any write leaves a file that
// opens and shows each sector old or new. Before the first write, the header gets a
// new FileWriteGuid and DataWriteGuid (§2.2.2.1). In a differencing image a new
// block that was NOT_PRESENT gets bitmap bits only for the sectors written; one that
// was ZERO, UNMAPPED or UNDEFINED becomes FULLY_PRESENT with zeros around the data,
// so it never exposes the parent. Writes are durable at the next Sync: the metadata
// changes they make wait for it in memory (commitLocked), unless many do.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	g := img.geo
	if !img.writable {
		return 0, fmt.Errorf("%s: write at %d: %w", img.name, off, ErrReadOnly)
	}
	if off%g.sectorSize != 0 || int64(len(p))%g.sectorSize != 0 {
		return 0, fmt.Errorf("%s: write of %d bytes at %d: not whole %d-byte logical sectors: %w", img.name, len(p), off, g.sectorSize, ErrInvalidArg)
	}
	if off < 0 || off+int64(len(p)) > g.size {
		return 0, fmt.Errorf("%s: write of %d bytes at %d past the size %d: %w", img.name, len(p), off, g.size, ErrOutOfRange)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.usableLocked(off); err != nil {
		return 0, err
	}
	// The entries the write needs are read (and checked) first: a bad one fails it
	// before the header changes.
	for blk := off / g.blockSize; blk*g.blockSize < off+int64(len(p)); blk++ {
		if _, err := img.entry(g.payloadIndex(blk)); err != nil {
			return 0, err
		}
		if img.meta.Load().HasParent {
			if _, err := img.entry(g.bitmapIndex(blk)); err != nil {
				return 0, err
			}
		}
	}
	if len(p) > 0 {
		if err := img.beginWriteLocked(); err != nil {
			return 0, err
		}
	}
	for done := 0; done < len(p); {
		o := off + int64(done)
		blk, in := o/g.blockSize, o%g.blockSize
		n := int(min(int64(len(p)-done), g.blockSize-in))
		if err := img.writeBlockLocked(blk, in, p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	return len(p), nil
}

// writeBlockLocked writes d at byte in of payload block blk. The caller holds mu.
func (img *Image) writeBlockLocked(blk, in int64, d []byte) error {
	e, err := img.entry(img.geo.payloadIndex(blk))
	if err != nil {
		return err
	}
	var bat map[int64]batEntry
	setBits := false
	switch e.state() {
	case FullyPresent:
	case PartiallyPresent:
		setBits = true
	default:
		// Zeros over a block that reads as zeros (every state but NOT_PRESENT of a
		// differencing image, which shows the parent) change nothing.
		if !(img.meta.Load().HasParent && e.state() == NotPresent) && fileio.AllZero(d) {
			return nil
		}
		if e, bat, setBits, err = img.allocateBlockLocked(blk, in, int64(len(d)), e); err != nil {
			return err
		}
	}
	if _, err := img.src.f.WriteAt(d, e.at()+in); err != nil {
		return fmt.Errorf("%s: write block %d at %d: %w", img.name, blk, e.at()+in, err)
	}
	var bits *bitRange
	if setBits {
		// A new block's slice may hold stale bits (a NOT_PRESENT block's bits mean
		// nothing): it starts clear.
		bits = &bitRange{blk, in / img.geo.sectorSize, int64(len(d)) / img.geo.sectorSize, bat != nil}
	}
	return img.commitLocked(bat, bits)
}

// allocateBlockLocked gives payload block blk, whose entry e is in neither present
// state, new space at the end of the file for a write of n bytes at in, and returns
// its new entry, the BAT entries to commit (the block's, and its chunk's sector
// bitmap's if that is new) and whether the block takes sector bits (PARTIALLY_PRESENT).
// The caller holds mu.
func (img *Image) allocateBlockLocked(blk, in, n int64, e batEntry) (batEntry, map[int64]batEntry, bool, error) {
	g := img.geo
	start, err := img.extendLocked(g.blockSize)
	if err != nil {
		return 0, nil, false, err
	}
	if err := img.reserveLocked(blk, start, in, n); err != nil {
		return 0, nil, false, err
	}
	blockLen := min(g.blockSize, g.size-blk*g.blockSize)
	state, setBits := FullyPresent, false
	if img.meta.Load().HasParent && e.state() == NotPresent && !(in == 0 && n == blockLen) {
		state, setBits = PartiallyPresent, true
	}
	e = makeEntry(state, start)
	bat := map[int64]batEntry{g.payloadIndex(blk): e}
	bi := g.bitmapIndex(blk)
	be := batEntry(0)
	if setBits {
		if be, err = img.entry(bi); err != nil {
			return 0, nil, false, err
		}
	}
	if setBits && be.state() != Present {
		bstart, err := img.extendLocked(sectorBitmapBlockSize)
		if err != nil {
			return 0, nil, false, err
		}
		if err := img.reserveLocked(-1, bstart, 0, sectorBitmapBlockSize); err != nil {
			return 0, nil, false, err
		}
		bat[bi] = makeEntry(Present, bstart)
	}
	if err := img.reserveBATLocked(bat); err != nil {
		return 0, nil, false, err
	}
	return e, bat, setBits, nil
}

// maxReservedBlock is the largest block reserved whole when it is allocated (as
// VHD's): 2 MiB checkpoint blocks are; of Hyper-V's 32 MiB blocks only what is
// written is.
const maxReservedBlock = 16 * MiB

// reserveLocked sets aside the file space a write into new block blk at start needs
// (all of a block up to maxReservedBlock, else the n bytes written at in; blk -1 is a
// sector bitmap block, reserved whole), so that a full file system fails the write
// with ENOSPC before any of its bytes land. Nothing is reserved after NoReservation,
// or where the file system cannot.
func (img *Image) reserveLocked(blk, start, in, n int64) error {
	if img.noReserve {
		return nil
	}
	if blk < 0 || img.geo.blockSize <= maxReservedBlock {
		in, n = 0, min(img.geo.blockSize, img.src.vsize-start)
		if blk < 0 {
			n = sectorBitmapBlockSize
		}
	}
	err := fileio.Reserve(img.src.f, start+in, n)
	if errors.Is(err, errors.ErrUnsupported) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: reserve %d bytes for block %d at %d: %w", img.name, n, blk, start+in, err)
	}
	return nil
}

// reserveBATLocked allocates the file space of the BAT sectors that will hold the
// entries in bat: a new image's table is a hole (Create), and the entries' write in
// place, after the log names them, must not fail for want of room.
func (img *Image) reserveBATLocked(bat map[int64]batEntry) error {
	for idx := range bat {
		off := (img.batOff + 8*idx) &^ (logSector - 1)
		if _, ok := img.src.pending[off]; ok {
			continue
		}
		err := fileio.Reserve(img.src.f, off, logSector)
		if errors.Is(err, errors.ErrUnsupported) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: reserve the BAT sector at %d: %w", img.name, off, err)
		}
	}
	return nil
}

// extendLocked makes room for n bytes at the end of the file, 1 MiB-aligned, and
// returns where. The room reads as zeros (a hole).
func (img *Image) extendLocked(n int64) (int64, error) {
	start := (img.src.vsize + MiB - 1) / MiB * MiB
	if err := img.src.f.Truncate(start + n); err != nil {
		return 0, fmt.Errorf("%s: extend the file to %d: %w", img.name, start+n, err)
	}
	img.src.vsize = start + n
	return start, nil
}

// bitRange is count bitmap bits to set from sector first of block blk, in a slice
// cleared first if reset.
type bitRange struct {
	blk, first, count int64
	reset             bool
}

// maxPendingSectors bounds the metadata sectors that wait for the next Sync; past it
// they go through the log at once. 64 sectors are 32768 BAT entries or 1 Mi bitmap
// bits, and a log entry of 264 KiB.
const maxPendingSectors = 64

// commitLocked applies the BAT entries in bat and the bits in bits: at once in
// memory, and on disk through the log (flushPendingLocked) at the next Sync, or now
// if too many sectors are waiting. Until then the sectors are pending: reads of the
// file see them (source.readAt), a crash loses them, as it loses every write not yet
// synced, and the file stays consistent (the new blocks' data lies past what any BAT
// entry on disk points at).
func (img *Image) commitLocked(bat map[int64]batEntry, bits *bitRange) error {
	if len(bat) == 0 && bits == nil {
		return nil
	}
	g, name := img.geo, img.name
	if bits != nil {
		// Readers are shut out (mu): none can cache the slice again before the
		// bits are in place, and a failure below leaves the file to be read again.
		pagecache.Bitmaps.Take(pagecache.Key{Image: img.id, Block: bits.blk})
	}
	if img.src.pending == nil {
		img.src.pending = map[int64][]byte{}
	}
	sectors := img.src.pending
	get := func(off int64) ([]byte, error) {
		k := off &^ (logSector - 1)
		if s, ok := sectors[k]; ok {
			return s, nil
		}
		s := make([]byte, logSector)
		if err := img.src.readAt(s, k); err != nil {
			return nil, fmt.Errorf("%s: read metadata at %d: %w", name, k, err)
		}
		sectors[k] = s
		return s, nil
	}
	for idx, e := range bat {
		off := img.batOff + 8*idx
		s, err := get(off)
		if err != nil {
			return err
		}
		binary.LittleEndian.PutUint64(s[off%logSector:], uint64(e))
		// The page is read again, from the pending sectors: readers are shut out
		// meanwhile (mu).
		pagecache.Bitmaps.Take(batKey(img.id, idx/batPageEntries))
		img.hot.Store(nil)
	}
	if bits != nil {
		be, ok := bat[g.bitmapIndex(bits.blk)]
		if !ok {
			var err error
			if be, err = img.bitmapEntry(bits.blk); err != nil {
				return err
			}
		}
		base := be.at() + bits.blk%g.chunkRatio*g.bitmapSlice
		changed := false
		if bits.reset {
			for i := int64(0); i < g.bitmapSlice; i++ {
				sec, err := get(base + i)
				if err != nil {
					return err
				}
				sec[(base+i)%logSector] = 0
			}
		}
		for s := bits.first; s < bits.first+bits.count; s++ {
			sec, err := get(base + s/8)
			if err != nil {
				return err
			}
			i, m := (base+s/8)%logSector, byte(1)<<(s%8)
			if sec[i]&m == 0 {
				sec[i] |= m
				changed = true
			}
		}
		if !changed && len(bat) == 0 {
			return nil // every bit was set already: the data write was all
		}
	}
	if len(sectors) >= maxPendingSectors {
		return img.flushPendingLocked()
	}
	return nil
}

// flushPendingLocked makes the pending metadata sectors durable through the log (see
// logWriteLocked), the data written before them first. The caller holds mu.
func (img *Image) flushPendingLocked() error {
	if len(img.src.pending) == 0 {
		return nil
	}
	if err := img.usableLocked(0); err != nil {
		return err
	}
	return img.logWriteLocked(img.src.pending, func() { img.src.pending = nil })
}

// logWriteLocked makes the 4 KiB sectors in sectors (keyed by their 4 KiB-aligned
// file offset) durable through the log (§2.3): whatever was written before it is
// flushed; an entry holding the sectors, whose Tail is itself, is written at the
// start of the log and flushed before the header names its LogGuid, so that a cut
// leaves either no log or a complete one (§2.3.1.1); the sectors are written in
// place and flushed; applied runs (to update what the image keeps in memory); then
// the header's LogGuid is cleared. A cut before the header names the log leaves the
// old sectors; after it, an open replays the entry. The caller holds mu.
func (img *Image) logWriteLocked(sectors map[int64][]byte, applied func()) error {
	name := img.name
	if err := img.src.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", name, err)
	}
	ops := make([]logOp, 0, len(sectors))
	for k, s := range sectors {
		ops = append(ops, logOp{off: k, data: s})
	}
	sort.Slice(ops, func(a, b int) bool { return ops[a].off < ops[b].off })
	guid := NewGUID()
	img.logSeq++
	entry := marshalLogEntry(img.logSeq, 0, guid, uint64(img.src.vsize), uint64(img.src.vsize), ops)
	h := img.header
	if int64(len(entry)) > int64(h.LogLength) {
		return fmt.Errorf("%s: a log entry of %d bytes does not fit the %d-byte log: %w", name, len(entry), h.LogLength, ErrUnsupported)
	}
	if _, err := img.src.f.WriteAt(entry, int64(h.LogOffset)); err != nil {
		return fmt.Errorf("%s: write log entry at %d: %w", name, h.LogOffset, err)
	}
	if err := img.src.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", name, err)
	}
	// From here a failure may leave the entry pending in the file, with the
	// metadata in place half written: only an open's replay sets that right, so the
	// handle takes no more writes.
	fail := func(err error) error {
		img.failed = err
		return err
	}
	if err := img.updateHeader(func(h *Header) { h.LogGuid = guid }); err != nil {
		return fail(err)
	}
	for _, op := range ops {
		if _, err := img.src.f.WriteAt(op.data, op.off); err != nil {
			return fail(fmt.Errorf("%s: write metadata at %d: %w", name, op.off, err))
		}
	}
	if err := img.src.f.Sync(); err != nil {
		return fail(fmt.Errorf("%s: fsync: %w", name, err))
	}
	applied()
	if err := img.updateHeader(func(h *Header) { h.LogGuid = GUID{} }); err != nil {
		return fail(err)
	}
	return nil
}

// usableLocked returns an error if an earlier metadata update of this handle failed
// half way (see logWriteLocked). The caller holds mu.
func (img *Image) usableLocked(off int64) error {
	if img.failed != nil {
		return fmt.Errorf("%s: write at %d: an earlier metadata update failed, and only reopening the image replays its log: %w", img.name, off, img.failed)
	}
	return nil
}
