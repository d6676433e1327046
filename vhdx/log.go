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

// logOp is one write that a log entry makes: 4 KiB of data, or zeros. Writes
// build entries from them (marshalLogEntry).
type logOp struct {
	off     int64
	zeroLen int64  // for a zero descriptor
	data    []byte // 4 KiB, for a data descriptor
}

// replayOp is one descriptor of the active sequence, as read from the log: a zero
// range, or a data sector that stays in the log (at) until it is needed.
type replayOp struct {
	seq     uint64 // the entry's sequence number, for errors
	off     uint64
	zeroLen uint64  // for a zero descriptor
	page    logPage // for a data descriptor: page.at >= 0
}

// logPage is a data sector of the log: at is its offset in the ring; the sector's
// first 8 and last 4 bytes are in its descriptor.
type logPage struct {
	at    int64
	lead  [8]byte
	trail [4]byte
}

// length is how many bytes of the file op writes.
func (op replayOp) length() uint64 {
	if op.page.at >= 0 {
		return logSector
	}
	return op.zeroLen
}

// descSectors is how many sectors n descriptors take: the first holds the header
// and 126 descriptors, every other 128.
func descSectors(n int64) int64 { return (n + 2 + 127) / 128 }

// overlay is the replayed log: the 4 KiB sectors it writes, read from the log
// when needed, and the ranges it zeros, sorted and merged. Every sector in pages
// was written after every zero range covering it, so pages win over zeros. The
// ops have passed readLog's checks: their offsets and lengths fit in an int64.
type overlay struct {
	log   logRing
	pages map[int64]logPage
	zeros []span
}

