package vhdx

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"sort"
	"strings"

	"github.com/vhdfs/vhdfs/image"
)

// Check returns the problems of the open image beyond those Open refuses (Open
// already refuses bad signatures and checksums, a truncated file, unknown required
// regions and metadata items, bad sizes, regions that overlap or lie past the end
// of the file, and logs that cannot be replayed). It writes nothing. It looks at
// both headers and both region tables, the metadata table and its items, the parent
// locator, every BAT entry (as reads see it: writes since the open included), which
// Open leaves to the reads that need it (invalid states, blocks past the end of the
// file, over metadata or over each other, PARTIALLY_PRESENT blocks without a parent
// or a sector bitmap), and the sector bitmaps of PARTIALLY_PRESENT blocks.
func (img *Image) Check() []image.Problem {
	var out []image.Problem
	add := func(s image.Severity, format string, args ...any) {
		out = append(out, image.Problem{Severity: s, File: img.name, Message: fmt.Sprintf(format, args...)})
	}
	// A writer's header updates, BAT changes and file growth wait meanwhile. The
	// checks below take no lock themselves: a second read lock could deadlock
	// behind a waiting writer.
	img.mu.RLock()
	defer img.mu.RUnlock()
	img.checkHeaders(add)
	img.checkRegionTables(add)
	img.checkMetadata(add)
	img.checkLocator(add)
	img.checkBAT(add)
	if st, err := img.src.f.Stat(); err != nil {
		add(image.Error, "stat: %v", err)
	} else if st.Size()%MiB != 0 {
		add(image.Note, "file size %d is not a multiple of 1 MiB, as the format lays files out; harmless", st.Size())
	}
	return out
}

type addFunc func(s image.Severity, format string, args ...any)

// checkHeaders compares both headers (§2.2.2) and reports the log. The caller
// holds mu.
func (img *Image) checkHeaders(add addFunc) {
	h, cur := img.header, img.headerSlot
	other := int64(header1Off)
	if cur == header1Off {
		other = header2Off
	}
	raw := make([]byte, headerSize)
	if _, err := img.src.f.ReadAt(raw, other); err != nil {
		add(image.Error, "read header at %d: %v", other, err)
	} else if o, err := parseHeader(raw, other); err != nil {
		add(image.Warning, "header at %d is not valid (%v): only the header at %d is left", other, err, cur)
	} else {
		switch {
		case o.SequenceNumber == h.SequenceNumber:
			add(image.Note, "both headers are the same copy (sequence number %d); qemu and vhdfs read it", h.SequenceNumber)
		case o.LogOffset != h.LogOffset || o.LogLength != h.LogLength:
			add(image.Warning, "header at %d (sequence number %d) puts the log at %d, length %d; the current header at %d puts it at %d, length %d", other, o.SequenceNumber, o.LogOffset, o.LogLength, cur, h.LogOffset, h.LogLength)
		}
	}
	if _, err := img.src.f.ReadAt(raw, cur); err == nil && !allZero(raw[headerLen:]) {
		add(image.Note, "header at %d: unused bytes %d-%d are not zero: readers ignore them", cur, headerLen, headerSize-1)
	}
	if h.DataWriteGuid.IsZero() {
		add(image.Warning, "header at %d: DataWriteGuid is zero: a child's parent_linkage cannot name this image", cur)
	}
	if h.FileWriteGuid.IsZero() {
		add(image.Note, "header at %d: the file's write ID (FileWriteGuid) is zero; harmless", cur)
	}
	if h.LogLength == 0 {
		add(image.Warning, "header at %d: no log region (length 0): a write that allocates a block fails", cur)
	}
	if img.src.ov != nil { // a writable open replayed the log into the file
		add(image.Warning, "log holds %d entries (log GUID %v), replayed in memory for reading only: qemu refuses the file until they are replayed into it (vhdfs check --repair)", img.logEntries, h.LogGuid)
	}
}

// headerLen is the bytes of the header that have fields; the rest of its 4 KiB is
// reserved (§2.2.2).
const headerLen = 80

