package vhd

import (
	"encoding/binary"
	"fmt"

	"github.com/vhdfs/vhdfs/internal/fileio"
)

// Resize changes the virtual size to size, a positive multiple of 512, as
// ResizeVirtualDisk does: the part both sizes share reads as before, grown space
// reads zeros (from this file: a differencing image's parent still shows where this
// file stores nothing), and what lies past a smaller size is dropped. The geometry
// follows the size: CHS(size) where it describes the size exactly, the
// 65535/16/255 marker otherwise. The caller rounds the size (RoundUpCHS) if it wants
// a geometry that describes it. No other I/O may run on the image meanwhile.
//
// Every step is behind an fsync, and a crash between two leaves an image that opens
// with the old size or the new one, the shared part unchanged:
//   - Space past the old size that is about to be shown is cleared first, while no
//     reader sees it: BAT entries past the old size dropped, the tail of a last,
//     partial block zeroed and its bitmap bits cleared.
//   - A dynamic or differencing image whose BAT is too short for the new size takes
//     the entries into the padding of the table's last sector if they fit (one write
//     of the dynamic header), or else gets a longer table before its blocks, the
//     blocks in its way copied to the end first (moveBATLocked).
//   - The footer at the end, which readers use, is rewritten in place (one sector),
//     then its copy at offset 0. A crash between the two leaves a copy that differs
//     only in the sizes and geometry, which Check reports as a warning.
//   - A fixed image's footer moves: on growth, a copy of the old footer goes to the
//     new end first (the file grows sparse), the old one is zeroed, then the new footer
//     is written over the copy; on shrinking, the new footer is written in place, a
//     copy goes to the new end, and the file is cut after it.
//
// A shrink drops the blocks past the new size after the footer has changed.
func (img *Image) Resize(size int64) error {
	if !img.writable {
		return fmt.Errorf("%s: resize: %w", img.name, ErrReadOnly)
	}
	if size <= 0 || size%SectorSize != 0 {
		return fmt.Errorf("%s: resize to %d: not a positive multiple of 512: %w", img.name, size, ErrInvalidArg)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.footerState != FooterAtEnd {
		return fmt.Errorf("%s: resize: the image has a %v; run 'vhdfs check --repair' first: %w", img.name, img.footerState, ErrUnsupported)
	}
	if size == img.size {
		if img.copyFooter == nil || *img.copyFooter == img.footer {
			return nil
		}
		// A resize that was cut between the two footers: finish it.
		if err := img.writeFooterLocked(img.footer.Marshal(), 0); err != nil {
			return err
		}
		c := img.footer
		img.copyFooter = &c
		return nil
	}
	foot := img.footer
	// The original size too: libvhdi reports it as the disk's size (and Azure's
	// disk resizer sets both); the specification calls it informational.
	foot.CurrentSize, foot.OriginalSize = uint64(size), uint64(size)
	foot.Geometry = CHS(size)
	if foot.Geometry.Bytes() != size {
		foot.Geometry = MaxGeometry
	}
	if img.header == nil {
		return img.resizeFixedLocked(foot)
	}
	if size > maxDynamicSize {
		return fmt.Errorf("%s: resize to %d: a dynamic image holds at most %d bytes: %w", img.name, size, int64(maxDynamicSize), ErrInvalidArg)
	}
	if err := img.syncLocked(); err != nil {
		return err
	}
	grow := size > img.size
	if grow {
		if err := img.dropPastLocked(img.size); err != nil {
			return err
		}
		if need := (size + img.blockSize - 1) / img.blockSize; need > int64(img.header.MaxTableEntries) {
			if need > maxBATEntries {
				return fmt.Errorf("%s: resize to %d in blocks of %d needs %d BAT entries, more than %d: %w", img.name, size, img.blockSize, need, maxBATEntries, ErrInvalidArg)
			}
			if err := img.growBATLocked(need); err != nil {
				return err
			}
		}
	}
	if err := img.writeFooterLocked(foot.Marshal(), img.footerOff); err != nil {
		return err
	}
	if err := img.writeFooterLocked(foot.Marshal(), 0); err != nil {
		return err
	}
	img.footer = foot
	c := foot
	img.copyFooter = &c
	img.size = size
	if !grow {
		return img.dropPastLocked(size)
	}
	return nil
}

// writeFooterLocked writes a footer at off and syncs.
func (img *Image) writeFooterLocked(b []byte, off int64) error {
	if _, err := img.f.WriteAt(b, off); err != nil {
		return fmt.Errorf("%s: write footer at %d: %w", img.name, off, err)
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	return nil
}

// resizeFixedLocked moves a fixed image's footer; see Resize.
func (img *Image) resizeFixedLocked(foot Footer) error {
	size := int64(foot.CurrentSize)
	old := img.footerOff
	if size > img.size {
		if size > old {
			// The old footer, as it is, at the new end; then the old place zeroed.
			if err := img.writeFooterLocked(img.footer.Marshal(), size); err != nil {
				return err
			}
			img.footerOff = size
		}
		if err := img.zeroLocked(img.size, min(size, old+FooterSize)); err != nil {
			return err
		}
		if err := img.writeFooterLocked(foot.Marshal(), img.footerOff); err != nil {
			return err
		}
		img.footer, img.size = foot, size
		return nil
	}
	if err := img.writeFooterLocked(foot.Marshal(), old); err != nil {
		return err
	}
	img.footer, img.size = foot, size
	if err := img.writeFooterLocked(foot.Marshal(), size); err != nil {
		return err
	}
	if err := img.f.Truncate(size + FooterSize); err != nil {
		return fmt.Errorf("%s: truncate to %d: %w", img.name, size+FooterSize, err)
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	img.footerOff = size
	return nil
}

// zeroLocked writes zeros over [from, to) of the file and syncs.
func (img *Image) zeroLocked(from, to int64) error {
	if from >= to {
		return nil
	}
	zeros := make([]byte, min(to-from, 1<<20))
	for off := from; off < to; off += int64(len(zeros)) {
		n := min(int64(len(zeros)), to-off)
		if _, err := img.f.WriteAt(zeros[:n], off); err != nil {
			return fmt.Errorf("%s: zero %d bytes at %d: %w", img.name, n, off, err)
		}
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	return nil
}

// dropPastLocked makes the file store nothing past size: the BAT entries of blocks
// wholly past it become unallocated, and an allocated block that size ends inside
// gets its data past size zeroed and those sectors' bitmap bits cleared. The caller
// has synced (nothing is dirty) and holds mu.
func (img *Image) dropPastLocked(size int64) error {
	first := (size + img.blockSize - 1) / img.blockSize
	for i := first; i < int64(img.bat.len()); i++ {
		if img.bat.get(i) != unallocated {
			img.bat.set(i, unallocated)
			img.dirtyBAT[uint32(i)] = true
		}
	}
	if in := size % img.blockSize; in != 0 {
		blk := size / img.blockSize
		if e := img.bat.get(blk); e != unallocated {
			start := int64(e) * SectorSize
			bm := make([]byte, img.bitmapSize)
			if _, err := img.f.ReadAt(bm, start); err != nil {
				return fmt.Errorf("%s: read bitmap of block %d at %d: %w", img.name, blk, start, err)
			}
			for s := in / SectorSize; s < img.blockSize/SectorSize; s++ {
				bm[s/8] &^= 0x80 >> (s % 8)
			}
			if err := img.zeroLocked(start+img.bitmapSize+in, start+img.bitmapSize+img.blockSize); err != nil {
				return err
			}
			if _, err := img.f.WriteAt(bm, start); err != nil {
				return fmt.Errorf("%s: write bitmap of block %d at %d: %w", img.name, blk, start, err)
			}
			bitmapCache.Drop(img.id)
		}
	}
	return img.syncLocked()
}

// growBATLocked gives the image a BAT of entries entries: in place when the
// padding of the table's last sector holds them (all unallocated, as create writes
// it), by one write of the dynamic header; moved otherwise (moveBATLocked).
func (img *Image) growBATLocked(entries int64) error {
	h := *img.header
	n := roundUp(int64(h.MaxTableEntries)*4, SectorSize)
	if entries*4 > n {
		return img.moveBATLocked(entries)
	}
	pad := make([]byte, n-int64(h.MaxTableEntries)*4)
	if _, err := img.f.ReadAt(pad, int64(h.TableOffset)+int64(h.MaxTableEntries)*4); err != nil {
		return fmt.Errorf("%s: read BAT at %d: %w", img.name, int64(h.TableOffset)+int64(h.MaxTableEntries)*4, err)
	}
	for _, c := range pad {
		if c != 0xff {
			return img.moveBATLocked(entries)
		}
	}
	h.MaxTableEntries = uint32(entries)
	if err := img.writeHeaderLocked(h); err != nil {
		return err
	}
	old := img.bat
	img.bat = newBAT(int(entries))
	copy(img.bat.pages, old.pages)
	return nil
}

// writeHeaderLocked writes the dynamic header h, syncs, and makes it the image's.
func (img *Image) writeHeaderLocked(h Header) error {
	if _, err := img.f.WriteAt(h.Marshal(), int64(img.footer.DataOffset)); err != nil {
		return fmt.Errorf("%s: write dynamic header at %d: %w", img.name, img.footer.DataOffset, err)
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	*img.header = h // in place: readers test img.header for nil without the lock
	return nil
}

// moveBATLocked gives the image a BAT of entries entries before its blocks, as
// blktap's vhd-util resize does, so that every reader, blktap's too, still finds the
// metadata before the data: where the table is if it is the last of the metadata
// (header, table, parent locators), else right after the metadata. The blocks in the
// way are copied to the end of the file first, one at a time, each behind an fsync
// before its BAT entry (in the old table) points at the copy; then the new table is
// written and synced; then one write of the dynamic header switches to it (the
// footer, if the new table reaches it, moves to the new table's end first). A crash
// leaves the old table in force, its blocks whole where it points. The caller has
// synced and holds mu.
func (img *Image) moveBATLocked(entries int64) error {
	h := *img.header
	oldOff, oldLen := int64(h.TableOffset), roundUp(int64(h.MaxTableEntries)*4, SectorSize)
	n := roundUp(entries*4, SectorSize)
	start := roundUp(img.metaEnd, SectorSize)
	if oldOff+oldLen >= start {
		start = oldOff
	}
	// The footer first goes past the new table, if the table would reach it: copies
	// of the blocks in the way go after the footer, and the table must not cover them
	// either. A crash after leaves the footer at the end of the file, where readers
	// look, and the old one in space no entry of the old table points at.
	if end := start + n; img.footerOff < end {
		if err := img.writeFooterLocked(img.footer.Marshal(), end); err != nil {
			return err
		}
		img.footerOff, img.footerState = end, FooterAtEnd
	}
	var inWay []int64
	for i, e := range img.bat.allocated() {
		if overlaps(int64(e)*SectorSize, img.bitmapSize+img.blockSize, start, n) {
			inWay = append(inWay, int64(i))
		}
	}
	for _, blk := range inWay {
		if err := img.relocateLocked(blk); err != nil {
			return err
		}
	}
	buf := make([]byte, min(n, 64<<10))
	for off := int64(0); off < n; off += int64(len(buf)) {
		k := min(int64(len(buf)), n-off)
		for j := int64(0); j < k; j += 4 {
			e := unallocated
			if i := (off + j) / 4; i < int64(img.bat.len()) {
				e = img.bat.get(i)
			}
			binary.BigEndian.PutUint32(buf[j:], e)
		}
		if _, err := img.f.WriteAt(buf[:k], start+off); err != nil {
			return fmt.Errorf("%s: write BAT at %d: %w", img.name, start+off, err)
		}
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	h.TableOffset, h.MaxTableEntries = uint64(start), uint32(entries)
	if err := img.writeHeaderLocked(h); err != nil {
		return err
	}
	old := img.bat
	img.bat = newBAT(int(entries))
	copy(img.bat.pages, old.pages)
	for i, m := range img.meta {
		if m.name == "the BAT" {
			img.meta[i] = region{start, n, m.name}
		}
	}
	img.metaEnd = max(img.metaEnd, start+n)
	return nil
}

// relocateLocked copies block blk (bitmap and data) to a new block at the end of the
// file, syncs, and points its BAT entry at the copy (syncLocked). All-zero pieces are
// not written: the new block reads as zeros where nothing is written.
func (img *Image) relocateLocked(blk int64) error {
	from := int64(img.bat.get(blk)) * SectorSize
	e, err := img.allocateLocked(uint32(blk))
	if err != nil {
		return err
	}
	to := int64(e) * SectorSize
	buf := make([]byte, min(img.bitmapSize+img.blockSize, 1<<20))
	for off := int64(0); off < img.bitmapSize+img.blockSize; off += int64(len(buf)) {
		k := min(int64(len(buf)), img.bitmapSize+img.blockSize-off)
		if _, err := img.f.ReadAt(buf[:k], from+off); err != nil {
			return fmt.Errorf("%s: read block %d at %d: %w", img.name, blk, from+off, err)
		}
		if fileio.AllZero(buf[:k]) {
			continue
		}
		if _, err := img.f.WriteAt(buf[:k], to+off); err != nil {
			return fmt.Errorf("%s: copy block %d to %d: %w", img.name, blk, to+off, err)
		}
	}
	return img.syncLocked()
}

// resizedCopy reports whether the footer copy c differs from the footer f only in
// what Resize changes: what a crash between its two footer writes leaves.
func resizedCopy(c, f Footer) bool {
	c.CurrentSize, c.OriginalSize, c.Geometry, c.Checksum = f.CurrentSize, f.OriginalSize, f.Geometry, f.Checksum
	return c == f
}

// RoundSize is RoundUpCHS: the size create makes for a request of size.
func (img *Image) RoundSize(size int64) int64 { return RoundUpCHS(size) }
