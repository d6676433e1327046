package vhd

import (
	"fmt"
	"strings"
)

// SetParent points a writable differencing image at a new parent (after a merge has
// made the image at parentPath hold everything the old parent showed): the parent
// unique ID parentID, the parent's base name, time stamp 0 and fresh W2ru and MacX
// locators relative to childPath, the image's own path.
//
// The new locator data goes where no header points yet, and the old header stays
// valid until one 1024-byte write of the new header switches everything at once;
// that write lies in the first 4 KiB of the file, within one physical sector of a 4K
// disk. The data goes, in this order of preference:
//   - into free room before the first data block: the room vhdfs reserves when it
//     creates a differencing image, the unused part of the data space other tools
//     reserve (Windows: 4096 and 65536 bytes), or the locator data of an earlier
//     re-link, which the header no longer points at;
//   - past the end, the footer pushed back first, when the image has no data block:
//     every later block then follows the locators;
//   - past the end of an image whose blocks leave no room (made by a tool that
//     reserves none): every reader finds the parent, but blktap's vhd-util check
//     then says "block N clobbers headers", and vhdfs check notes it.
//
// The old locator data is left where it was, unused.
func (img *Image) SetParent(parentID UUID, parentPath, childPath string) error {
	if !img.writable {
		return fmt.Errorf("%s: set parent: %w", img.name, ErrReadOnly)
	}
	if img.footer.DiskType != TypeDifferencing {
		return fmt.Errorf("%s: set parent of a %v image: %w", img.name, img.footer.DiskType, ErrInvalidArg)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	// Data and pending metadata first, so nothing below refers to unwritten blocks.
	if err := img.syncLocked(); err != nil {
		return err
	}
	h := *img.header
	locs, err := parentFields(&h, parentID, parentPath, childPath)
	if err != nil {
		return fmt.Errorf("%s: set parent: %w", img.name, err)
	}
	if placeLocators(&h, locs, img.freeLocatorRoomLocked()) {
		for _, l := range locs {
			off := int64(h.ParentLocators[l.slot].PlatformDataOffset)
			buf := make([]byte, h.ParentLocators[l.slot].PlatformDataSpace)
			copy(buf, l.data)
			if _, err := img.f.WriteAt(buf, off); err != nil {
				return fmt.Errorf("%s: write parent locator at %d: %w", img.name, off, err)
			}
		}
		if err := img.f.Sync(); err != nil {
			return fmt.Errorf("%s: fsync: %w", img.name, err)
		}
	} else if err := img.appendLocatorsLocked(&h, locs); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(h.Marshal(), int64(img.footer.DataOffset)); err != nil {
		return fmt.Errorf("%s: write dynamic header at %d: %w", img.name, img.footer.DataOffset, err)
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	*img.header = h // in place: readers test img.header for nil without the lock
	meta := img.meta[:0:0]
	for _, m := range img.meta {
		if !strings.HasPrefix(m.name, "parent locator") {
			meta = append(meta, m)
		}
	}
	for _, l := range locs {
		e := h.ParentLocators[l.slot]
		meta = append(meta, region{int64(e.PlatformDataOffset), int64(e.PlatformDataLength), fmt.Sprintf("parent locator %d", l.slot)})
		img.metaEnd = max(img.metaEnd, int64(e.PlatformDataOffset)+int64(e.PlatformDataSpace))
	}
	img.meta = meta
	return nil
}

// appendLocatorsLocked puts the locator data past the old footer, which stays whole:
// the footer at its new place first, then the data, then fsync. The caller holds mu.
func (img *Image) appendLocatorsLocked(h *Header, locs []locatorData) error {
	start := img.footerOff + FooterSize
	if img.footerState == FooterShort {
		start--
	}
	start = roundUp(start, SectorSize)
	end := start
	for _, l := range locs {
		n := roundUp(int64(len(l.data)), SectorSize)
		h.ParentLocators[l.slot] = Locator{PlatformCode: l.code, PlatformDataSpace: uint32(n), PlatformDataLength: uint32(len(l.data)), PlatformDataOffset: uint64(end)}
		end += n
	}
	if _, err := img.f.WriteAt(img.footer.Marshal(), end); err != nil {
		return fmt.Errorf("%s: write footer at %d: %w", img.name, end, err)
	}
	buf := make([]byte, end-start)
	for _, l := range locs {
		copy(buf[int64(h.ParentLocators[l.slot].PlatformDataOffset)-start:], l.data)
	}
	if _, err := img.f.WriteAt(buf, start); err != nil {
		return fmt.Errorf("%s: write parent locators at %d: %w", img.name, start, err)
	}
	img.footerOff = end
	img.footerState = FooterAtEnd
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	return nil
}

// SetUniqueID gives a writable image a new unique ID: the footer at the end first,
// which is the one readers use, then the copy at offset 0 of a dynamic or
// differencing image, each behind an fsync. A crash between the two leaves the new
// ID in force and a copy that check reports and a merge journal's recovery rewrites.
func (img *Image) SetUniqueID(id UUID) error {
	if !img.writable {
		return fmt.Errorf("%s: set unique ID: %w", img.name, ErrReadOnly)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.syncLocked(); err != nil {
		return err
	}
	foot := img.footer
	foot.UniqueID = id
	b := foot.Marshal()
	if img.footerState == FooterShort {
		b = b[:FooterSize-1]
	}
	if _, err := img.f.WriteAt(b, img.footerOff); err != nil {
		return fmt.Errorf("%s: write footer at %d: %w", img.name, img.footerOff, err)
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	img.footer.UniqueID = id
	if img.header != nil {
		if _, err := img.f.WriteAt(foot.Marshal(), 0); err != nil {
			return fmt.Errorf("%s: write footer copy at 0: %w", img.name, err)
		}
		if err := img.f.Sync(); err != nil {
			return fmt.Errorf("%s: fsync: %w", img.name, err)
		}
		c := foot
		img.copyFooter = &c
	}
	return nil
}
