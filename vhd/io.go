package vhd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/pagecache"
)

// dataAlign is the alignment of a new block's data region, as Windows and tapdisk do,
// so that guest 4 KiB I/O maps to host 4 KiB I/O. The bitmap sits just before it.
const dataAlign = 4096

// ReadAt reads what this file stores for [off, off+len(p)): the data of allocated
// blocks (whatever their bitmap says) and zeros for unallocated ones. Package chain
// uses Run to decide which layer a byte comes from. Reads past Size return io.EOF.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: read at %d: %w", img.name, off, ErrOutOfRange)
	}
	if off >= img.size {
		return 0, io.EOF
	}
	want := len(p)
	if rem := img.size - off; int64(len(p)) > rem {
		p = p[:rem]
	}
	if img.header == nil {
		n, err := img.f.ReadAt(p, off)
		if err != nil {
			return n, fmt.Errorf("%s: read at %d: %w", img.name, off, err)
		}
	} else {
		for done := 0; done < len(p); {
			o := off + int64(done)
			blk, in := o/img.blockSize, o%img.blockSize
			n := int(min(int64(len(p)-done), img.blockSize-in))
			img.mu.RLock()
			e := img.bat.get(blk)
			img.mu.RUnlock()
			if e == unallocated {
				clear(p[done : done+n])
			} else if _, err := img.f.ReadAt(p[done:done+n], int64(e)*SectorSize+img.bitmapSize+in); err != nil {
				return done, fmt.Errorf("%s: read block %d at %d: %w", img.name, blk, int64(e)*SectorSize, err)
			}
			done += n
		}
	}
	if len(p) < want {
		return len(p), io.EOF
	}
	return len(p), nil
}

