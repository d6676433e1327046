package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/internal/faults"
)

// A resize that needs more BAT entries than the BAT region holds gives the table a
// new, larger region at the end of the file rather than growing it where it is.
// Growing in place would first move the payload and sector bitmap blocks that follow
// the table (as Compact moves blocks), each move a BAT update of its own, and only
// then extend the region: many steps, each of which a crash may end. A new region at
// the end is invisible until the region table names it: the table is copied there
// while nothing refers to it, and one log entry then switches both copies of the
// region table and the virtual disk size together (§2.2.3: region table changes go
// through the log). A crash before that entry lands leaves the old file, with an
// unused tail; after it, the open replays the new one. The old region's space is
// freed once the log is empty again, when nothing can refer to it.

// newBATRegionLocked lays out a BAT region at the end of the file for the geometry
// large (grown from the current one) and copies the entries the resized disk keeps
// into it: the payload entries of the blocks below the old end and the sector bitmap
// entries in use (dropped(current, large) stay NOT_PRESENT, as the new region reads
// zeros past what is copied). It puts the changed sectors of both region tables into
// sectors and returns the new regions. The copy is flushed by the log's first fsync,
// before any entry names it. The caller holds mu; the log is empty and nothing is
// pending.
func (img *Image) newBATRegionLocked(large geometry, sectors map[int64][]byte) ([]RegionEntry, error) {
	g := img.geo
	n := (large.entries*8 + MiB - 1) / MiB * MiB
	if n > 1<<32-MiB {
		return nil, fmt.Errorf("%s: a BAT region of %d bytes does not fit the region table's 32-bit length: %w", img.name, n, ErrUnsupported)
	}
	to, err := img.extendLocked(n)
	if err != nil {
		return nil, err
	}
	keep := min(g.payloadIndex(g.blocks), g.entries)
	if err := img.copyTableLocked(to, 8*keep); err != nil {
		return nil, err
	}
	// A differencing image's last chunk has its sector bitmap entry past the
	// payload entries of its last block.
	if bi := g.bitmapIndex(g.blocks - 1); bi >= keep && bi < g.entries {
		b := make([]byte, 8)
		if err := img.src.readAt(b, img.batOff+8*bi); err != nil {
			return nil, fmt.Errorf("%s: read BAT at %d: %w", img.name, img.batOff+8*bi, err)
		}
		if _, err := img.src.f.WriteAt(b, to+8*bi); err != nil {
			return nil, fmt.Errorf("%s: write the new BAT region at %d: %w", img.name, to+8*bi, err)
		}
	}
	regions := append([]RegionEntry(nil), img.regions...)
	for i := range regions {
		if regions[i].Guid == RegionBAT {
			regions[i].FileOffset, regions[i].Length = uint64(to), uint32(n)
		}
	}
	if err := img.putRegionTablesLocked(sectors, regions); err != nil {
		return nil, err
	}
	return regions, nil
}

// copyTableLocked copies the first n bytes of the BAT to the file at to, where the
// file reads zeros: only the 4 KiB pages that are not zeros are written, and the
// holes of a plain file are skipped unread (SEEK_DATA), so a large, mostly empty
// table costs what it holds and stays sparse in its new place.
func (img *Image) copyTableLocked(to, n int64) error {
	buf := make([]byte, MiB)
	from := img.batOff
	for off := int64(0); off < n; {
		if next := (img.nextData(from+off, from+n) - from) &^ (logSector - 1); next > off {
			off = next
			continue
		}
		k := min(int64(len(buf)), n-off)
		if err := img.src.readAt(buf[:k], from+off); err != nil {
			return fmt.Errorf("%s: read BAT at %d: %w", img.name, from+off, err)
		}
		for p := int64(0); p < k; {
			if allZero(buf[p:min(p+logSector, k)]) {
				p += logSector
				continue
			}
			q := p
			for q < k && !allZero(buf[q:min(q+logSector, k)]) {
				q += logSector
			}
			q = min(q, k)
			if _, err := img.src.f.WriteAt(buf[p:q], to+off+p); err != nil {
				return fmt.Errorf("%s: write the new BAT region at %d: %w", img.name, to+off+p, err)
			}
			p = q
		}
		off += k
	}
	return nil
}

// nextData returns where, from off up to end, the next bytes of the file that may
// not be zeros are: off unless off lies in a hole of a plain file; end when only
// holes follow. The caller has flushed what is pending and the log is empty.
func (img *Image) nextData(off, end int64) int64 {
	f, ok := faults.OSFile(img.src.f)
	if !ok || img.src.ov != nil || len(img.src.pending) > 0 {
		return off
	}
	next, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		return end
	case err != nil:
		return off
	}
	return min(max(next, off), end)
}

// putRegionTablesLocked puts into sectors the 4 KiB sectors of both copies of the
// region table (§2.2.3) that change when it lists regions: the current table (the
// first valid copy, as Open reads it) with the entries' offsets and lengths
// changed, its checksum computed again, written over both copies. The caller holds
// mu.
func (img *Image) putRegionTablesLocked(sectors map[int64][]byte, regions []RegionEntry) error {
	var cur []byte
	for _, off := range []int64{regionTable1Off, regionTable2Off} {
		b := make([]byte, regionTableSize)
		if err := img.src.readAt(b, off); err != nil {
			return fmt.Errorf("%s: read region table at %d: %w", img.name, off, err)
		}
		if _, err := parseRegionTable(b, off); err == nil {
			cur = b
			break
		}
	}
	if cur == nil || len(regions) != len(img.regions) {
		return fmt.Errorf("%s: no valid region table to change: %w", img.name, ErrCorrupt)
	}
	if _, err := binary.Encode(cur[regionHeaderLen:], binary.LittleEndian, regions); err != nil {
		return fmt.Errorf("%s: region table: %w", img.name, err)
	}
	binary.LittleEndian.PutUint32(cur[regionTableChecksumOff:], checksum(cur, regionTableChecksumOff))
	for _, off := range []int64{regionTable1Off, regionTable2Off} {
		old := make([]byte, regionTableSize)
		if err := img.src.readAt(old, off); err != nil {
			return fmt.Errorf("%s: read region table at %d: %w", img.name, off, err)
		}
		for k := int64(0); k < regionTableSize; k += logSector {
			if !bytes.Equal(old[k:k+logSector], cur[k:k+logSector]) {
				sectors[off+k] = cur[k : k+logSector : k+logSector]
			}
		}
	}
	return nil
}

// useRegionsLocked makes regions, whose BAT region moved, the image's: where the
// BAT is read and which spans no block may overlap. The caller holds mu and drops
// the cached BAT pages, which are keyed by page, not by file offset.
func (img *Image) useRegionsLocked(regions []RegionEntry) {
	img.regions = regions
	for _, r := range regions {
		if r.Guid != RegionBAT {
			continue
		}
		for i := range img.spans {
			if img.spans[i].off == img.batOff {
				img.spans[i].off, img.spans[i].len = int64(r.FileOffset), int64(r.Length)
			}
		}
		img.batOff = int64(r.FileOffset)
	}
}
