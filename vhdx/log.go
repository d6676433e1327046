package vhdx

import (
	"container/heap"
	"encoding/binary"
	"fmt"
	"io"
	"sort"
)

// The log (MS-VHDX §2.3): a ring of 4 KiB sectors holding entries, each a header,
// descriptors and data sectors.
const (
	logSector           = 4 * KiB
	logEntryHeaderLen   = 64
	logDescriptorLen    = 32
	logEntryChecksumOff = 4
	dataSectorPayload   = logSector - 12 // bytes 8–4091 of a data sector
)

// logEntryHeader starts every log entry (§2.3.1.1).
type logEntryHeader struct {
	Signature         [4]byte // "loge", at 0
	Checksum          uint32  // at 4: CRC-32C of the whole entry
	EntryLength       uint32  // at 8: a multiple of 4 KiB
	Tail              uint32  // at 12: log offset of the first entry of the sequence
	SequenceNumber    uint64  // at 16
	DescriptorCount   uint32  // at 24
	Reserved          uint32  // at 28
	LogGuid           GUID    // at 32
	FlushedFileOffset uint64  // at 48
	LastFileOffset    uint64  // at 56
}

// logDescriptor is a zero descriptor ("zero": Leading holds ZeroLength) or a data
// descriptor ("desc": the first 8 and last 4 bytes of its data sector) (§2.3.1.2–3).
type logDescriptor struct {
	Signature      [4]byte // at 0
	Trailing       [4]byte // at 4: TrailingBytes, or reserved
	Leading        [8]byte // at 8: LeadingBytes, or ZeroLength
	FileOffset     uint64  // at 16: a multiple of 4 KiB
	SequenceNumber uint64  // at 24
}

// logOp is one write that replaying an entry makes: 4 KiB of data, or zeros.
type logOp struct {
	off     int64
	zeroLen int64  // for a zero descriptor
	data    []byte // 4 KiB, for a data descriptor
}

type logEntry struct {
	pos    int64 // offset in the log
	length int64
	hdr    logEntryHeader
	ops    []logOp
}

// descSectors is how many sectors n descriptors take: the first holds the header
// and 126 descriptors, every other 128.
func descSectors(n int64) int64 { return (n + 2 + 127) / 128 }

// parseLogEntry decodes the entry at pos of the ring, or returns nil if it is not a
// valid entry of the log guid. The cheap checks come first and the checksum last,
// and EntryLength must be exactly the header, descriptor and data sectors: a log in
// which every sector claims to start a long entry would otherwise cost a checksum
// over the whole ring at every sector.
func parseLogEntry(ring []byte, pos int64, guid GUID) *logEntry {
	r := int64(len(ring))
	var h logEntryHeader
	if _, err := binary.Decode(ring[pos:], binary.LittleEndian, &h); err != nil {
		return nil
	}
	n := int64(h.EntryLength)
	if string(h.Signature[:]) != "loge" || n == 0 || n%logSector != 0 || n > r || h.SequenceNumber == 0 ||
		h.LogGuid != guid || int64(h.Tail)%logSector != 0 || int64(h.Tail) >= r {
		return nil
	}
	ds := descSectors(int64(h.DescriptorCount))
	if ds*logSector > n {
		return nil
	}
	descs := make([]logDescriptor, h.DescriptorCount)
	if _, err := binary.Decode(ringCopy(ring, pos, ds*logSector)[logEntryHeaderLen:], binary.LittleEndian, descs); err != nil {
		return nil
	}
	e := &logEntry{pos: pos, length: n, hdr: h}
	sector := ds // the next data sector, in sectors from pos
	for _, d := range descs {
		if d.SequenceNumber != h.SequenceNumber || d.FileOffset%logSector != 0 || d.FileOffset > 1<<62 {
			return nil
		}
		switch string(d.Signature[:]) {
		case "zero":
			z := binary.LittleEndian.Uint64(d.Leading[:])
			if z%logSector != 0 || z > 1<<62 {
				return nil
			}
			e.ops = append(e.ops, logOp{off: int64(d.FileOffset), zeroLen: int64(z)})
		case "desc":
			if (sector+1)*logSector > n {
				return nil
			}
			at := (pos + sector*logSector) % r
			s := ring[at : at+logSector]
			seq := uint64(binary.LittleEndian.Uint32(s[4:]))<<32 | uint64(binary.LittleEndian.Uint32(s[logSector-4:]))
			if string(s[:4]) != "data" || seq != h.SequenceNumber {
				return nil
			}
			data := make([]byte, logSector)
			copy(data, d.Leading[:])
			copy(data[8:], s[8:8+dataSectorPayload])
			copy(data[logSector-4:], d.Trailing[:])
			e.ops = append(e.ops, logOp{off: int64(d.FileOffset), data: data})
			sector++
		default:
			return nil
		}
	}
	if sector*logSector != n || checksum(ringCopy(ring, pos, n), logEntryChecksumOff) != h.Checksum {
		return nil
	}
	return e
}

