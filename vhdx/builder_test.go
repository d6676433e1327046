package vhdx

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
	"unicode/utf16"
)

// builder writes small VHDX files by hand, field by field, with their checksums:
// the header section, a 1 MiB log at 1 MiB, the metadata at 2 MiB, the BAT at 3 MiB
// and the blocks after it, each 1 MiB-aligned.
type builder struct {
	size                 int64
	blockSize            uint32
	logical, physical    uint32
	parent, leaveAlloc   bool
	locator              []KeyValue
	states               map[int64]BlockState // payload block -> state; absent is NOT_PRESENT
	data                 map[int64][]byte     // payload block -> its data (stored if FULLY or PARTIALLY)
	bits                 map[int64][]int64    // payload block -> logical sectors whose bit is set
	rawBAT               map[int64]uint64     // BAT index -> entry, laid over the computed ones
	extraRegions         []RegionEntry
	extraItems           []MetadataEntry
	seq1, seq2           uint64 // header sequence numbers; 0 leaves that header out
	fileWrite, dataWrite GUID
	logGuid              GUID
	log                  []logSpec
}

// logSpec is one log entry to write at pos in the ring.
type logSpec struct {
	pos           int64
	seq           uint64
	tail          uint32
	guid          GUID // the builder's logGuid if zero
	flushed, last uint64
	ops           []logOp
	corruptData   bool // break the data sector's sequence number
}

const (
	bLogOff  = 1 * MiB
	bLogLen  = 1 * MiB
	bMetaOff = 2 * MiB
	bBATOff  = 3 * MiB
)

func newBuilder(size int64, blockSize uint32) *builder {
	return &builder{size: size, blockSize: blockSize, logical: 512, physical: 4096,
		states: map[int64]BlockState{}, data: map[int64][]byte{}, bits: map[int64][]int64{}, rawBAT: map[int64]uint64{},
		seq1: 1, seq2: 2, fileWrite: NewGUID(), dataWrite: NewGUID()}
}

func (b *builder) geometry() geometry {
	return newGeometry(b.size, int64(b.blockSize), int64(b.logical), b.parent)
}

// batLen is the BAT region's length, 1 MiB-aligned.
func (b *builder) batLen() int64 {
	return (b.geometry().entries*8 + MiB - 1) / MiB * MiB
}

// blockOffset is where payload block p is stored: blocks follow the BAT in order of
// their number, each block size long; sector bitmap blocks follow them.
func (b *builder) blockOffset(p int64) int64 { return bBATOff + b.batLen() + p*int64(b.blockSize) }

func (b *builder) bitmapOffset(chunk int64) int64 {
	g := b.geometry()
	return b.blockOffset(g.blocks) + chunk*sectorBitmapBlockSize
}

// build returns the file's bytes.
func (b *builder) build() []byte {
	g := b.geometry()
	chunks := (g.blocks + g.chunkRatio - 1) / g.chunkRatio
	end := b.bitmapOffset(0)
	if b.parent {
		end = b.bitmapOffset(chunks)
	}
	f := make([]byte, end)
	copy(f, "vhdxfile")
	copy(f[8:], encodeUTF16("vhdfs test builder"))
	for i, seq := range []uint64{b.seq1, b.seq2} {
		if seq == 0 {
			continue
		}
		h := Header{SequenceNumber: seq, FileWriteGuid: b.fileWrite, DataWriteGuid: b.dataWrite, LogGuid: b.logGuid,
			Version: 1, LogLength: bLogLen, LogOffset: bLogOff}
		copy(f[header1Off+int64(i)*(header2Off-header1Off):], h.Marshal())
	}
	regions := append([]RegionEntry{{Guid: RegionBAT, FileOffset: bBATOff, Length: uint32(b.batLen()), Flags: 1},
		{Guid: RegionMetadata, FileOffset: bMetaOff, Length: MiB, Flags: 1}}, b.extraRegions...)
	rt := marshalRegionTable(regions)
	copy(f[regionTable1Off:], rt)
	copy(f[regionTable2Off:], rt)
	b.writeMetadata(f[bMetaOff : bMetaOff+MiB])
	for p := int64(0); p < g.blocks; p++ {
		s := b.states[p]
		var e batEntry
		switch s {
		case FullyPresent, PartiallyPresent:
			e = makeEntry(s, b.blockOffset(p))
			copy(f[b.blockOffset(p):b.blockOffset(p)+int64(b.blockSize)], b.data[p])
		default:
			e = makeEntry(s, 0)
		}
		binary.LittleEndian.PutUint64(f[bBATOff+8*g.payloadIndex(p):], uint64(e))
		if b.parent {
			bm := f[b.bitmapOffset(p/g.chunkRatio)+p%g.chunkRatio*g.bitmapSlice:]
			for _, s := range b.bits[p] {
				bm[s/8] |= 1 << (s % 8)
			}
		}
	}
	if b.parent {
		for c := int64(0); c < chunks; c++ {
			binary.LittleEndian.PutUint64(f[bBATOff+8*(c*(g.chunkRatio+1)+g.chunkRatio):], uint64(makeEntry(Present, b.bitmapOffset(c))))
		}
	}
	for i, e := range b.rawBAT {
		binary.LittleEndian.PutUint64(f[bBATOff+8*i:], e)
	}
	for _, l := range b.log {
		guid := l.guid
		if guid.IsZero() {
			guid = b.logGuid
		}
		e := buildLogEntry(l.seq, l.tail, guid, l.flushed, l.last, l.ops, l.corruptData)
		ring := f[bLogOff : bLogOff+bLogLen]
		k := copy(ring[l.pos:], e)
		copy(ring, e[k:])
	}
	return f
}

