package vhdx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"

	"github.com/vhdfs/vhdfs/internal/faults"
	"golang.org/x/sys/unix"
)

// Finding the active sequence (§2.3.3) in time linear in the log's length, reading
// it through a window of logWindow bytes whatever its length.
//
// Every entry starts with a sector that starts with "loge". No other sector of a
// valid entry does: each following descriptor sector starts with a descriptor
// ("desc" or "zero": 126 descriptors fill the rest of the first sector exactly, 128
// each later one, and descSectors counts only sectors that hold one), and each data
// sector starts with "data". So a candidate entry at a "loge" sector can only be
// valid if it ends before the next "loge" sector of the ring, and the scan reads a
// candidate no further than that: the stretches it reads are disjoint, and each
// sector is read once by the first pass (which finds the "loge" sectors), at most
// once more by the candidates, and once more by the replay of the active sequence.
// Valid entries are therefore disjoint too, and come in the order of the ring, so
// the runs of consecutive sequence numbers are found in one pass with two bitmaps
// of one bit per sector (128 KiB for the largest log, 4095 MiB).
const (
	logWindow = 1 * MiB
	// maxReplayOps bounds the descriptors of the active sequence that an open
	// replays: the overlay holds one small record per descriptor, never the data,
	// so this keeps it well under 64 MiB. A 1 MiB log, Hyper-V's and qemu's
	// default, holds at most 32766 descriptors.
	maxReplayOps = 1 << 18
)

// logRing is the log region of the file, read at offsets within the ring.
type logRing struct {
	f    io.ReaderAt
	off  int64 // where the region starts in the file
	size int64 // its length, a multiple of 4 KiB
}

// read fills p from pos in the ring, wrapping around its end.
func (r logRing) read(p []byte, pos int64) error {
	for len(p) > 0 {
		pos %= r.size
		n := min(int64(len(p)), r.size-pos)
		if _, err := r.f.ReadAt(p[:n], r.off+pos); err != nil {
			return fmt.Errorf("read log at %d: %w", r.off+pos, err)
		}
		p, pos = p[n:], pos+n
	}
	return nil
}

// dataFrom is the first offset at or after pos of the ring, rounded down to a
// sector, where the file holds data rather than a hole (SEEK_DATA); r.size if
// there is none; pos if the file cannot tell.
func (r logRing) dataFrom(pos int64) int64 {
	f, ok := faults.OSFile(r.f)
	if !ok {
		return pos
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return pos
	}
	d, serr := int64(0), error(nil)
	if err := rc.Control(func(fd uintptr) { d, serr = unix.Seek(int(fd), r.off+pos, unix.SEEK_DATA) }); err != nil {
		return pos
	}
	switch {
	case errors.Is(serr, unix.ENXIO):
		return r.size
	case serr != nil || d < r.off+pos:
		return pos
	}
	return min(r.size, (d-r.off)&^(logSector-1))
}

// sectorSet is a set of sectors of the ring, one bit each.
type sectorSet []uint64

func newSectorSet(n int64) sectorSet { return make(sectorSet, (n+63)/64) }
func (s sectorSet) add(i int64)      { s[i/64] |= 1 << (i % 64) }
func (s sectorSet) has(i int64) bool { return s[i/64]&(1<<(i%64)) != 0 }

// next is the first sector in the set at or after i, or -1.
func (s sectorSet) next(i int64) int64 {
	w := i / 64
	if w >= int64(len(s)) {
		return -1
	}
	for m := s[w] &^ (1<<(i%64) - 1); ; m = s[w] {
		if m != 0 {
			return w*64 + int64(bits.TrailingZeros64(m))
		}
		if w++; w >= int64(len(s)) {
			return -1
		}
	}
}

// headerSectors returns the sectors of the ring that start with "loge", reading it
// through buf and skipping the holes of a sparse file.
func (r logRing) headerSectors(buf []byte) (sectorSet, error) {
	set := newSectorSet(r.size / logSector)
	for pos := int64(0); pos < r.size; {
		if pos = max(pos, r.dataFrom(pos)); pos >= r.size {
			break
		}
		n := min(int64(len(buf)), r.size-pos)
		if err := r.read(buf[:n], pos); err != nil {
			return nil, err
		}
		for i := int64(0); i < n; i += logSector {
			if string(buf[i:i+4]) == "loge" {
				set.add((pos + i) / logSector)
			}
		}
		pos += n
	}
	return set, nil
}

