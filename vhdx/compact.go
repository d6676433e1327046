package vhdx

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/pack"
)

// compactBatch bounds the blocks copied between two BAT updates through the log.
var compactBatch = 64

// Compact drops the payload blocks that read all zeros where dropping keeps the
// view, then moves the last blocks (payload and sector bitmap blocks alike) into the
// lowest holes and cuts the file after the last one (Optimize-VHD).
//
// In an image without a parent every all-zero block is dropped and becomes ZERO,
// whose content §2.5.1.1 defines as zeros (NOT_PRESENT's is undefined there,
// though every reader shows zeros). In a differencing image a dropped block becomes
// NOT_PRESENT, which shows the parent, so a block is dropped only when the sectors it
// holds (all of a FULLY_PRESENT one, the set bits of a PARTIALLY_PRESENT one) are
// zeros and o.BelowZero says the parent reads zeros there too. ZERO would keep the
// view of any zero block, over parent data too (§2.5.1.1: it reads as zeros, not
// from the parent), but libvhdi reads a ZERO block of a differencing file from the
// parent, so its view would differ there: such blocks stay FULLY_PRESENT.
// A fixed image (LeaveBlockAllocated) must keep every block (§2.6.2.1):
// ErrUnsupported.
//
// Every BAT change goes through the log (logWriteLocked), after the copies it
// points at are flushed: a cut at any write leaves each entry naming its old place
// or its new one, both whole. The file is cut after the last block only after the
// last change is in place and the log is empty. The FileWriteGuid changes (a write
// to the file, §2.2.2.1), the DataWriteGuid does not: the view is the same, and
// children stay valid. The caller has the image open for writing, and alone,
// unless o.DryRun.
func (img *Image) Compact(ctx context.Context, o image.CompactOptions) (image.CompactResult, error) {
	var res image.CompactResult
	g := img.geo
	if img.Type() == TypeFixed {
		return res, fmt.Errorf("%s: a fixed image (LeaveBlockAllocated) keeps every block: %w", img.name, ErrUnsupported)
	}
	if !img.writable && !o.DryRun {
		return res, fmt.Errorf("%s: compact: %w", img.name, ErrReadOnly)
	}
	diff := img.meta.Load().HasParent
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.writable {
		if err := img.usableLocked(0); err != nil {
			return res, err
		}
		if err := img.flushPendingLocked(); err != nil {
			return res, err
		}
	}
	res.OldSize = img.src.vsize
	type stored struct {
		i   int64
		e   batEntry
		len int64
	}
	var all []stored
	err := img.scanBAT(func(i int64, e batEntry) bool {
		all = append(all, stored{i, e, 0})
		return true
	})
	if err != nil {
		return res, err
	}
	var blocks []stored
	for _, s := range all {
		n, err := img.checkEntry(s.i, s.e)
		if err != nil {
			return res, err
		}
		if n > 0 {
			s.len = n
			blocks = append(blocks, s)
			if !g.isBitmap(s.i) {
				res.Blocks++
			}
		}
	}
	// Open checks entries a page at a time; two pages' blocks may still overlap
	// (Check finds it), and moving either would then damage the other.
	byOff := slices.Clone(blocks)
	slices.SortFunc(byOff, func(a, b stored) int { return cmp.Compare(a.e.at(), b.e.at()) })
	for k := 1; k < len(byOff); k++ {
		if p := byOff[k-1]; byOff[k].e.at() < p.e.at()+p.len {
			return res, fmt.Errorf("%s: %s and %s overlap at %d: %w", img.name, g.entryName(p.i), g.entryName(byOff[k].i), byOff[k].e.at(), ErrCorrupt)
		}
	}
	total := int64(res.Blocks) * g.blockSize
	progress := func(done int64) {
		if o.Progress != nil {
			o.Progress(done, total)
		}
	}

	drop := map[int64]bool{}
	buf := make([]byte, g.blockSize)
	done := int64(0)
	for _, b := range blocks {
		if g.isBitmap(b.i) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return res, err
		}
		progress(done)
		done += g.blockSize
		ok, kept, err := img.droppable(b.i, b.e, buf[:b.len], diff, o.BelowZero)
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

	var ext []pack.Extent
	for _, s := range img.spans {
		ext = append(ext, pack.Extent{ID: -1, Off: s.off, Len: s.len, Fixed: true})
	}
	for _, b := range blocks {
		if !drop[b.i] {
			ext = append(ext, pack.Extent{ID: b.i, Off: b.e.at(), Len: b.len})
		}
	}
	moves, end := pack.Plan(ext, fitMiB)
	res.Moved = len(moves)
	scanned := total
	total += int64(len(moves)) * g.blockSize
	newEnd := (end + MiB - 1) / MiB * MiB
	res.NewSize = min(newEnd, res.OldSize)
	if o.DryRun || len(drop) == 0 && len(moves) == 0 && newEnd >= img.src.vsize {
		return res, nil
	}

	if !img.fileWriteGuidSet {
		if err := img.updateHeader(func(h *Header) { h.FileWriteGuid = NewGUID() }); err != nil {
			return res, err
		}
		img.fileWriteGuidSet = true
	}
	if len(drop) > 0 {
		// Without a parent a dropped block is ZERO, whose content §2.5.1.1 defines
		// (NOT_PRESENT's is undefined there, though every reader shows zeros).
		dropped := Zero
		if diff {
			dropped = NotPresent
		}
		bat := map[int64]batEntry{}
		for i := range drop {
			bat[i] = makeEntry(dropped, 0)
			// The bits of a NOT_PRESENT block mean nothing (§2.5.1.1), but libvhdi
			// reads a block through them whatever its state: they are cleared. The
			// view is the same before and after (zeros here, zeros below).
			if diff {
				blk := g.block(i)
				be, err := img.entry(g.bitmapIndex(blk))
				if err != nil {
					return res, err
				}
				if be.state() == Present {
					if err := img.commitLocked(nil, &bitRange{blk: blk, reset: true}); err != nil {
						return res, err
					}
					// (commitLocked flushes a full pending set only when a bit was set.)
					if len(img.src.pending) >= maxPendingSectors {
						if err := img.flushPendingLocked(); err != nil {
							return res, err
						}
					}
				}
			}
		}
		if err := img.commitEachLocked(bat); err != nil {
			return res, err
		}
	}
	entries := map[int64]batEntry{}
	for _, b := range blocks {
		entries[b.i] = b.e
	}
	for len(moves) > 0 {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		batch := moves[:min(compactBatch, len(moves))]
		moves = moves[len(batch):]
		bat := map[int64]batEntry{}
		for _, m := range batch {
			if err := img.copyData(buf, m.From, m.To, m.Len); err != nil {
				return res, fmt.Errorf("%s: move %s: %w", img.name, g.entryName(m.ID), err)
			}
			bat[m.ID] = makeEntry(entries[m.ID].state(), m.To)
		}
		// The log's first step is an fsync: the copies are durable before any
		// entry names them.
		if err := img.commitEachLocked(bat); err != nil {
			return res, err
		}
		progress(scanned + int64(res.Moved-len(moves))*g.blockSize)
	}
	if newEnd < img.src.vsize {
		if err := img.src.f.Truncate(newEnd); err != nil {
			return res, fmt.Errorf("%s: truncate to %d: %w", img.name, newEnd, err)
		}
		img.src.vsize = newEnd
		if err := img.src.f.Sync(); err != nil {
			return res, fmt.Errorf("%s: fsync: %w", img.name, err)
		}
	}
	progress(total)
	return res, nil
}