func (b *builder) writeMetadata(r []byte) {
	copy(r, "metadata")
	type item struct {
		id    GUID
		flags uint32
		data  []byte
	}
	u32 := func(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
	var fp uint32
	if b.leaveAlloc {
		fp |= 1
	}
	if b.parent {
		fp |= 2
	}
	page83 := NewGUID()
	items := []item{
		{ItemFileParameters, itemIsRequired, append(u32(b.blockSize), u32(fp)...)},
		{ItemVirtualDiskSize, itemIsRequired | itemIsVirtualDisk, binary.LittleEndian.AppendUint64(nil, uint64(b.size))},
		{ItemPage83Data, itemIsRequired | itemIsVirtualDisk, page83[:]},
		{ItemLogicalSectorSize, itemIsRequired | itemIsVirtualDisk, u32(b.logical)},
		{ItemPhysicalSectorSize, itemIsRequired | itemIsVirtualDisk, u32(b.physical)},
	}
	if b.parent {
		items = append(items, item{ItemParentLocator, itemIsRequired, marshalLocator(b.locator)})
	}
	for _, e := range b.extraItems {
		items = append(items, item{e.ItemID, e.Flags, make([]byte, e.Length)})
	}
	binary.LittleEndian.PutUint16(r[10:], uint16(len(items)))
	off := uint32(metadataTableSize)
	for i, it := range items {
		e := MetadataEntry{ItemID: it.id, Offset: off, Length: uint32(len(it.data)), Flags: it.flags}
		if _, err := binary.Encode(r[metadataHeaderLen+i*metadataEntryLen:], binary.LittleEndian, e); err != nil {
			panic(err)
		}
		copy(r[off:], it.data)
		off += uint32(len(it.data)) // packed and unaligned, as the specification allows
	}
}

func marshalLocator(kvs []KeyValue) []byte {
	b := make([]byte, locatorHeaderLen+len(kvs)*locatorEntryLen)
	copy(b, LocatorTypeVHDX[:])
	binary.LittleEndian.PutUint16(b[18:], uint16(len(kvs)))
	for i, kv := range kvs {
		k, v := encodeUTF16(kv.Key), encodeUTF16(kv.Value)
		e := locatorEntry{KeyOffset: uint32(len(b)), ValueOffset: uint32(len(b) + len(k)), KeyLength: uint16(len(k)), ValueLength: uint16(len(v))}
		if _, err := binary.Encode(b[locatorHeaderLen+i*locatorEntryLen:], binary.LittleEndian, e); err != nil {
			panic(err)
		}
		b = append(append(b, k...), v...)
	}
	return b
}

func encodeUTF16(s string) []byte {
	var b []byte
	for _, u := range utf16.Encode([]rune(s)) {
		b = binary.LittleEndian.AppendUint16(b, u)
	}
	return b
}

// buildLogEntry returns one log entry; with corruptData its first data sector has
// the wrong sequence number (and the entry a checksum that covers it).
func buildLogEntry(seq uint64, tail uint32, guid GUID, flushed, last uint64, ops []logOp, corruptData bool) []byte {
	b := marshalLogEntry(seq, tail, guid, flushed, last, ops)
	if corruptData {
		s := b[descSectors(int64(len(ops)))*logSector:]
		s[logSector-4]++
		binary.LittleEndian.PutUint32(b[logEntryChecksumOff:], checksum(b, logEntryChecksumOff))
	}
	return b
}

// writeFile writes b to a new file in a temporary directory and returns its path.
func writeFile(t testing.TB, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "x.vhdx")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// fill returns n bytes of c.
func fill(n int64, c byte) []byte { return bytes.Repeat([]byte{c}, int(n)) }

// pattern returns n bytes that differ from sector to sector: each 512-byte sector
// holds seed+its number.
func pattern(n int64, seed byte) []byte {
	b := make([]byte, 0, n)
	for s := int64(0); int64(len(b)) < n; s++ {
		b = append(b, bytes.Repeat([]byte{seed + byte(s)}, int(min(512, n-int64(len(b)))))...)
	}
	return b
}