// descriptorAt decodes the descriptor at the start of b (§2.3.1.2–3).
func descriptorAt(b []byte) logDescriptor {
	var d logDescriptor
	copy(d.Signature[:], b[0:4])
	copy(d.Trailing[:], b[4:8])
	copy(d.Leading[:], b[8:16])
	d.FileOffset = binary.LittleEndian.Uint64(b[16:])
	d.SequenceNumber = binary.LittleEndian.Uint64(b[24:])
	return d
}

// sequenceOfData is the sequence number a data sector carries (§2.3.1.4): the high
// half after its signature, the low half in its last 4 bytes.
func sequenceOfData(s []byte) uint64 {
	return uint64(binary.LittleEndian.Uint32(s[4:]))<<32 | uint64(binary.LittleEndian.Uint32(s[logSector-4:]))
}

// checkEntry reads the candidate entry at pos of the ring, of at most limit bytes,
// and reports whether it is a valid entry of the log guid: the header's fields,
// every descriptor, a data sector with the header's sequence number for each data
// descriptor and nothing else, and the checksum. It reads the entry once, through
// buf, stopping at the first thing wrong. Unless nil, each is called for each
// descriptor in order with the ring offset of its data sector (-1 for a zero
// descriptor); the entry may still turn out invalid afterwards.
func (r logRing) checkEntry(pos, limit int64, guid GUID, buf []byte, each func(d logDescriptor, at int64) error) (logEntryHeader, bool, error) {
	var h logEntryHeader
	first := buf[:logSector]
	if err := r.read(first, pos); err != nil {
		return h, false, err
	}
	if _, err := binary.Decode(first, binary.LittleEndian, &h); err != nil {
		return h, false, nil
	}
	n := int64(h.EntryLength)
	if string(h.Signature[:]) != "loge" || n == 0 || n%logSector != 0 || n > limit || h.SequenceNumber == 0 ||
		h.LogGuid != guid || int64(h.Tail)%logSector != 0 || int64(h.Tail) >= r.size {
		return h, false, nil
	}
	count, sectors := int64(h.DescriptorCount), n/logSector
	ds := descSectors(count)
	if ds > sectors {
		return h, false, nil
	}
	crc := crc32.Update(0, castagnoli, first[:logEntryChecksumOff])
	crc = crc32.Update(crc, castagnoli, []byte{0, 0, 0, 0})
	crc = crc32.Update(crc, castagnoli, first[logEntryChecksumOff+4:])
	var desc, data int64 // descriptors seen; data descriptors among them
	sector := func(i int64, s []byte) (bool, error) {
		if i >= ds {
			return string(s[:4]) == "data" && sequenceOfData(s) == h.SequenceNumber, nil
		}
		at := int64(0)
		if i == 0 {
			at = logEntryHeaderLen
		}
		for ; desc < count && at < logSector; desc, at = desc+1, at+logDescriptorLen {
			d := descriptorAt(s[at:])
			if d.SequenceNumber != h.SequenceNumber || d.FileOffset%logSector != 0 {
				return false, nil
			}
			dataAt := int64(-1)
			switch string(d.Signature[:]) {
			case "zero":
				if binary.LittleEndian.Uint64(d.Leading[:])%logSector != 0 {
					return false, nil
				}
			case "desc":
				dataAt = (pos + (ds+data)*logSector) % r.size
				data++
			default:
				return false, nil
			}
			if each != nil {
				if err := each(d, dataAt); err != nil {
					return false, err
				}
			}
		}
		return ds+data <= sectors, nil
	}
	if ok, err := sector(0, first); !ok || err != nil {
		return h, false, err
	}
	for i := int64(1); i < sectors; {
		k := min(sectors-i, int64(len(buf))/logSector)
		if i >= ds {
			if ds+data != sectors {
				return h, false, nil
			}
		} else {
			k = min(k, ds-i) // the data sectors' count is known only after the descriptors
		}
		b := buf[:k*logSector]
		if err := r.read(b, pos+i*logSector); err != nil {
			return h, false, err
		}
		for j := int64(0); j < k; j++ {
			if ok, err := sector(i+j, b[j*logSector:][:logSector]); !ok || err != nil {
				return h, false, err
			}
		}
		crc = crc32.Update(crc, castagnoli, b)
		i += k
	}
	return h, ds+data == sectors && crc == h.Checksum, nil
}