// checkRegionTables compares both region tables (§2.2.3) and reports unknown
// optional regions and known ones not marked required.
func (img *Image) checkRegionTables(add addFunc) {
	var tables [2][]byte
	valid := 0
	for i, off := range []int64{regionTable1Off, regionTable2Off} {
		b := make([]byte, regionTableSize)
		if err := img.src.readAt(b, off); err != nil {
			add(image.Error, "read region table at %d: %v", off, err)
			continue
		}
		if _, err := parseRegionTable(b, off); err != nil {
			add(image.Warning, "region table at %d is not valid (%v): only the other copy is left", off, err)
			continue
		}
		if binary.LittleEndian.Uint32(b[12:]) != 0 {
			add(image.Note, "region table at %d: an unused field is not zero (reserved field): readers ignore it", off)
		}
		tables[i] = b
		valid++
	}
	if valid == 2 && !bytes.Equal(tables[0], tables[1]) {
		add(image.Warning, "region tables at %d and %d differ: the first is used", regionTable1Off, regionTable2Off)
	}
	for i, e := range img.regions {
		switch e.Guid {
		case RegionBAT, RegionMetadata:
			if !e.Required() {
				what := map[GUID]string{RegionBAT: "BAT", RegionMetadata: "metadata"}[e.Guid]
				add(image.Note, "region %d (the %s) is not marked required, as qemu writes it; harmless", i, what)
			}
		default:
			add(image.Note, "region %d (%v) at %d, length %d, is not known and not required: ignored", i, e.Guid, e.FileOffset, e.Length)
		}
		if e.Flags&^1 != 0 {
			add(image.Note, "region %d (%v): unused flag bits (reserved flag bits %#x) are set: readers ignore them", i, e.Guid, e.Flags&^1)
		}
	}
}

// checkMetadata reads the metadata table again (§2.6.1) and reports items that
// overlap, known items with unusual flags or lengths, and ignored items.
func (img *Image) checkMetadata(add addFunc) {
	var md RegionEntry
	for _, e := range img.regions {
		if e.Guid == RegionMetadata {
			md = e
		}
	}
	off := int64(md.FileOffset)
	tbl := make([]byte, metadataTableSize)
	if err := img.src.readAt(tbl, off); err != nil {
		add(image.Error, "read metadata table at %d: %v", off, err)
		return
	}
	var h metadataTableHeader
	_, _ = binary.Decode(tbl, binary.LittleEndian, &h)
	if h.Reserved != 0 || !allZero(h.Reserved2[:]) {
		add(image.Note, "metadata table at %d: unused fields are not zero: readers ignore them", off)
	}
	entries := make([]MetadataEntry, h.EntryCount)
	_, _ = binary.Decode(tbl[metadataHeaderLen:], binary.LittleEndian, entries)
	wantLen := map[GUID]uint32{ItemFileParameters: 8, ItemVirtualDiskSize: 8, ItemPage83Data: 16, ItemLogicalSectorSize: 4, ItemPhysicalSectorSize: 4}
	virtualDisk := map[GUID]bool{ItemVirtualDiskSize: true, ItemPage83Data: true, ItemLogicalSectorSize: true, ItemPhysicalSectorSize: true}
	var used []span
	for i, e := range entries {
		what := fmt.Sprintf("metadata item %d (%v)", i, e.ItemID)
		if e.Length > 0 {
			used = append(used, span{int64(e.Offset), int64(e.Length), what})
		}
		if e.Reserved != 0 || e.Flags&^uint32(itemIsUser|itemIsVirtualDisk|itemIsRequired) != 0 {
			add(image.Note, "%s: unused bits are set (flags %#x, reserved %#x): readers ignore them", what, e.Flags, e.Reserved)
		}
		if e.Flags&itemIsUser != 0 || !isKnownItem(e.ItemID) {
			add(image.Note, "%s is a user item or not known, and not required: ignored", what)
			continue
		}
		if e.Flags&itemIsRequired == 0 {
			add(image.Note, "%s is not marked required, as the format says it should be; harmless", what)
		}
		if vd := e.Flags&itemIsVirtualDisk != 0; vd != virtualDisk[e.ItemID] {
			add(image.Note, "%s: its IsVirtualDisk flag is %v where the format says %v; harmless", what, vd, virtualDisk[e.ItemID])
		}
		if n, ok := wantLen[e.ItemID]; ok && e.Length != n {
			add(image.Warning, "%s is %d bytes long, want %d", what, e.Length, n)
		}
	}
	sort.Slice(used, func(a, b int) bool { return used[a].off < used[b].off })
	for k := 1; k < len(used); k++ {
		if p := used[k-1]; used[k].off < p.off+p.len {
			add(image.Error, "%s at region offset %d overlaps %s at %d, length %d", used[k].name, used[k].off, p.name, p.off, p.len)
		}
	}
	b := make([]byte, 8)
	for _, e := range entries {
		if e.ItemID == ItemFileParameters && e.Flags&itemIsUser == 0 && e.Length >= 8 {
			if err := img.src.readAt(b, off+int64(e.Offset)); err == nil {
				if f := binary.LittleEndian.Uint32(b[4:]); f&^3 != 0 {
					add(image.Note, "file parameters: unused flag bits (reserved flag bits %#x) are set: readers ignore them", f&^3)
				}
			}
		}
	}
	if img.meta.Load().Page83Data.IsZero() {
		add(image.Note, "the disk's ID (page 83 data, VirtualDiskId) is zero: a guest sees a disk without a serial; harmless")
	}
}