// commitEachLocked applies the entries of bat one at a time (commitLocked), so
// that however many BAT sectors they touch, each log entry holds at most
// maxPendingSectors of them, and makes them durable. Each entry keeps the view by
// itself, in whichever order they land. The caller holds mu.
func (img *Image) commitEachLocked(bat map[int64]batEntry) error {
	for i, e := range bat {
		if err := img.commitLocked(map[int64]batEntry{i: e}, nil); err != nil {
			return err
		}
	}
	return img.flushPendingLocked()
}

// copyData copies n bytes of the file from from to to (the holes of Plan never
// overlap what they copy), by copy_file_range or through buf.
func (img *Image) copyData(buf []byte, from, to, n int64) error {
	k := int64(0)
	// In the kernel where the file system can (and no log overlay stands between).
	if f, ok := img.src.f.(*os.File); ok && img.src.ov == nil {
		var err error
		k, err = fileio.CopyRange(f, from, f, to, n, img.geo.sectorSize, img.name)
		if err != nil && !errors.Is(err, ErrNoKernelCopy) {
			return err
		}
	}
	for k < n {
		c := min(int64(len(buf)), n-k)
		if err := img.readData(buf[:c], from+k); err != nil {
			return fmt.Errorf("read at %d: %w", from+k, err)
		}
		if _, err := img.src.f.WriteAt(buf[:c], to+k); err != nil {
			return fmt.Errorf("write at %d: %w", to+k, err)
		}
		k += c
	}
	return nil
}

// droppable reports whether the payload block of entry i (e) may become
// NOT_PRESENT, and whether it is all zeros but kept for its parent. buf has the
// block's length. The caller holds mu.
func (img *Image) droppable(i int64, e batEntry, buf []byte, diff bool, belowZero func(off, n int64) (bool, error)) (drop, kept bool, err error) {
	g := img.geo
	blk := g.block(i)
	if err := img.readData(buf, e.at()); err != nil {
		return false, false, fmt.Errorf("%s: read block %d at %d: %w", img.name, blk, e.at(), err)
	}
	if !diff {
		return allZero(buf), false, nil
	}
	ss := g.sectorSize
	sectors := int64(len(buf)) / ss
	present := func(s int64) bool { return true }
	if e.state() == PartiallyPresent {
		bm, err := img.sectorBits(blk)
		if err != nil {
			return false, false, err
		}
		present = func(s int64) bool { return bm[s/8]&(1<<(s%8)) != 0 }
	}
	var runs [][2]int64
	for s := int64(0); s < sectors; {
		if !present(s) {
			s++
			continue
		}
		t := s
		for t < sectors && present(t) {
			t++
		}
		if !allZero(buf[s*ss : t*ss]) {
			return false, false, nil
		}
		runs = append(runs, [2]int64{s, t})
		s = t
	}
	if belowZero == nil {
		return true, false, nil
	}
	for _, r := range runs {
		z, err := belowZero(blk*g.blockSize+r[0]*ss, (r[1]-r[0])*ss)
		if err != nil {
			return false, false, err
		}
		if !z {
			return false, true, nil
		}
	}
	return true, false, nil
}

// fitMiB places n bytes in the hole [start, end) at its first 1 MiB boundary, as
// every object of a VHDX file is aligned.
func fitMiB(start, end, n int64) (int64, bool) {
	s := (start + MiB - 1) / MiB * MiB
	return s, s+(n+MiB-1)/MiB*MiB <= end
}