// logRun is a run of valid entries, each starting where the one before ends with
// the next sequence number.
type logRun struct {
	start int64          // ring offset of its first entry
	end   int64          // where its last entry ends, past the ring's end if it wraps
	first uint64         // the first entry's sequence number
	head  logEntryHeader // the last entry's header
}

// sequenceFinder takes the valid entries in the order of the ring and keeps the
// active sequence (§2.3.3): of the runs whose head entry's Tail is the start of one
// of their entries, the one whose head has the highest sequence number.
type sequenceFinder struct {
	size   int64
	starts sectorSet // the starts of valid entries
	cur    *logRun
	first  *logRun // the ring's first run, which the last may continue across its end
	best   *logRun
}

func (s *sequenceFinder) add(pos int64, h logEntryHeader) {
	s.starts.add(pos / logSector)
	if c := s.cur; c != nil && c.end == pos && h.SequenceNumber == c.head.SequenceNumber+1 {
		c.end, c.head = pos+int64(h.EntryLength), h
		return
	}
	s.endRun()
	s.cur = &logRun{start: pos, end: pos + int64(h.EntryLength), first: h.SequenceNumber, head: h}
}

func (s *sequenceFinder) endRun() {
	if s.cur != nil && s.first == nil {
		s.first = s.cur
	} else if s.cur != nil {
		s.consider(s.cur)
	}
	s.cur = nil
}

// done ends the scan: the last run continues into the first across the ring's end
// if the first begins where the last ends with the next sequence number.
func (s *sequenceFinder) done() *logRun {
	last, first := s.cur, s.first
	switch {
	case last == nil:
		if first != nil {
			s.consider(first)
		}
	case first == nil:
		s.consider(last)
	case last.end%s.size == first.start && first.first == last.head.SequenceNumber+1:
		s.consider(&logRun{start: last.start, end: first.end + s.size, first: last.first, head: first.head})
	default:
		s.consider(first)
		s.consider(last)
	}
	return s.best
}

// consider keeps run if its head's Tail starts one of its entries and its head is
// newer than the best one's. Runs are disjoint stretches of the ring, so a valid
// entry that starts inside a run's stretch is one of its entries.
func (s *sequenceFinder) consider(run *logRun) {
	tail := int64(run.head.Tail)
	if (tail-run.start+s.size)%s.size >= run.end-run.start || !s.starts.has(tail/logSector) {
		return
	}
	if s.best == nil || run.head.SequenceNumber > s.best.head.SequenceNumber {
		s.best = &logRun{start: tail, end: run.end, head: run.head}
	}
}

// activeSequence finds the active sequence of the ring: a run that starts at its
// head's Tail, or nil if there is none.
func (r logRing) activeSequence(guid GUID, buf []byte) (*logRun, error) {
	heads, err := r.headerSectors(buf)
	if err != nil {
		return nil, err
	}
	sectors := r.size / logSector
	f := &sequenceFinder{size: r.size, starts: newSectorSet(sectors)}
	first := heads.next(0)
	for i := first; i >= 0 && i < sectors; {
		next := heads.next(i + 1)
		if next < 0 || next >= sectors {
			next = first + sectors
		}
		h, ok, err := r.checkEntry(i*logSector, (next-i)*logSector, guid, buf, nil)
		if err != nil {
			return nil, err
		}
		if ok {
			f.add(i*logSector, h)
		}
		i = next
	}
	return f.done(), nil
}

// descriptorCount is how many descriptors the entries of run hold, from their
// headers alone: one sector read per entry.
func (r logRing) descriptorCount(run *logRun, buf []byte) (int64, error) {
	var h logEntryHeader
	count := int64(0)
	for pos, i := run.start, int64(0); i < r.size/logSector; i++ {
		if err := r.read(buf[:logSector], pos); err != nil {
			return 0, err
		}
		if _, err := binary.Decode(buf, binary.LittleEndian, &h); err != nil {
			return 0, err
		}
		count += int64(h.DescriptorCount)
		if h.SequenceNumber == run.head.SequenceNumber {
			return count, nil
		}
		pos = (pos + int64(h.EntryLength)) % r.size
	}
	return 0, fmt.Errorf("log entries from %d do not lead to entry %d: %w", r.off+run.start, run.head.SequenceNumber, ErrCorrupt)
}
