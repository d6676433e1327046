package vhd

import (
	"fmt"
	"sort"
)

// SetParent points a writable differencing image at a new parent (after a merge has
// made the image at parentPath hold everything the old parent showed): the parent
// unique ID parentID, time stamp, name and fresh W2ku and W2ru locators. childPath is
// the image's own path, for the relative locator.
//
// The new locator data goes past the end of the file the way a block does (footer
// pushed back first, then the data, fsync), so the old header stays valid until one
// 1024-byte write of the new header switches everything at once; that write lies in
// the first 4 KiB of the file, within one physical sector of a 4K disk. The old
// locator data is left where it was, unused.
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
	start := img.footerOff + FooterSize // past the old footer, which stays whole
	data, end, err := setParentFields(&h, start, parentID, parentPath, childPath)
	if err != nil {
		return fmt.Errorf("%s: set parent: %w", img.name, err)
	}
	newFooterOff := roundUp(end, SectorSize)
	if _, err := img.f.WriteAt(img.footer.Marshal(), newFooterOff); err != nil {
		return fmt.Errorf("%s: write footer at %d: %w", img.name, newFooterOff, err)
	}
	buf := make([]byte, newFooterOff-start)
	slots := make([]int, 0, len(data))
	for s := range data {
		slots = append(slots, s)
	}
	sort.Ints(slots)
	for _, s := range slots {
		copy(buf[int64(h.ParentLocators[s].PlatformDataOffset)-start:], data[s])
	}
	if _, err := img.f.WriteAt(buf, start); err != nil {
		return fmt.Errorf("%s: write parent locators at %d: %w", img.name, start, err)
	}
	img.footerOff = newFooterOff
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	if _, err := img.f.WriteAt(h.Marshal(), int64(img.footer.DataOffset)); err != nil {
		return fmt.Errorf("%s: write dynamic header at %d: %w", img.name, img.footer.DataOffset, err)
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	*img.header = h // in place: readers test img.header for nil without the lock
	for s := range data {
		l := h.ParentLocators[s]
		img.meta = append(img.meta, region{int64(l.PlatformDataOffset), int64(l.PlatformDataLength), fmt.Sprintf("parent locator %d", s)})
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
