package vhd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/pack"
)

// compactBatch bounds the blocks copied between two BAT updates: each batch costs
// two fsyncs, whatever its size.
var compactBatch = 64

// Compact drops the blocks that read all zeros where dropping keeps the view, then
// moves the last blocks into the lowest holes and cuts the file after the last one
// (Optimize-VHD). A dynamic image drops every all-zero block. A differencing image
// drops a block only when the sectors its bitmap marks present are zeros and
// o.BelowZero says the parent reads zeros there too (its other sectors show the
// parent already); a block with no sector present is always dropped.
//
// The order of writes keeps the file valid, with the same view, if the process dies
// between any two of them:
//
//  1. the dropped blocks' BAT entries, then fsync: the blocks' space is now
//     unreferenced;
//  2. for each batch of moves, the blocks' bitmaps and data copied into holes no
//     entry references, fsync, their BAT entries switched, fsync: each entry names
//     the old copy or the new one, both whole; an old place is only reused by a
//     later batch (never: holes are filled from below the highest block only);
//  3. the footer written right after the last block, fsync: the file still ends in
//     the old footer, the new one lies in space no entry references; then the file
//     cut after the new footer, fsync.
//
// The footer copy at offset 0 and the unique ID do not change: the view does not.
// A fixed image has nothing to compact (ErrUnsupported). The caller has the image
// open for writing, and alone, unless o.DryRun.
func (img *Image) Compact(ctx context.Context, o image.CompactOptions) (image.CompactResult, error) {
	var res image.CompactResult
	if img.header == nil {
		return res, fmt.Errorf("%s: a fixed image has no blocks to drop or move: %w", img.name, ErrUnsupported)
	}
	if !img.writable && !o.DryRun {
		return res, fmt.Errorf("%s: compact: %w", img.name, ErrReadOnly)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.hasBatmap() {
		return res, fmt.Errorf("%s: has a blktap batmap, which compact would leave naming dropped blocks: %w", img.name, ErrUnsupported)
	}
	if img.writable {
		if err := img.syncLocked(); err != nil {
			return res, err
		}
	}
	res.OldSize = img.footerOff + FooterSize
	if img.footerState == FooterShort {
		res.OldSize--
	}
	type block struct {
		i int
		e uint32
	}
	var blocks []block
	for i, e := range img.bat.allocated() {
		blocks = append(blocks, block{i, e})
	}
	res.Blocks = len(blocks)
	total := int64(len(blocks)) * img.blockSize
	progress := func(done int64) {
		if o.Progress != nil {
			o.Progress(done, total)
		}
	}

	// Which blocks go.
	drop := map[int]bool{}
	buf := make([]byte, img.bitmapSize+img.blockSize)
	for k, b := range blocks {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		progress(int64(k) * img.blockSize)
		ok, kept, err := img.droppable(b.i, b.e, buf, o.BelowZero)
		if err != nil {
			return res, err
		}
		if ok {
			drop[b.i] = true
		}
		if kept {
			res.Kept++
		}
	}
	res.Dropped = len(drop)

	// Where the others go.
	var ext []pack.Extent
	for _, m := range img.metaRegions() {
		ext = append(ext, pack.Extent{ID: -1, Off: m.off, Len: m.len, Fixed: true})
	}
	for _, b := range blocks {
		if !drop[b.i] {
			ext = append(ext, pack.Extent{ID: int64(b.i), Off: int64(b.e) * SectorSize, Len: img.bitmapSize + img.blockSize})
		}
	}
	moves, end := pack.Plan(ext, img.fit)
	res.Moved = len(moves)
	scanned := total
	total += int64(len(moves)) * img.blockSize
	newFooterOff := roundUp(max(end, img.metaEnd), SectorSize)
	res.NewSize = min(newFooterOff+FooterSize, res.OldSize)
	if o.DryRun {
		return res, nil
	}

	if len(drop) > 0 {
		for i := range drop {
			img.bat.set(int64(i), unallocated)
			img.dirtyBAT[uint32(i)] = true
		}
		if err := img.syncLocked(); err != nil {
			return res, err
		}
		for i := range drop {
			for pg := int64(0); pg*bitmapPage < img.bitmapSize; pg++ {
				bitmapCache.Take(pageKey(img.id, uint32(i), uint32(pg)))
			}
		}
	}
	for len(moves) > 0 {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		batch := moves[:min(compactBatch, len(moves))]
		moves = moves[len(batch):]
		for _, m := range batch {
			if err := img.copyBlock(buf, m); err != nil {
				return res, err
			}
		}
		for _, m := range batch {
			img.bat.set(m.ID, uint32(m.To/SectorSize))
			img.dirtyBAT[uint32(m.ID)] = true
		}
		// fsync (the copies), the BAT sectors, fsync.
		if err := img.syncLocked(); err != nil {
			return res, err
		}
		progress(scanned + int64(res.Moved-len(moves))*img.blockSize)
	}
	if newFooterOff+FooterSize < res.OldSize {
		if _, err := img.f.WriteAt(img.footer.Marshal(), newFooterOff); err != nil {
			return res, fmt.Errorf("%s: write footer at %d: %w", img.name, newFooterOff, err)
		}
		if err := img.f.Sync(); err != nil {
			return res, fmt.Errorf("%s: fsync: %w", img.name, err)
		}
		if err := img.f.Truncate(newFooterOff + FooterSize); err != nil {
			return res, fmt.Errorf("%s: truncate to %d: %w", img.name, newFooterOff+FooterSize, err)
		}
		img.footerOff, img.footerState = newFooterOff, FooterAtEnd
		if err := img.f.Sync(); err != nil {
			return res, fmt.Errorf("%s: fsync: %w", img.name, err)
		}
	}
	progress(total)
	return res, nil
}

// droppable reports whether block i at BAT entry e may be dropped, and whether it
// is all zeros but kept for its parent. buf holds a bitmap and a block. The caller
// holds mu.
func (img *Image) droppable(i int, e uint32, buf []byte, belowZero func(off, n int64) (bool, error)) (drop, kept bool, err error) {
	off := int64(e) * SectorSize
	if _, err := img.f.ReadAt(buf, off); err != nil {
		return false, false, fmt.Errorf("%s: read block %d at %d: %w", img.name, i, off, err)
	}
	// Only the part of the last block inside the disk counts; a block past the
	// disk's end (which Check warns of) stays as it is.
	base := int64(i) * img.blockSize
	if base >= img.size {
		return false, false, nil
	}
	bm, data := buf[:img.bitmapSize], buf[img.bitmapSize:img.bitmapSize+min(img.blockSize, img.size-base)]
	if img.footer.DiskType != TypeDifferencing {
		return fileio.AllZero(data), false, nil
	}
	// The runs of present sectors: zeros here, and zeros below.
	var runs [][2]int64
	spb := int64(len(data)) / SectorSize
	for s := int64(0); s < spb; {
		if bm[s/8]&(0x80>>(s%8)) == 0 {
			s++
			continue
		}
		t := s
		for t < spb && bm[t/8]&(0x80>>(t%8)) != 0 {
			t++
		}
		if !fileio.AllZero(data[s*SectorSize : t*SectorSize]) {
			return false, false, nil
		}
		runs = append(runs, [2]int64{s, t})
		s = t
	}
	if belowZero == nil {
		return true, false, nil
	}
	for _, r := range runs {
		z, err := belowZero(base+r[0]*SectorSize, (r[1]-r[0])*SectorSize)
		if err != nil {
			return false, false, err
		}
		if !z {
			return false, true, nil
		}
	}
	return true, false, nil
}

// fit places a block (bitmap and data, n bytes) in the hole [start, end): with its
// data 4 KiB-aligned, as allocateLocked does, where that costs the hole no block
// (blocks packed back to back, as qemu writes them, leave holes of exactly their
// size), else at the hole's first sector.
func (img *Image) fit(start, end, n int64) (int64, bool) {
	start = roundUp(start, SectorSize)
	if s := roundUp(start+img.bitmapSize, dataAlign) - img.bitmapSize; s+n <= end && (end-s)/n == (end-start)/n {
		return s, true
	}
	return start, start+n <= end
}

// metaRegions are the ranges of the file that hold metadata: the footer copy, the
// header, the BAT and each parent locator's whole data space.
func (img *Image) metaRegions() []region {
	out := slices.Clone(img.meta)
	if img.footer.DiskType == TypeDifferencing {
		for i, l := range img.header.ParentLocators {
			if l.PlatformCode == PlatformNone || l.PlatformDataLength == 0 {
				continue
			}
			if sp, ok := l.SpaceBytes(); ok && int64(l.PlatformDataOffset)+sp <= img.footerOff {
				out = append(out, region{int64(l.PlatformDataOffset), sp, fmt.Sprintf("parent locator %d space", i)})
			}
		}
	}
	return out
}

// copyBlock copies a block (bitmap and data) to its new place: in the kernel
// (copy_file_range) where the file system can, else through buf.
func (img *Image) copyBlock(buf []byte, m pack.Move) error {
	done := int64(0)
	if f, ok := img.f.(*os.File); ok {
		var err error
		done, err = fileio.CopyRange(f, m.From, f, m.To, m.Len, SectorSize, img.name)
		if err != nil && !errors.Is(err, image.ErrNoKernelCopy) {
			return fmt.Errorf("move block %d: %w", m.ID, err)
		}
	}
	if done == m.Len {
		return nil
	}
	p := buf[:m.Len-done]
	if _, err := img.f.ReadAt(p, m.From+done); err != nil {
		return fmt.Errorf("%s: read block %d at %d: %w", img.name, m.ID, m.From+done, err)
	}
	if _, err := img.f.WriteAt(p, m.To+done); err != nil {
		return fmt.Errorf("%s: write block %d at %d: %w", img.name, m.ID, m.To+done, err)
	}
	return nil
}

// hasBatmap reports whether a blktap image keeps a batmap (a "tdbatmap" header in
// the sector after the BAT): a bit per block that says it is fully allocated, which
// vhdfs does not keep up to date. The caller holds mu.
func (img *Image) hasBatmap() bool {
	if string(img.footer.CreatorApp[:3]) != "tap" {
		return false
	}
	h := img.header
	b := make([]byte, 8)
	_, err := img.f.ReadAt(b, int64(h.TableOffset)+roundUp(int64(h.MaxTableEntries)*4, SectorSize))
	return err == nil && string(b) == "tdbatmap"
}