// newOverlay returns the result of the writes ops make, in order. It takes
// O(n log n) for n ops.
func newOverlay(log logRing, ops []replayOp) *overlay {
	type page struct {
		p   logPage
		idx int
	}
	type zero struct {
		off, end int64
		idx      int
	}
	data := 0
	for _, op := range ops {
		if op.page.at >= 0 {
			data++
		}
	}
	last := make(map[int64]page, data)
	zeros := make([]zero, 0, len(ops)-data)
	for i, op := range ops {
		if op.page.at >= 0 {
			last[int64(op.off)] = page{op.page, i}
		} else if op.zeroLen > 0 {
			zeros = append(zeros, zero{int64(op.off), int64(op.off + op.zeroLen), i})
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
	o := &overlay{log: log, pages: make(map[int64]logPage, len(last))}
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
			o.pages[k] = p.p
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

// page reads the data sector p of the log into b (4 KiB), as the file is to hold it.
func (o *overlay) page(b []byte, p logPage) error {
	if err := o.log.read(b, p.at); err != nil {
		return err
	}
	copy(b, p.lead[:])
	copy(b[logSector-4:], p.trail[:])
	return nil
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
func (o *overlay) patch(p []byte, off int64) error {
	end := off + int64(len(p))
	i := sort.Search(len(o.zeros), func(i int) bool { return o.zeros[i].off+o.zeros[i].len > off })
	for ; i < len(o.zeros) && o.zeros[i].off < end; i++ {
		z := o.zeros[i]
		clear(p[max(z.off, off)-off : min(z.off+z.len, end)-off])
	}
	if len(o.pages) == 0 {
		return nil
	}
	var d []byte
	for k := off &^ (logSector - 1); k < end; k += logSector {
		if pg, ok := o.pages[k]; ok {
			if d == nil {
				d = make([]byte, logSector)
			}
			if err := o.page(d, pg); err != nil {
				return err
			}
			lo, hi := max(k, off), min(k+logSector, end)
			copy(p[lo-off:hi-off], d[lo-k:hi-k])
		}
	}
	return nil
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
	// replay are the descriptors of the active sequence and head its last entry's
	// header, from readLog until checkLogReach has checked them against what the
	// replayed file can need.
	replay []replayOp
	head   logEntryHeader
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
		if err := s.ov.patch(p, off); err != nil {
			return err
		}
	}
	for k := off &^ (logSector - 1); len(s.pending) > 0 && k < off+int64(len(p)); k += logSector {
		if d, ok := s.pending[k]; ok {
			lo, hi := max(k, off), min(k+logSector, off+int64(len(p)))
			copy(p[lo-off:hi-off], d[lo-k:hi-k])
		}
	}
	return nil
}

// maxLogFileOffset bounds the file offsets a log may name before the metadata says
// what the file can need (checkLogReach): far past any valid file, and small enough
// that the sum of two fits an int64.
const maxLogFileOffset = 1 << 48

// readLog finds the active sequence of the log and builds the overlay that replays
// it, reading the log through a bounded window (see logscan.go). fileSize is the
// size of the file. It refuses a log that writes the spans no log may (the file
// identifier, the headers and the log itself) or past the file's last offset;
// checkLogReach checks the rest once the metadata is read.
func (img *Image) readLog(fileSize int64) error {
	h, name := img.header, img.name
	off, n := int64(h.LogOffset), int64(h.LogLength)
	ring := logRing{f: img.src.f, off: off, size: n}
	buf := make([]byte, logWindow)
	run, err := ring.activeSequence(h.LogGuid, buf)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if run == nil {
		return fmt.Errorf("%s: log GUID %v is set but the log at %d holds no valid sequence of entries: %w", name, h.LogGuid, off, ErrCorrupt)
	}
	head := run.head
	if head.FlushedFileOffset > uint64(fileSize) || head.FlushedFileOffset > head.LastFileOffset {
		return fmt.Errorf("%s: file is %d bytes, but the log's flushed file offset is %d (last file offset %d): %w", name, fileSize, head.FlushedFileOffset, head.LastFileOffset, ErrTruncated)
	}
	if head.LastFileOffset > maxLogFileOffset {
		return fmt.Errorf("%s: log entry %d extends the file to %d (its last file offset), past any VHDX file: %w", name, head.SequenceNumber, head.LastFileOffset, ErrCorrupt)
	}
	vsize := max(fileSize, int64(head.LastFileOffset))
	protected := []span{{0, regionTable1Off, "the file identifier and headers"}, {off, n, "the log"}}
	count, err := ring.descriptorCount(run, buf)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if count > maxReplayOps {
		return fmt.Errorf("%s: the log's active sequence, up to entry %d, holds %d descriptors, more than the %d vhdfs replays: %w", name, head.SequenceNumber, count, maxReplayOps, ErrUnsupported)
	}
	ops := make([]replayOp, 0, count)
	collect := func(d logDescriptor, at int64) error {
		op := replayOp{seq: d.SequenceNumber, off: d.FileOffset, page: logPage{at: at}}
		if at >= 0 {
			op.page.lead, op.page.trail = d.Leading, d.Trailing
		} else {
			op.zeroLen = binary.LittleEndian.Uint64(d.Leading[:])
		}
		l := op.length()
		if op.off > uint64(vsize) || l > uint64(vsize)-op.off {
			return fmt.Errorf("log entry %d writes %d bytes at %d, past the file's last offset %d: %w", op.seq, l, op.off, vsize, ErrCorrupt)
		}
		for _, p := range protected {
			if overlaps(int64(op.off), int64(l), p.off, p.len) {
				return fmt.Errorf("log entry %d writes %d bytes at %d, over %s: %w", op.seq, l, op.off, p.name, ErrCorrupt)
			}
		}
		if int64(len(ops)) == count {
			return fmt.Errorf("log entry %d holds more descriptors than it did: %w", op.seq, ErrCorrupt)
		}
		ops = append(ops, op)
		return nil
	}
	entries := 0
	for pos := run.start; ; entries++ {
		e, ok, err := ring.checkEntry(pos, n, h.LogGuid, buf, collect)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if !ok || entries >= int(n/logSector) {
			return fmt.Errorf("%s: log entry at %d changed while it was read: %w", name, off+pos, ErrCorrupt)
		}
		if e.SequenceNumber == head.SequenceNumber {
			break
		}
		pos = (pos + int64(e.EntryLength)) % n
	}
	img.src.vsize = vsize
	img.src.ov = newOverlay(ring, ops)
	img.src.replay, img.src.head = ops, head
	img.logEntries = entries + 1
	return nil
}

// checkLogReach refuses a log that writes, or extends the file, past the largest
// file this image's geometry can need: the file as it is (fileSize, or the end of
// its regions and of the log if later), then every payload block and every sector
// bitmap block allocated anew past its end, as writers allocate them. It runs once
// the replayed region table and metadata are read, and does nothing unless readLog
// built an overlay.
func (img *Image) checkLogReach(fileSize int64) error {
	ops, head := img.src.replay, img.src.head
	img.src.replay = nil
	if img.src.ov == nil {
		return nil
	}
	end := max(fileSize, int64(headerSection), int64(img.header.LogOffset)+int64(img.header.LogLength))
	for _, r := range img.regions {
		end = max(end, int64(r.FileOffset)+int64(r.Length))
	}
	g := img.geo
	end = (end + MiB - 1) / MiB * MiB
	limit := uint64(end + g.blocks*g.blockSize + (g.blocks+g.chunkRatio-1)/g.chunkRatio*sectorBitmapBlockSize)
	for _, op := range ops {
		if op.off+op.length() > limit { // both are at most maxLogFileOffset
			what := fmt.Sprintf("zeros %d bytes", op.zeroLen)
			if op.page.at >= 0 {
				what = fmt.Sprintf("writes %d bytes", logSector)
			}
			return fmt.Errorf("%s: log entry %d %s at %d, past %d, the end of the largest file this image's geometry can need: %w", img.name, op.seq, what, op.off, limit, ErrCorrupt)
		}
	}
	if head.LastFileOffset > limit {
		return fmt.Errorf("%s: log entry %d extends the file to %d (its last file offset), past %d, the end of the largest file this image's geometry can need: %w", img.name, head.SequenceNumber, head.LastFileOffset, limit, ErrCorrupt)
	}
	return nil
}

// replayIntoFile writes the overlay into the file and empties the log (§2.3.3): a new
// FileWriteGuid first, then the replayed sectors, then the file extended to the
// log's last file offset, then a header with a zero LogGuid, each behind an fsync.
// Zero ranges are not written but punched (zeroRange), and only inside the file:
// past its end the file reads as zeros, and goes on doing so once extended.
func (img *Image) replayIntoFile() error {
	name, ov := img.name, img.src.ov
	st, err := img.src.f.Stat()
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := img.updateHeader(func(h *Header) { h.FileWriteGuid = NewGUID() }); err != nil {
		return err
	}
	img.fileWriteGuidSet = true
	for _, z := range ov.zeros {
		if n := min(z.off+z.len, st.Size()) - z.off; n > 0 {
			if err := zeroRange(img.src.f, z.off, n, img.Type() == TypeFixed); err != nil {
				return fmt.Errorf("%s: replay log: zero %d bytes at %d: %w", name, n, z.off, err)
			}
		}
	}
	offs := make([]int64, 0, len(ov.pages))
	for k := range ov.pages {
		offs = append(offs, k)
	}
	sort.Slice(offs, func(a, b int) bool { return offs[a] < offs[b] })
	d := make([]byte, logSector)
	for _, k := range offs {
		if err := ov.page(d, ov.pages[k]); err != nil {
			return fmt.Errorf("%s: replay log: %w", name, err)
		}
		if _, err := img.src.f.WriteAt(d, k); err != nil {
			return fmt.Errorf("%s: replay log: write at %d: %w", name, k, err)
		}
	}
	if st, err = img.src.f.Stat(); err != nil {
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