// checkLocator checks the parent locator's keys (§2.6.2.6.3).
func (img *Image) checkLocator(add addFunc) {
	kv := img.ParentLocator()
	if !img.meta.Load().HasParent {
		if kv != nil {
			add(image.Note, "the image has no parent but keeps a parent locator (perhaps left by a merge): ignored")
		}
		return
	}
	if v, ok := kv[keyParentLinkage]; !ok {
		add(image.Error, "parent locator has no parent_linkage: no image can be accepted as the parent")
	} else if _, err := image.ParseID(v); err != nil {
		add(image.Error, "parent locator: parent_linkage %q is not a GUID: no image can be accepted as the parent", v)
	}
	if v, ok := kv[keyParentLinkage2]; ok {
		if id, err := image.ParseID(v); err != nil {
			add(image.Warning, "parent locator: parent_linkage2 %q is not a GUID", v)
		} else if id.IsZero() {
			add(image.Note, "parent locator: parent_linkage2 is zero, as Windows writes it; harmless (parent_linkage names the parent)")
		}
	}
	if kv[keyRelativePath] == "" && kv[keyVolumePath] == "" && kv[keyAbsolutePath] == "" {
		add(image.Warning, "parent locator has no relative_path, volume_path or absolute_win32_path: nothing says where the parent is")
	}
	for _, e := range img.meta.Load().ParentLocator {
		switch e.Key {
		case keyParentLinkage, keyParentLinkage2, keyRelativePath, keyVolumePath, keyAbsolutePath:
		default:
			add(image.Note, "parent locator entry %q is not one vhdfs knows: ignored", e.Key)
		}
	}
}

// checkBAT checks every BAT entry (§2.5) and the entries past those in use. The
// caller holds mu.
func (img *Image) checkBAT(add addFunc) {
	g := img.geo
	var bat RegionEntry
	for _, e := range img.regions {
		if e.Guid == RegionBAT {
			bat = e
		}
	}
	// The entries past the count in use, which Open ignores.
	if extra := int64(bat.Length)/8 - g.entries; extra > 0 {
		buf := make([]byte, 8*min(extra, MiB/8))
		var n, first int64 = 0, -1
		for i := int64(0); i < extra; i += int64(len(buf)) / 8 {
			k := min(int64(len(buf))/8, extra-i)
			if err := img.src.readAt(buf[:8*k], img.batOff+8*(g.entries+i)); err != nil {
				add(image.Error, "read BAT at %d: %v", img.batOff+8*(g.entries+i), err)
				break
			}
			for j := int64(0); j < k; j++ {
				if binary.LittleEndian.Uint64(buf[8*j:]) != 0 {
					if first < 0 {
						first = g.entries + i + j
					}
					n++
				}
			}
		}
		if n > 0 {
			add(image.Note, "block table entries past the %d in use: %d not zero (the first: entry %d), as qemu 5.2 leaves one: ignored", g.entries, n, first)
		}
	}
	img.checkEntries(add)
}