// ringCopy returns n bytes of the ring from pos, wrapping around its end.
func ringCopy(ring []byte, pos, n int64) []byte {
	b := make([]byte, n)
	k := copy(b, ring[pos:])
	copy(b[k:], ring)
	return b
}

// activeSequence finds the sequence to replay (§2.3.3): of the runs of valid entries
// with consecutive sequence numbers, the newest whose head entry's Tail is the start
// of one of its entries; the sequence starts there. nil if there is none.
func activeSequence(ring []byte, guid GUID) []*logEntry {
	r := int64(len(ring))
	var best []*logEntry
	for pos := int64(0); pos < r; {
		e := parseLogEntry(ring, pos, guid)
		if e == nil {
			pos += logSector
			continue
		}
		seq := []*logEntry{e}
		next, covered := pos+e.length, e.length
		for covered < r {
			n := parseLogEntry(ring, next%r, guid)
			if n == nil || n.hdr.SequenceNumber != seq[len(seq)-1].hdr.SequenceNumber+1 || covered+n.length > r {
				break
			}
			seq = append(seq, n)
			next, covered = next+n.length, covered+n.length
		}
		head := seq[len(seq)-1]
		for i, s := range seq {
			if s.pos == int64(head.hdr.Tail) {
				if best == nil || head.hdr.SequenceNumber > best[len(best)-1].hdr.SequenceNumber {
					best = seq[i:]
				}
				break
			}
		}
		pos = next
	}
	return best
}

// overlay is the replayed log held in memory: the 4 KiB sectors it writes and the
// ranges it zeros, sorted and merged. Every sector in pages was written after every
// zero range covering it, so pages win over zeros.
type overlay struct {
	pages map[int64][]byte
	zeros []span
}

// newOverlay returns the result of the writes ops make, in order. It takes
// O(n log n) for n ops: a crafted log can hold millions of descriptors.
func newOverlay(ops []logOp) *overlay {
	type page struct {
		data []byte
		idx  int
	}
	type zero struct {
		off, end int64
		idx      int
	}
	last := map[int64]page{}
	var zeros []zero
	for i, op := range ops {
		if op.data != nil {
			last[op.off] = page{op.data, i}
		} else if op.zeroLen > 0 {
			zeros = append(zeros, zero{op.off, op.off + op.zeroLen, i})
		}
	}
	// A sweep over the pages in offset order, with the zero ranges that have started
	// in a heap by index: a page goes if a later zero range covers it.
	offs := make([]int64, 0, len(last))
	for k := range last {
		offs = append(offs, k)
	}
	sort.Slice(offs, func(a, b int) bool { return offs[a] < offs[b] })
	sort.Slice(zeros, func(a, b int) bool { return zeros[a].off < zeros[b].off })
	h := &zeroHeap{}
	o := &overlay{pages: make(map[int64][]byte, len(last))}
	next := 0
	for _, k := range offs {
		for next < len(zeros) && zeros[next].off <= k {
			heap.Push(h, zeroItem{zeros[next].end, zeros[next].idx})
			next++
		}
		for h.Len() > 0 && (*h)[0].end <= k {
			heap.Pop(h)
		}
		if p := last[k]; h.Len() == 0 || (*h)[0].idx < p.idx {
			o.pages[k] = p.data
		}
	}
	for _, z := range zeros {
		if n := len(o.zeros); n > 0 && z.off <= o.zeros[n-1].off+o.zeros[n-1].len {
			o.zeros[n-1].len = max(o.zeros[n-1].len, z.end-o.zeros[n-1].off)
			continue
		}
		o.zeros = append(o.zeros, span{z.off, z.end - z.off, ""})
	}
	return o
}

