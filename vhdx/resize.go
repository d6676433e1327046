package vhdx

import (
	"encoding/binary"
	"fmt"
	"iter"

	"github.com/vhdfs/vhdfs/internal/pagecache"
)

// Resize changes the virtual size to size, a positive multiple of the logical sector
// of at most 64 TiB, as ResizeVirtualDisk does: the part both sizes share reads as
// before, grown space reads zeros (or, in a differencing image, its parent where the
// file stores nothing), and what lies past a smaller size is dropped. A size that
// needs more BAT entries than the BAT region holds (create rounds it up to a whole
// MiB, room for 131072 entries; Windows sizes it tightly) gets a new region at the end
// of the file, 1 MiB-aligned and just large enough (see batmove.go); the old
// region's space is freed (punched) afterwards. No other I/O may run on the image
// meanwhile.
//
// The virtual disk size item changes through the log (§2.3), in one entry with the
// BAT entries it takes in or drops, and with both copies of the region table when
// the BAT moves, so a crash leaves the old size or the new one. Before that entry,
// and invisible to readers until it is in place, the space to be shown is cleared:
// BAT entries past the old end made NOT_PRESENT (through the log, in entries of their
// own if there are many, or simply not copied into a new region), and the data past
// the old size in a last, partial block zeroed in place and its sector bits cleared.
func (img *Image) Resize(size int64) error {
	if !img.writable {
		return fmt.Errorf("%s: resize: %w", img.name, ErrReadOnly)
	}
	g := img.geo
	if size <= 0 || size > maxVirtualSize || size%g.sectorSize != 0 {
		return fmt.Errorf("%s: resize to %d: not a positive multiple of the %d-byte logical sector up to 64 TiB: %w", img.name, size, g.sectorSize, ErrInvalidArg)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.usableLocked(0); err != nil {
		return err
	}
	if size == g.size {
		return nil
	}
	m := *img.meta.Load()
	ng := newGeometry(size, g.blockSize, g.sectorSize, m.HasParent)
	var batLen, mdOff int64
	for _, r := range img.regions {
		switch r.Guid {
		case RegionBAT:
			batLen = int64(r.Length)
		case RegionMetadata:
			mdOff = int64(r.FileOffset)
		}
	}
	move := ng.entries*8 > batLen // only a larger size can need more entries
	oldBAT := span{img.batOff, batLen, "the old BAT region"}
	if err := img.flushPendingLocked(); err != nil {
		return err
	}
	if err := img.beginWriteLocked(); err != nil {
		return err
	}
	sizeOff, err := img.sizeItemOffset(mdOff)
	if err != nil {
		return err
	}
	sectors := map[int64][]byte{}
	var regions []RegionEntry
	if size > g.size {
		if err := img.clearTailLocked(sectors); err != nil {
			return err
		}
		if move {
			if regions, err = img.newBATRegionLocked(ng, sectors); err != nil {
				return err
			}
		} else if err := img.clearEntriesLocked(g, ng); err != nil {
			return err
		}
	}
	if err := img.putLocked(sectors, sizeOff, binary.LittleEndian.AppendUint64(nil, uint64(size))); err != nil {
		return err
	}
	if size < g.size {
		for i := range dropped(ng, g) {
			if err := img.putLocked(sectors, img.batOff+8*i, make([]byte, 8)); err != nil {
				return err
			}
		}
	}
	later := false
	if size < g.size && len(sectors) > maxPendingSectors {
		// Too many dropped entries for one log entry: the size goes alone, and the
		// entries past it, which no reader consults then, follow.
		sectors, later = map[int64][]byte{}, true
		if err := img.putLocked(sectors, sizeOff, binary.LittleEndian.AppendUint64(nil, uint64(size))); err != nil {
			return err
		}
	}
	err = img.logWriteLocked(sectors, func() {
		m.VirtualDiskSize = uint64(size)
		img.meta.Store(&m)
		img.geo = ng
		if regions != nil {
			img.useRegionsLocked(regions)
		}
		// BAT pages are keyed by their page in the table, not by file offset:
		// after a move, those of the old region would pass for the new one's.
		pagecache.Bitmaps.Drop(img.id)
		img.hot.Store(nil)
	})
	if err == nil && later {
		err = img.clearEntriesLocked(ng, g)
	}
	if err == nil && regions != nil {
		// The log is empty again: nothing refers to the old region. A failure
		// leaves its space allocated, and the resize done.
		_ = zeroRange(img.src.f, oldBAT.off, oldBAT.len, img.Type() == TypeFixed)
	}
	return err
}

// sizeItemOffset is where the virtual disk size item lies in the file.
func (img *Image) sizeItemOffset(mdOff int64) (int64, error) {
	tbl := make([]byte, metadataTableSize)
	if err := img.src.readAt(tbl, mdOff); err != nil {
		return 0, fmt.Errorf("%s: read metadata table at %d: %w", img.name, mdOff, err)
	}
	count := int(binary.LittleEndian.Uint16(tbl[10:]))
	entries := make([]MetadataEntry, count)
	if _, err := binary.Decode(tbl[metadataHeaderLen:], binary.LittleEndian, entries); err != nil {
		return 0, fmt.Errorf("%s: metadata table at %d: %w", img.name, mdOff, ErrCorrupt)
	}
	for _, e := range entries {
		if e.ItemID == ItemVirtualDiskSize && e.Flags&itemIsUser == 0 && e.Length == 8 {
			return mdOff + int64(e.Offset), nil
		}
	}
	return 0, fmt.Errorf("%s: the metadata table has no virtual disk size item: %w", img.name, ErrCorrupt)
}

// putLocked puts b at file offset off into the 4 KiB sectors of sectors (see
// sectorLocked).
func (img *Image) putLocked(sectors map[int64][]byte, off int64, b []byte) error {
	for len(b) > 0 {
		k := off &^ (logSector - 1)
		s, err := img.sectorLocked(sectors, k)
		if err != nil {
			return err
		}
		n := copy(s[off-k:], b)
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// sectorLocked returns the sector at k from sectors, read from the file into it the
// first time.
func (img *Image) sectorLocked(sectors map[int64][]byte, k int64) ([]byte, error) {
	if s, ok := sectors[k]; ok {
		return s, nil
	}
	s := make([]byte, logSector)
	if err := img.src.readAt(s, k); err != nil {
		return nil, fmt.Errorf("%s: read metadata at %d: %w", img.name, k, err)
	}
	sectors[k] = s
	return s, nil
}

// dropped yields the BAT entries that a disk of geometry large uses and one of small,
// the same but for its size, does not: the payload entries of the blocks past small's
// last, and the sector bitmap entries past small's entries (a differencing image's
// last chunk keeps its bitmap entry).
func dropped(small, large geometry) iter.Seq[int64] {
	return func(yield func(int64) bool) {
		for i := small.payloadIndex(small.blocks); i < large.entries; i++ {
			if (!large.isBitmap(i) || i >= small.entries) && !yield(i) {
				return
			}
		}
	}
}

// clearEntriesLocked makes the entries dropped(small, large), which no reader
// consults, NOT_PRESENT through the log, skipping sectors that are clear already, in
// log entries of at most maxPendingSectors sectors.
func (img *Image) clearEntriesLocked(small, large geometry) error {
	sectors := map[int64][]byte{}
	clean := map[int64]bool{}
	for i := range dropped(small, large) {
		off := img.batOff + 8*i
		k := off &^ (logSector - 1)
		if clean[k] {
			continue
		}
		if _, ok := sectors[k]; !ok {
			s := make([]byte, logSector)
			if err := img.src.readAt(s, k); err != nil {
				return fmt.Errorf("%s: read BAT at %d: %w", img.name, k, err)
			}
			if allZero(s[off-k:]) {
				clean[k] = true
				continue
			}
			if len(sectors) >= maxPendingSectors {
				if err := img.logWriteLocked(sectors, func() {}); err != nil {
					return err
				}
				sectors = map[int64][]byte{}
			}
			sectors[k] = s
		}
		binary.LittleEndian.PutUint64(sectors[k][off-k:], 0)
	}
	if len(sectors) == 0 {
		return nil
	}
	return img.logWriteLocked(sectors, func() {})
}

// clearTailLocked zeroes, in place, the data past the virtual size in the last
// block, if it is partial and stored, and puts the cleared sector bits of a partly
// present one into sectors. The caller holds mu.
func (img *Image) clearTailLocked(sectors map[int64][]byte) error {
	g := img.geo
	in := g.size % g.blockSize
	if in == 0 {
		return nil
	}
	blk := g.size / g.blockSize
	e, err := img.entry(g.payloadIndex(blk))
	if err != nil {
		return err
	}
	if e.state() != FullyPresent && e.state() != PartiallyPresent {
		return nil
	}
	zeros := make([]byte, min(g.blockSize-in, MiB))
	for off := e.at() + in; off < e.at()+g.blockSize; off += int64(len(zeros)) {
		n := min(int64(len(zeros)), e.at()+g.blockSize-off)
		if _, err := img.src.f.WriteAt(zeros[:n], off); err != nil {
			return fmt.Errorf("%s: zero block %d past the disk's end at %d: %w", img.name, blk, off, err)
		}
	}
	if err := img.src.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	if e.state() != PartiallyPresent {
		return nil
	}
	be, err := img.bitmapEntry(blk)
	if err != nil {
		return err
	}
	base := be.at() + blk%g.chunkRatio*g.bitmapSlice
	for s := in / g.sectorSize; s < g.blockSize/g.sectorSize; s++ {
		off := base + s/8
		k := off &^ (logSector - 1)
		sec, err := img.sectorLocked(sectors, k)
		if err != nil {
			return err
		}
		sec[off-k] &^= 1 << (s % 8)
	}
	return nil
}
