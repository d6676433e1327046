package vhdx

import (
	"fmt"

	"github.com/vhdfs/vhdfs/internal/faults"
	"github.com/vhdfs/vhdfs/internal/fileio"
)

// OpenSalvage opens the image at name read-only (with the usual read lock, none if
// noLock), reading around the damage its structures allow: a block or sector bitmap
// that a truncation cut (wholly or partly) reads as zeros where the file ends, and
// Notes lists each. A header or region table is taken from its other copy as any
// open does. An image opened so is never written.
func OpenSalvage(name string, noLock bool) (*Image, error) {
	o, err := fileio.OpenImage(name, name, false, false, noLock, ErrNotVHDX)
	if err != nil {
		return nil, err
	}
	img, err := openFile(faults.Wrap(o.File), name, false, true, true)
	if err != nil {
		o.Close()
		return nil, err
	}
	img.lock, img.dev, img.ino = o.Lock, o.Dev, o.Ino
	return img, nil
}

// noteLostBlocks notes every stored block and sector bitmap of the table that runs
// past the end of the file.
func (img *Image) noteLostBlocks() error {
	img.mu.RLock()
	defer img.mu.RUnlock()
	g, end := img.geo, img.src.vsize
	return img.scanBAT(func(i int64, e batEntry) bool {
		length, problem := img.entryProblem(i, e)
		if problem != "" || length == 0 {
			return true // refused when read, as without salvage
		}
		off := int64(e.offset())
		if off+length <= end {
			return true
		}
		if g.isBitmap(i) {
			img.notes = append(img.notes, fmt.Sprintf("%s: %s at %d is cut by the end of the file at %d: its lost bits read as clear", img.name, g.entryName(i), off, end))
			return true
		}
		lo := g.block(i) * g.blockSize
		hi := lo + length
		if off >= end {
			img.notes = append(img.notes, fmt.Sprintf("%s: block %d (disk bytes %d-%d) lies past the end of the file at %d: reads as zeros", img.name, g.block(i), lo, hi-1, end))
		} else {
			img.notes = append(img.notes, fmt.Sprintf("%s: block %d is cut by the end of the file at %d: disk bytes %d-%d read as zeros", img.name, g.block(i), end, lo+end-off, hi-1))
		}
		return true
	})
}