// maxOverlaps bounds the overlapping blocks Check names.
const maxOverlaps = 10

// maxPerEntry bounds the findings of one kind Check names entry by entry (a crafted
// table of millions of entries would otherwise give millions of lines); the rest are
// counted in one line.
const maxPerEntry = 20

// checkEntries reads the whole table a megabyte at a time (scanBAT: the table as
// reads see it, writes since the open included), in memory that does not grow with
// it: a bit per MiB of the file finds blocks that overlap, and the sector bitmap of
// each chunk is read once, after its PARTIALLY_PRESENT entries. The caller holds mu.
func (img *Image) checkEntries(add addFunc) {
	g := img.geo
	diff, fixed := img.meta.Load().HasParent, img.meta.Load().LeaveBlockAllocated
	var full, draft, nextP, reserved, bad int64
	firstNotFull, firstState := int64(-1), NotPresent
	fileEnd := max(img.src.vsize, img.grown.Load())
	used := make([]uint64, (fileEnd/MiB+63)/64) // a bit per MiB of the file
	type clash struct {
		i, at int64
	}
	var clashes []clash
	// The PARTIALLY_PRESENT blocks of chunk c, waiting for its bitmap entry.
	var partial []int64
	var none, all blockSet
	chunk := int64(-1)
	endChunk := func(be batEntry) {
		if len(partial) > 0 {
			img.checkBitmaps(add, chunk, be, partial, &none, &all)
		}
		partial = partial[:0]
	}
	err := img.scanBAT(func(i int64, e batEntry) bool {
		if c := i / (g.chunkRatio + 1); c != chunk {
			endChunk(0) // its bitmap entry, zero, was skipped
			chunk = c
		}
		if r := uint64(e) >> 3 & (1<<17 - 1); r != 0 {
			if reserved++; reserved <= maxPerEntry {
				add(image.Note, "BAT entry %d: unused bits (reserved bits 3-19) are %#x, not 0: readers ignore them", i, r)
			}
		}
		s := e.state()
		if g.isBitmap(i) {
			if s == Present && !diff {
				add(image.Note, "BAT entry %d: the image has no parent but keeps a sector bitmap block at %d: ignored", i, e.offset())
			}
		} else {
			p := g.block(i)
			if s == unmappedDraft {
				draft++
			}
			if fixed {
				if firstNotFull < 0 && p > nextP {
					firstNotFull = nextP // a zero entry: NOT_PRESENT
				}
				if s == FullyPresent {
					full++
				} else if firstNotFull < 0 {
					firstNotFull, firstState = p, s
				}
				nextP = p + 1
			}
		}
		n, problem := img.entryProblem(i, e)
		if problem != "" {
			if bad++; bad <= maxPerEntry {
				add(image.Error, "%s", problem)
			}
			return true
		}
		if n > 0 {
			for m := e.at() / MiB; m < (e.at()+n+MiB-1)/MiB && m/64 < int64(len(used)); m++ {
				if used[m/64]&(1<<(m%64)) != 0 {
					if len(clashes) < maxOverlaps {
						clashes = append(clashes, clash{i, m * MiB})
					}
					break
				}
				used[m/64] |= 1 << (m % 64)
			}
		}
		if s == PartiallyPresent && !g.isBitmap(i) {
			partial = append(partial, g.block(i))
		}
		if g.isBitmap(i) {
			endChunk(e)
		}
		return true
	})
	if err != nil {
		add(image.Error, "%v", err)
		return
	}
	endChunk(0)
	if reserved > maxPerEntry {
		add(image.Note, "%d more BAT entries with unused bits set", reserved-maxPerEntry)
	}
	if bad > maxPerEntry {
		add(image.Error, "%d more BAT entries with errors such as those above", bad-maxPerEntry)
	}
	if draft > 0 {
		add(image.Note, "%d block table entries mark unmapped blocks as a draft of the format did (value 5, not 3): they read as unmapped", draft)
	}
	if fixed && full < g.blocks {
		if firstNotFull < 0 {
			firstNotFull = nextP
		}
		add(image.Note, "fixed image has %d blocks not fully allocated (the first: block %d, %v), as qemu 7.2 makes them; harmless", g.blocks-full, firstNotFull, firstState)
	}
	// A second pass names the block each clash ran into: the first that holds its MiB.
	for _, c := range clashes {
		other := ""
		_ = img.scanBAT(func(i int64, e batEntry) bool {
			if i >= c.i {
				return false
			}
			if n, problem := img.entryProblem(i, e); problem == "" && n > 0 && overlaps(e.at(), n, c.at, MiB) {
				other = g.entryName(i)
				return false
			}
			return true
		})
		add(image.Error, "%s and %s overlap at %d", other, g.entryName(c.i), c.at)
	}
	if len(none.first) > 0 {
		add(image.Note, "%s PARTIALLY_PRESENT with no sector written: %s wholly from the parent; harmless", none, map[bool]string{true: "it reads", false: "they read"}[none.n == 1])
	}
	if len(all.first) > 0 {
		add(image.Note, "%s PARTIALLY_PRESENT with every sector written: %s be FULLY_PRESENT; harmless", all, map[bool]string{true: "it could", false: "they could"}[all.n == 1])
	}
}

