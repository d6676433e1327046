package vhdx

import (
	"fmt"
	"io"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/pagecache"
)

// ReadAt reads what this file stores for [off, off+len(p)): the data of FULLY_PRESENT
// and PARTIALLY_PRESENT blocks (whatever their bitmap says) and zeros for blocks in
// every other state. Package chain uses Run to decide which layer a byte comes from.
// Reads past Size return io.EOF.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: read at %d: %w", img.name, off, ErrOutOfRange)
	}
	g := img.geo
	if off >= g.size {
		return 0, io.EOF
	}
	want := len(p)
	if rem := g.size - off; int64(len(p)) > rem {
		p = p[:rem]
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	for done := 0; done < len(p); {
		o := off + int64(done)
		blk, in := o/g.blockSize, o%g.blockSize
		n := int(min(int64(len(p)-done), g.blockSize-in))
		e, err := img.entry(g.payloadIndex(blk))
		if err != nil {
			return done, err
		}
		switch e.state() {
		case FullyPresent, PartiallyPresent:
			if err := img.readData(p[done:done+n], e.at()+in); err != nil {
				return done, fmt.Errorf("%s: read block %d at %d: %w", img.name, blk, e.at()+in, err)
			}
		default:
			clear(p[done : done+n])
		}
		done += n
	}
	if len(p) < want {
		return len(p), io.EOF
	}
	return len(p), nil
}

// Run reports whether the byte at off is stored in this file, and for how many bytes
// from off, at most n, that answer holds. Runs end on logical sector boundaries (or
// at off+n). FULLY_PRESENT blocks are stored whatever their bitmap says; the sectors
// of a PARTIALLY_PRESENT block are stored where their bit is set; NOT_PRESENT blocks
// are not. In a differencing image a ZERO, UNMAPPED or UNDEFINED block is stored (it
// reads as zeros from this file, never from the parent); in an image without a parent
// it is not (it is a hole). Nothing is stored at or past Size. n must be positive.
func (img *Image) Run(off, n int64) (int64, bool, error) {
	g := img.geo
	if off >= g.size || off < 0 {
		return n, false, nil
	}
	n = min(n, g.size-off)
	img.mu.RLock()
	defer img.mu.RUnlock()
	var run int64
	var present bool
	for run < n {
		o := off + run
		blk, in := o/g.blockSize, o%g.blockSize
		avail := min(n-run, g.blockSize-in)
		k, p := avail, false
		e, err := img.entry(g.payloadIndex(blk))
		if err != nil {
			return 0, false, err
		}
		switch e.state() {
		case NotPresent:
		case FullyPresent:
			p = true
		case PartiallyPresent:
			var err error
			if k, p, err = img.bitmapRun(blk, in, avail); err != nil {
				return 0, false, err
			}
		default: // ZERO, UNMAPPED, UNDEFINED
			p = img.meta.Load().HasParent
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

var _ = (image.ZeroStorer)((*Image)(nil))

// ZeroRun reports whether the byte at off lies in a block that a differencing image
// stores as zeros without data (ZERO, UNMAPPED, UNDEFINED: Run calls those present,
// hiding the parent), and how many bytes from off, at most n, share that answer, a
// block at a time. An image without a parent stores nothing that way.
func (img *Image) ZeroRun(off, n int64) (int64, bool, error) {
	g := img.geo
	if off >= g.size || off < 0 {
		return n, false, nil
	}
	n = min(n, g.size-off)
	if !img.meta.Load().HasParent {
		return n, false, nil
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	var run int64
	var zero bool
	for run < n {
		blk, in := (off+run)/g.blockSize, (off+run)%g.blockSize
		e, err := img.entry(g.payloadIndex(blk))
		if err != nil {
			return 0, false, err
		}
		z := false
		switch e.state() {
		case NotPresent, FullyPresent, PartiallyPresent:
		default:
			z = true
		}
		if run > 0 && z != zero {
			break
		}
		zero = z
		run += min(n-run, g.blockSize-in)
	}
	return run, zero, nil
}

// bitmapRun returns the length of the run from byte in of PARTIALLY_PRESENT block
// blk whose sectors share the state of in's sector, at most avail, and that state.
// Bits are one per logical sector, least significant first (§2.5.1.2). The caller
// holds mu.
func (img *Image) bitmapRun(blk, in, avail int64) (int64, bool, error) {
	ss := img.geo.sectorSize
	bm, err := img.sectorBits(blk)
	if err != nil {
		return 0, false, err
	}
	first, last := in/ss, (in+avail-1)/ss
	bit := func(s int64) bool { return bm[s/8]&(1<<(s%8)) != 0 }
	set := bit(first)
	same := byte(0)
	if set {
		same = 0xff
	}
	s := first + 1
	for s <= last {
		if s%8 == 0 && s+7 <= last && bm[s/8] == same {
			s += 8
			continue
		}
		if bit(s) != set {
			break
		}
		s++
	}
	return min(s*ss, in+avail) - in, set, nil
}

// sectorBits returns block blk's slice of its sector bitmap block (BlockSize /
// LogicalSectorSize / 8 bytes), from the process's bitmap cache (package pagecache)
// or read (through the log's overlay) and cached. The caller holds mu and must not
// change the slice; commitLocked, which changes bits under mu held for writing,
// forgets the cached slice first.
func (img *Image) sectorBits(blk int64) ([]byte, error) {
	k := pagecache.Key{Image: img.id, Block: blk}
	if bm := pagecache.Bitmaps.Get(k); bm != nil {
		return bm, nil
	}
	g := img.geo
	be, err := img.bitmapEntry(blk)
	if err != nil {
		return nil, err
	}
	off := be.at() + blk%g.chunkRatio*g.bitmapSlice
	bm := make([]byte, g.bitmapSlice)
	if err := img.readData(bm, off); err != nil {
		return nil, fmt.Errorf("%s: read sector bitmap of block %d at %d: %w", img.name, blk, off, err)
	}
	pagecache.Bitmaps.Put(k, bm)
	return bm, nil
}

// bitmapEntry returns the entry of the sector bitmap block of block blk's chunk,
// which must be present: checkPage refuses a PARTIALLY_PRESENT entry whose chunk has
// none, and writes never clear one. The caller holds mu.
func (img *Image) bitmapEntry(blk int64) (batEntry, error) {
	bi := img.geo.bitmapIndex(blk)
	be, err := img.entry(bi)
	if err == nil && be.state() != Present {
		err = fmt.Errorf("%s: block %d has sector bits, but its sector bitmap entry %d is %v: %w", img.name, blk, bi, be.state(), ErrCorrupt)
	}
	return be, err
}