// zeroItem is a zero range that has started: where it ends and its place in the log.
type zeroItem struct {
	end int64
	idx int
}

// zeroHeap keeps the latest zero range on top.
type zeroHeap []zeroItem

func (h zeroHeap) Len() int           { return len(h) }
func (h zeroHeap) Less(i, j int) bool { return h[i].idx > h[j].idx }
func (h zeroHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *zeroHeap) Push(x any)        { *h = append(*h, x.(zeroItem)) }
func (h *zeroHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// patch lays the overlay over p, read from the file at off.
func (o *overlay) patch(p []byte, off int64) {
	end := off + int64(len(p))
	i := sort.Search(len(o.zeros), func(i int) bool { return o.zeros[i].off+o.zeros[i].len > off })
	for ; i < len(o.zeros) && o.zeros[i].off < end; i++ {
		z := o.zeros[i]
		clear(p[max(z.off, off)-off : min(z.off+z.len, end)-off])
	}
	if len(o.pages) == 0 {
		return
	}
	for k := off &^ (logSector - 1); k < end; k += logSector {
		if d, ok := o.pages[k]; ok {
			lo, hi := max(k, off), min(k+logSector, end)
			copy(p[lo-off:hi-off], d[lo-k:hi-k])
		}
	}
}

// source reads the file as the replayed log shows it.
type source struct {
	f     File
	vsize int64    // the file's size once replayed
	ov    *overlay // nil once the log is replayed into the file, or if it was empty
	// pending are metadata sectors (4 KiB, by file offset) changed by writes and
	// not yet through the log (see commitLocked); guarded by the image's mu, written
	// under its write lock.
	pending map[int64][]byte
}

// readAt fills p from off: what the file holds (zeros past its end, up to the size
// the log extends it to), with the replayed log laid over it.
func (s *source) readAt(p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > s.vsize {
		return fmt.Errorf("%d bytes at %d run past the end of the file at %d: %w", len(p), off, s.vsize, ErrTruncated)
	}
	n, err := s.f.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
	} else if err != nil {
		return err
	}
	if s.ov != nil {
		s.ov.patch(p, off)
	}
	for k := off &^ (logSector - 1); len(s.pending) > 0 && k < off+int64(len(p)); k += logSector {
		if d, ok := s.pending[k]; ok {
			lo, hi := max(k, off), min(k+logSector, off+int64(len(p)))
			copy(p[lo-off:hi-off], d[lo-k:hi-k])
		}
	}
	return nil
}

// readLog finds the active sequence of the log and builds the overlay that replays
// it. fileSize is the size of the file; protected are the spans the log must not
// write (the file identifier, the headers and the log itself).
func (img *Image) readLog(fileSize int64) error {
	h, name := img.header, img.name
	off, n := int64(h.LogOffset), int64(h.LogLength)
	ring := make([]byte, n)
	if _, err := img.src.f.ReadAt(ring, off); err != nil {
		return fmt.Errorf("%s: read log at %d: %w", name, off, err)
	}
	seq := activeSequence(ring, h.LogGuid)
	if seq == nil {
		return fmt.Errorf("%s: log GUID %v is set but the log at %d holds no valid sequence of entries: %w", name, h.LogGuid, off, ErrCorrupt)
	}
	head := seq[len(seq)-1].hdr
	if int64(head.FlushedFileOffset) > fileSize || head.FlushedFileOffset > head.LastFileOffset {
		return fmt.Errorf("%s: file is %d bytes, but the log's flushed file offset is %d (last file offset %d): %w", name, fileSize, head.FlushedFileOffset, head.LastFileOffset, ErrTruncated)
	}
	img.src.vsize = max(fileSize, int64(head.LastFileOffset))
	protected := []span{{0, regionTable1Off, "the file identifier and headers"}, {off, n, "the log"}}
	var ops []logOp
	for _, e := range seq {
		for _, op := range e.ops {
			l := op.zeroLen
			if op.data != nil {
				l = logSector
			}
			if op.off+l > img.src.vsize {
				return fmt.Errorf("%s: log entry %d writes %d bytes at %d, past the file's last offset %d: %w", name, e.hdr.SequenceNumber, l, op.off, img.src.vsize, ErrCorrupt)
			}
			for _, p := range protected {
				if overlaps(op.off, l, p.off, p.len) {
					return fmt.Errorf("%s: log entry %d writes %d bytes at %d, over %s: %w", name, e.hdr.SequenceNumber, l, op.off, p.name, ErrCorrupt)
				}
			}
			ops = append(ops, op)
		}
	}
	img.src.ov = newOverlay(ops)
	img.logEntries = len(seq)
	return nil
}