// checkBitmaps checks the PARTIALLY_PRESENT blocks of chunk c, whose sector bitmap
// entry is be: it must be present, and blocks whose bits are all clear (the block
// reads wholly from the parent) or all set (it could be FULLY_PRESENT) are counted
// in none and all.
func (img *Image) checkBitmaps(add addFunc, c int64, be batEntry, blocks []int64, none, all *blockSet) {
	g := img.geo
	if be.state() != Present {
		for _, p := range blocks {
			add(image.Error, "BAT entry %d is PARTIALLY_PRESENT but its sector bitmap entry %d is %v", g.payloadIndex(p), g.bitmapIndex(p), be.state())
		}
		return
	}
	if _, problem := img.entryProblem(g.bitmapIndex(blocks[0]), be); problem != "" {
		return // reported
	}
	chunk := make([]byte, sectorBitmapBlockSize)
	if err := img.readData(chunk, be.at()); err != nil {
		add(image.Error, "read sector bitmap of chunk %d at %d: %v", c, be.offset(), err)
		return
	}
	for _, p := range blocks {
		// The sectors of the block that lie inside the disk.
		sectors := min(g.blockSize, g.size-p*g.blockSize) / g.sectorSize
		slice := chunk[p%g.chunkRatio*g.bitmapSlice:]
		set := 0
		for s := int64(0); s < sectors; s++ {
			if slice[s/8]&(1<<(s%8)) != 0 {
				set++
			}
		}
		switch int64(set) {
		case 0:
			none.add(p)
		case sectors:
			all.add(p)
		}
	}
}

// blockSet counts blocks and keeps the first few, for one line of Check.
type blockSet struct {
	n     int
	first []int64
}

func (b *blockSet) add(p int64) {
	b.n++
	if len(b.first) < 5 {
		b.first = append(b.first, p)
	}
}

// String names the blocks: "block 7 is", "3 blocks (1, 2, 9) are", "40 blocks (0,
// 1, 2, 3, 4, ...) are".
func (b blockSet) String() string {
	if b.n == 1 {
		return fmt.Sprintf("block %d is", b.first[0])
	}
	var names []string
	for _, p := range b.first {
		names = append(names, fmt.Sprint(p))
	}
	if b.n > len(b.first) {
		names = append(names, "...")
	}
	return fmt.Sprintf("%d blocks (%s) are", b.n, strings.Join(names, ", "))
}

var zeros64K = make([]byte, 64*KiB)

// allZero reports whether b is all zeros, without a per-byte loop that the race
// detector would slow down.
func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeros64K))
		if !bytes.Equal(b[:n], zeros64K[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// Repair opens the image at name for writing, which replays a non-empty log into
// the file (§2.3.3), and closes it; it reports how many log entries it replayed (0
// when the log was empty and nothing was written). It takes the image's lock as
// Open does: the image must not be open for writing elsewhere.
func Repair(name string) (replayed int, err error) {
	img, err := Open(name, true)
	if err != nil {
		return 0, err
	}
	n := img.LogReplayed()
	if err := img.Close(); err != nil {
		return n, err
	}
	return n, nil
}
