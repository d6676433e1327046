package vhdx

import (
	"encoding/binary"
	"fmt"
	"sort"

	"github.com/vhdfs/vhdfs/image"
)

// SetParent points a writable differencing image at a new parent (after a merge has
// made the image at parentPath hold everything the old parent showed): a new parent
// locator item with parent_linkage = parentID as "{guid}", relative_path from
// childPath's folder and absolute_win32_path (see newLocator); parent_linkage2 and
// volume_path, which would name the old parent, are dropped. The item is rewritten
// in place if it fits before the next item, else placed in free space of the
// metadata region, and the table entry updated; all of it through the log
// (logWriteLocked), as MS-VHDX prescribes for metadata (§2.3), so that a cut at any
// write leaves a file that opens, replaying, with the old locator or the new one.
// The header gets a new FileWriteGuid first, if this open has not set one; the
// DataWriteGuid stays: a merge relies on the child's ID staying what it sets.
// ParentLocator and Metadata must not run concurrently with it.
func (img *Image) SetParent(parentID image.ID, parentPath, childPath string) error {
	if !img.writable {
		return fmt.Errorf("%s: set parent: %w", img.name, ErrReadOnly)
	}
	if !img.meta.Load().HasParent {
		return fmt.Errorf("%s: set parent of a %v image: %w", img.name, img.Type(), ErrInvalidArg)
	}
	kvs, err := newLocator(parentID.String(), parentPath, childPath)
	if err != nil {
		return fmt.Errorf("%s: set parent: %w", img.name, err)
	}
	item, err := marshalParentLocator(kvs)
	if err != nil {
		return fmt.Errorf("%s: set parent: %w", img.name, err)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.usableLocked(0); err != nil {
		return err
	}
	if err := img.flushPendingLocked(); err != nil {
		return err
	}
	var md *RegionEntry
	for i := range img.regions {
		if img.regions[i].Guid == RegionMetadata {
			md = &img.regions[i]
		}
	}
	mdOff, mdLen := int64(md.FileOffset), int64(md.Length)
	tbl := make([]byte, metadataTableSize)
	if err := img.src.readAt(tbl, mdOff); err != nil {
		return fmt.Errorf("%s: read metadata table at %d: %w", img.name, mdOff, err)
	}
	count := int(binary.LittleEndian.Uint16(tbl[10:]))
	entries := make([]MetadataEntry, count)
	if _, err := binary.Decode(tbl[metadataHeaderLen:], binary.LittleEndian, entries); err != nil {
		return fmt.Errorf("%s: metadata table at %d: %w", img.name, mdOff, ErrCorrupt)
	}
	idx := -1
	for i, e := range entries {
		if e.ItemID == ItemParentLocator && e.Flags&itemIsUser == 0 {
			idx = i
		}
	}
	if idx < 0 {
		return fmt.Errorf("%s: set parent: the metadata table has no parent locator: %w", img.name, ErrCorrupt)
	}
	old := entries[idx]
	at, ok := placeItem(entries, idx, int64(len(item)), mdLen)
	if !ok {
		return fmt.Errorf("%s: set parent: no room for a %d-byte parent locator in the %d-byte metadata region: %w", img.name, len(item), mdLen, ErrUnsupported)
	}

	sectors := map[int64][]byte{}
	// put copies b into the sectors at off in the file, reading each sector first.
	put := func(b []byte, off int64) error {
		for len(b) > 0 {
			k := off &^ (logSector - 1)
			s, ok := sectors[k]
			if !ok {
				s = make([]byte, logSector)
				if err := img.src.readAt(s, k); err != nil {
					return fmt.Errorf("%s: read metadata at %d: %w", img.name, k, err)
				}
				sectors[k] = s
			}
			n := copy(s[off-k:], b)
			b, off = b[n:], off+int64(n)
		}
		return nil
	}
	if err := put(item, mdOff+at); err != nil {
		return err
	}
	entries[idx].Offset, entries[idx].Length = uint32(at), uint32(len(item))
	e := make([]byte, metadataEntryLen)
	if _, err := binary.Encode(e, binary.LittleEndian, entries[idx]); err != nil {
		return err
	}
	if err := put(e, mdOff+metadataHeaderLen+int64(idx)*metadataEntryLen); err != nil {
		return err
	}
	// The old item's bytes that the sectors written anyway hold, outside the new
	// item, are cleared; the rest stay, unused.
	oldStart, oldEnd := mdOff+int64(old.Offset), mdOff+int64(old.Offset)+int64(old.Length)
	newStart, newEnd := mdOff+at, mdOff+at+int64(len(item))
	for k, s := range sectors {
		for o := max(k, oldStart); o < min(k+logSector, oldEnd); o++ {
			if o < newStart || o >= newEnd {
				s[o-k] = 0
			}
		}
	}

	if !img.fileWriteGuidSet {
		if err := img.updateHeader(func(h *Header) { h.FileWriteGuid = NewGUID() }); err != nil {
			return err
		}
		img.fileWriteGuidSet = true
	}
	return img.logWriteLocked(sectors, func() {
		m := *img.meta.Load()
		m.LocatorType, m.ParentLocator = LocatorTypeVHDX, kvs
		img.meta.Store(&m)
	})
}

// placeItem returns where, from the start of a metadata region of length mdLen,
// item idx of entries can hold n bytes: where it is, if that overlaps no other item;
// else the first gap past the table that fits, 8-byte aligned. ok is false if no gap
// does.
func placeItem(entries []MetadataEntry, idx int, n, mdLen int64) (at int64, ok bool) {
	var used []span
	for i, e := range entries {
		if i != idx && e.Length > 0 {
			used = append(used, span{int64(e.Offset), int64(e.Length), ""})
		}
	}
	free := func(off int64) bool {
		if off < metadataTableSize || off+n > mdLen {
			return false
		}
		for _, u := range used {
			if overlaps(off, n, u.off, u.len) {
				return false
			}
		}
		return true
	}
	if cur := int64(entries[idx].Offset); free(cur) {
		return cur, true
	}
	sort.Slice(used, func(a, b int) bool { return used[a].off < used[b].off })
	at = metadataTableSize
	for _, u := range used {
		if free(at) {
			return at, true
		}
		at = max(at, (u.off+u.len+7)&^7)
	}
	return at, free(at)
}