// replayIntoFile writes the overlay into the file and empties the log (§2.3.3): a new
// FileWriteGuid first, then the replayed sectors, then the file extended to the
// log's last file offset, then a header with a zero LogGuid, each behind an fsync.
func (img *Image) replayIntoFile() error {
	name, ov := img.name, img.src.ov
	if err := img.updateHeader(func(h *Header) { h.FileWriteGuid = NewGUID() }); err != nil {
		return err
	}
	img.fileWriteGuidSet = true
	zero := make([]byte, 64*KiB)
	for _, z := range ov.zeros {
		for o := z.off; o < z.off+z.len; o += int64(len(zero)) {
			n := min(int64(len(zero)), z.off+z.len-o)
			if _, err := img.src.f.WriteAt(zero[:n], o); err != nil {
				return fmt.Errorf("%s: replay log: write zeros at %d: %w", name, o, err)
			}
		}
	}
	offs := make([]int64, 0, len(ov.pages))
	for k := range ov.pages {
		offs = append(offs, k)
	}
	sort.Slice(offs, func(a, b int) bool { return offs[a] < offs[b] })
	for _, k := range offs {
		if _, err := img.src.f.WriteAt(ov.pages[k], k); err != nil {
			return fmt.Errorf("%s: replay log: write at %d: %w", name, k, err)
		}
	}
	st, err := img.src.f.Stat()
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if st.Size() < img.src.vsize {
		if err := img.src.f.Truncate(img.src.vsize); err != nil {
			return fmt.Errorf("%s: replay log: extend to %d: %w", name, img.src.vsize, err)
		}
	}
	if err := img.src.f.Sync(); err != nil {
		return fmt.Errorf("%s: replay log: fsync: %w", name, err)
	}
	if err := img.updateHeader(func(h *Header) { h.LogGuid = GUID{} }); err != nil {
		return err
	}
	img.src.ov = nil
	return nil
}

// marshalLogEntry returns a log entry (§2.3.1) that makes the writes ops describe:
// the header, the descriptors, then a data sector per data descriptor.
func marshalLogEntry(seq uint64, tail uint32, guid GUID, flushed, last uint64, ops []logOp) []byte {
	data := 0
	for _, op := range ops {
		if op.data != nil {
			data++
		}
	}
	ds := descSectors(int64(len(ops)))
	b := make([]byte, (ds+int64(data))*logSector)
	h := logEntryHeader{EntryLength: uint32(len(b)), Tail: tail, SequenceNumber: seq, DescriptorCount: uint32(len(ops)),
		LogGuid: guid, FlushedFileOffset: flushed, LastFileOffset: last}
	copy(h.Signature[:], "loge")
	if _, err := binary.Encode(b, binary.LittleEndian, h); err != nil {
		panic(err)
	}
	sector := ds
	for i, op := range ops {
		d := logDescriptor{FileOffset: uint64(op.off), SequenceNumber: seq}
		if op.data != nil {
			copy(d.Signature[:], "desc")
			copy(d.Leading[:], op.data[:8])
			copy(d.Trailing[:], op.data[logSector-4:])
			s := b[sector*logSector:][:logSector]
			copy(s, "data")
			binary.LittleEndian.PutUint32(s[4:], uint32(seq>>32))
			copy(s[8:], op.data[8:logSector-4])
			binary.LittleEndian.PutUint32(s[logSector-4:], uint32(seq))
			sector++
		} else {
			copy(d.Signature[:], "zero")
			binary.LittleEndian.PutUint64(d.Leading[:], uint64(op.zeroLen))
		}
		if _, err := binary.Encode(b[logEntryHeaderLen+i*logDescriptorLen:], binary.LittleEndian, d); err != nil {
			panic(err)
		}
	}
	binary.LittleEndian.PutUint32(b[logEntryChecksumOff:], checksum(b, logEntryChecksumOff))
	return b
}