// Run reports whether the byte at off is stored in this file, and how many bytes from
// off, at most n, share that answer. Runs end on sector boundaries (or at off+n).
// Fixed images store everything; dynamic images store their allocated blocks;
// differencing images store the sectors whose bitmap bit is set. Nothing is stored
// at or past Size. n must be positive.
func (img *Image) Run(off, n int64) (int64, bool, error) {
	if off >= img.size || off < 0 {
		return n, false, nil
	}
	n = min(n, img.size-off)
	if img.header == nil {
		return n, true, nil
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	var run int64
	var present bool
	for run < n {
		o := off + run
		blk, in := o/img.blockSize, o%img.blockSize
		avail := min(n-run, img.blockSize-in)
		var k int64
		var p bool
		switch e := img.bat.get(blk); {
		case e == unallocated:
			k, p = avail, false
		case img.footer.DiskType != TypeDifferencing:
			k, p = avail, true
		default:
			pg := in / bytesPerPageData
			avail = min(avail, (pg+1)*bytesPerPageData-in)
			bm, err := img.bitmapPageLocked(uint32(blk), e, uint32(pg))
			if err != nil {
				return 0, false, err
			}
			k, p = bitRun(bm, in-pg*bytesPerPageData, avail)
		}
		if run > 0 && p != present {
			break
		}
		present = p
		run += k
		if k < avail {
			break
		}
	}
	return run, present, nil
}

// bitRun returns the length in bytes of the run starting at byte in of a block whose
// sectors have the state of in's sector, capped at avail, and that state.
func bitRun(bm []byte, in, avail int64) (int64, bool) {
	s := in / SectorSize
	set := bm[s/8]&(0x80>>(s%8)) != 0
	end := in + avail
	// First the rest of in's sector, then whole sectors.
	pos := (s + 1) * SectorSize
	for pos < end {
		s = pos / SectorSize
		if s%8 == 0 && pos+8*SectorSize <= end {
			b := bm[s/8]
			if (set && b == 0xff) || (!set && b == 0) {
				pos += 8 * SectorSize
				continue
			}
		}
		if (bm[s/8]&(0x80>>(s%8)) != 0) != set {
			break
		}
		pos += SectorSize
	}
	return min(pos, end) - in, set
}

// bitmapPageLocked returns page pg of the bitmap of block blk (BAT entry e): the
// pending bits if it has any, else the bits on disk, through the cache. The caller
// holds mu, for reading at least, and must not modify the page.
func (img *Image) bitmapPageLocked(blk, e, pg uint32) ([]byte, error) {
	k := pageKey(img.id, blk, pg)
	if len(img.dirty) > 0 {
		if bm, ok := img.dirty[k]; ok {
			return bm, nil
		}
	}
	if bm := bitmapCache.Get(k); bm != nil {
		return bm, nil
	}
	bm, err := img.readBitmapPage(k, e)
	if err != nil {
		return nil, err
	}
	// No writer can change the page while we hold mu, so what we read is current.
	bitmapCache.Put(k, bm)
	return bm, nil
}

// readBitmapPage reads page k of the bitmap of the block at BAT entry e from disk.
func (img *Image) readBitmapPage(k pagecache.Key, e uint32) ([]byte, error) {
	start := k.Page * bitmapPage
	bm := make([]byte, min(bitmapPage, img.bitmapSize-start))
	off := int64(e)*SectorSize + start
	if _, err := img.f.ReadAt(bm, off); err != nil {
		return nil, fmt.Errorf("%s: read bitmap of block %d at %d: %w", img.name, k.Block, off, err)
	}
	return bm, nil
}

// WriteAt writes whole sectors: off and len(p) must be multiples of 512 and the range
// must lie inside Size. A write into an unallocated block allocates it (see allocate
// for the order of writes), except all-zero data bound for an unallocated block of a
// dynamic image, which reads as zeros anyway. In a differencing image the written
// sectors' bitmap bits are set, zeros included, so the parent no longer shows through.
// New bitmap bits and BAT entries reach the disk at the next Sync, after the data.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if !img.writable {
		return 0, fmt.Errorf("%s: write at %d: %w", img.name, off, ErrReadOnly)
	}
	if off%SectorSize != 0 || len(p)%SectorSize != 0 {
		return 0, fmt.Errorf("%s: write of %d bytes at %d: %w", img.name, len(p), off, ErrUnaligned)
	}
	if off < 0 || off+int64(len(p)) > img.size {
		return 0, fmt.Errorf("%s: write of %d bytes at %d past the size %d: %w", img.name, len(p), off, img.size, ErrOutOfRange)
	}
	if img.header == nil {
		if _, err := img.f.WriteAt(p, off); err != nil {
			return 0, fmt.Errorf("%s: write at %d: %w", img.name, off, err)
		}
		return len(p), nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	for done := 0; done < len(p); {
		o := off + int64(done)
		blk, in := o/img.blockSize, o%img.blockSize
		n := int(min(int64(len(p)-done), img.blockSize-in))
		if err := img.writeBlockLocked(uint32(blk), in, p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	if len(img.dirtyBAT) > maxDirtyBlocks || img.dirtyBytes > maxDirtyBitmapBytes {
		if err := img.syncLocked(); err != nil {
			return len(p), err
		}
	}
	return len(p), nil
}

func (img *Image) writeBlockLocked(blk uint32, in int64, p []byte) error {
	e := img.bat.get(int64(blk))
	if e == unallocated {
		if img.footer.DiskType == TypeDynamic && fileio.AllZero(p) {
			return nil
		}
		var err error
		if e, err = img.allocateLocked(blk); err != nil {
			return err
		}
	}
	blockOff := int64(e) * SectorSize
	if _, err := img.f.WriteAt(p, blockOff+img.bitmapSize+in); err != nil {
		return fmt.Errorf("%s: write block %d at %d: %w", img.name, blk, blockOff+img.bitmapSize+in, err)
	}
	return img.markWrittenLocked(blk, e, in, int64(len(p)))
}

// markWrittenLocked sets the bitmap bits of the n bytes at in of block blk, whose BAT
// entry is e, after their data was written. The caller holds mu for writing.
func (img *Image) markWrittenLocked(blk, e uint32, in, n int64) error {
	first, end := in/SectorSize, (in+n)/SectorSize
	for pg := first / sectorsPerPage; pg*sectorsPerPage < end; pg++ {
		k := pageKey(img.id, blk, uint32(pg))
		bm, ok := img.dirty[k]
		if !ok {
			var err error
			if bm, err = img.pageToChangeLocked(k, e); err != nil {
				return err
			}
		}
		lo, hi := max(first, pg*sectorsPerPage), min(end, (pg+1)*sectorsPerPage)
		switch {
		case setBits(bm, lo-pg*sectorsPerPage, hi-lo) && !ok:
			img.dirty[k] = bm
			img.dirtyBytes += int64(len(bm))
		case !ok:
			bitmapCache.Put(k, bm)
		}
	}
	return nil
}

// pageToChangeLocked returns a clean bitmap page for a writer to change, taken out
// of the cache or read from disk (a new block's bitmap lies in a hole and reads as
// zeros). The caller holds mu for writing.
func (img *Image) pageToChangeLocked(k pagecache.Key, e uint32) ([]byte, error) {
	if bm := bitmapCache.Take(k); bm != nil {
		return bm, nil
	}
	return img.readBitmapPage(k, e)
}

// setBits sets count bits from sector s and reports whether any changed.
func setBits(bm []byte, s, count int64) bool {
	changed := false
	for ; count > 0; s, count = s+1, count-1 {
		if s%8 == 0 && count >= 8 {
			if bm[s/8] != 0xff {
				bm[s/8], changed = 0xff, true
			}
			s, count = s+7, count-7
			continue
		}
		m := byte(0x80 >> (s % 8))
		if bm[s/8]&m == 0 {
			bm[s/8] |= m
			changed = true
		}
	}
	return changed
}

// allocateLocked places block blk past the end of the data, beyond the footer that is
// there now, which it leaves alone. The order of writes keeps the file valid if the
// process dies (or the power fails) between any two:
//
//  1. the footer at its new place past the block, which extends the file: the file
//     now ends in a valid footer, the old one stays whole in space no BAT entry
//     references, and the new bitmap lies in the hole, reading as zeros;
//  2. the space of the bitmap and the data reserved (fallocate; where the file system
//     cannot, the zero bitmap is written instead), so that no later write into the
//     block, the data now or the bitmap at Sync, fails for want of room: ENOSPC goes
//     to the write that allocates, not to a flush after the writes were acknowledged;
//  3. (the caller) the data, into the new, still unreferenced block;
//  4. at Sync: fsync, then the bitmap with the written sectors' bits, then the BAT
//     entry, then fsync again.
//
// A death before 4 leaves an unreferenced tail that reads as before; after it, the
// block is complete. If 1 or 2 fails, the file is cut back to its old end, where the
// old footer still is, and the image is as it was (a failed cut leaves the new footer
// at the end: valid too). The footer copy at offset 0 never changes: its fields do not.
func (img *Image) allocateLocked(blk uint32) (uint32, error) {
	end := img.footerOff + FooterSize // the old footer stays; a 511-byte one too
	start := roundUp(end+img.bitmapSize, dataAlign) - img.bitmapSize
	if start/SectorSize >= int64(unallocated) {
		return 0, fmt.Errorf("%s: allocate block %d: file would exceed the 2 TiB a BAT can address: %w", img.name, blk, ErrOutOfRange)
	}
	oldSize := end
	if img.footerState == FooterShort {
		oldSize--
	}
	newFooterOff := start + img.bitmapSize + img.blockSize
	if _, err := img.f.WriteAt(img.footer.Marshal(), newFooterOff); err != nil {
		_ = img.f.Truncate(oldSize)
		return 0, fmt.Errorf("%s: write footer at %d: %w", img.name, newFooterOff, err)
	}
	if err := img.reserveBlock(blk, start); err != nil {
		_ = img.f.Truncate(oldSize)
		return 0, err
	}
	img.footerOff = newFooterOff
	img.footerState = FooterAtEnd
	e := uint32(start / SectorSize)
	img.bat.set(int64(blk), e)
	img.dirtyBAT[blk] = true
	return e, nil
}

// reserveBlock reserves the space of a new block's bitmap and data at start, or,
// where the file system cannot, writes the zero bitmap so that at least the write at
// Sync, which follows acknowledged writes, needs no new space. The data of a block
// larger than maxReservedData is not reserved (a 2 GiB block would take 2 GiB of disk
// for one sector): a data write is a write(2) of its own and gets its ENOSPC itself.
func (img *Image) reserveBlock(blk uint32, start int64) error {
	if img.noReserve {
		return nil
	}
	n := img.bitmapSize + img.blockSize
	if img.blockSize > maxReservedData {
		n = img.bitmapSize
	}
	err := reserve(img.f, start, n)
	if errors.Is(err, errors.ErrUnsupported) {
		if _, err := img.f.WriteAt(make([]byte, img.bitmapSize), start); err != nil {
			return fmt.Errorf("%s: write bitmap of new block %d at %d: %w", img.name, blk, start, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: reserve %d bytes for block %d at %d: %w", img.name, n, blk, start, err)
	}
	return nil
}

// NoReservation stops reserving the space of new blocks: for a writer whose writes
// nobody has been told are done before its own Sync succeeds (a merge copying into
// its target, which fails as a whole on ENOSPC), the reservation only costs time
// (a fallocate per block: a fifth of a 1 GiB merge). Call it before the first write.
func (img *Image) NoReservation() { img.noReserve = true }

// maxReservedData is the largest block whose data space is reserved at allocation:
// the 2 MiB of Windows and qemu and well above.
const maxReservedData = 16 << 20

// Sync makes every write before it durable: data first, then bitmaps, then BAT
// entries, each step behind an fsync so metadata never points at missing data.
func (img *Image) Sync() error {
	if !img.writable {
		return nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.syncLocked()
}

func (img *Image) syncLocked() error {
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	if len(img.dirtyBAT) == 0 && len(img.dirty) == 0 {
		return nil
	}
	for k, bm := range img.dirty {
		off := int64(img.bat.get(k.Block))*SectorSize + k.Page*bitmapPage
		if _, err := img.f.WriteAt(bm, off); err != nil {
			return fmt.Errorf("%s: write bitmap of block %d at %d: %w", img.name, k.Block, off, err)
		}
		delete(img.dirty, k)
		img.dirtyBytes -= int64(len(bm))
		bitmapCache.Put(k, bm)
	}
	// BAT entries go out a sector at a time: a sector write is atomic on disk.
	sectors := map[int64]bool{}
	for blk := range img.dirtyBAT {
		sectors[int64(blk)*4/SectorSize] = true
	}
	buf := make([]byte, SectorSize)
	for s := range sectors {
		first := s * SectorSize / 4
		k := 0
		for i := first; i < first+SectorSize/4 && i < int64(img.bat.len()); i++ {
			binary.BigEndian.PutUint32(buf[4*k:], img.bat.get(i))
			k++
		}
		off := int64(img.header.TableOffset) + s*SectorSize
		if _, err := img.f.WriteAt(buf[:4*k], off); err != nil {
			return fmt.Errorf("%s: write BAT at %d: %w", img.name, off, err)
		}
	}
	clear(img.dirtyBAT)
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	return nil
}
