package vhdx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

// Where the builder puts things in the metadata region: the items are packed after
// the table in this order.
const (
	mdBlockSize     = bMetaOff + metadataTableSize
	mdVirtualSize   = mdBlockSize + 8
	mdLogicalSector = mdVirtualSize + 8 + 16
	mdFirstEntry    = bMetaOff + metadataHeaderLen
)

func fixHeader(f []byte, off int64) {
	binary.LittleEndian.PutUint32(f[off+headerChecksumOff:], checksum(f[off:off+headerSize], headerChecksumOff))
}

func fixRegionTables(f []byte) {
	for _, off := range []int64{regionTable1Off, regionTable2Off} {
		binary.LittleEndian.PutUint32(f[off+regionTableChecksumOff:], checksum(f[off:off+regionTableSize], regionTableChecksumOff))
	}
}

func put32(f []byte, off int64, v uint32) { binary.LittleEndian.PutUint32(f[off:], v) }
func put64(f []byte, off int64, v uint64) { binary.LittleEndian.PutUint64(f[off:], v) }

// dynamic builds an 8 MiB dynamic image with block 0 written, changed by edit.
func dynamic(edit func(b *builder)) []byte {
	b := newBuilder(8*MiB, MiB)
	b.states[0] = FullyPresent
	b.data[0] = fill(MiB, 1)
	if edit != nil {
		edit(b)
	}
	return b.build()
}

// TestBadInput: each damaged file fails to open, read-only and writable, with one
// error that names the file and the field and wraps the right sentinel, and the file
// is not changed.
func TestBadInput(t *testing.T) {
	patched := func(patch func(f []byte)) []byte {
		f := dynamic(nil)
		patch(f)
		return f
	}
	for _, tc := range []struct {
		name  string
		file  []byte
		want  error
		field string
	}{
		{"wrong signature", patched(func(f []byte) { copy(f, "vhdxfilf") }), ErrNotVHDX, "file identifier"},
		{"a VHD footer", append(make([]byte, 1024), []byte("conectix")...), ErrNotVHDX, "file identifier"},
		{"empty file", nil, ErrNotVHDX, "file identifier"},
		{"truncated header section", dynamic(nil)[:200*KiB], ErrTruncated, "header section"},
		{"both headers bad", patched(func(f []byte) { f[header1Off+100]++; f[header2Off+100]++ }), ErrChecksum, "header at 131072"},
		{"both headers without signature", patched(func(f []byte) { f[header1Off] = 0; f[header2Off] = 0 }), ErrCorrupt, "signature"},
		{"header version 2", patched(func(f []byte) {
			binary.LittleEndian.PutUint16(f[header1Off+66:], 2)
			binary.LittleEndian.PutUint16(f[header2Off+66:], 2)
			fixHeader(f, header1Off)
			fixHeader(f, header2Off)
		}), ErrUnsupported, "version"},
		{"equal sequence numbers, different headers", dynamic(func(b *builder) { b.seq1, b.seq2 = 5, 5; b.logGuid = GUID{} }), nil, ""}, // replaced below
		{"both region tables bad", patched(func(f []byte) { f[regionTable1Off+40]++; f[regionTable2Off+40]++ }), ErrChecksum, "region table"},
		{"region entry count too large", patched(func(f []byte) {
			put32(f, regionTable1Off+8, 3000)
			put32(f, regionTable2Off+8, 3000)
			fixRegionTables(f)
		}), ErrCorrupt, "entry count"},
		{"unknown required region", dynamic(func(b *builder) {
			b.extraRegions = []RegionEntry{{Guid: NewGUID(), FileOffset: 20 * MiB, Length: MiB, Flags: 1}}
		}), ErrUnsupported, "required but not known"},
		{"BAT region past the end", patched(func(f []byte) {
			put64(f, regionTable1Off+16+16, 64*MiB)
			put64(f, regionTable2Off+16+16, 64*MiB)
			fixRegionTables(f)
		}), ErrTruncated, "BAT region"},
		{"metadata region over the log", patched(func(f []byte) {
			put64(f, regionTable1Off+16+32+16, bLogOff)
			put64(f, regionTable2Off+16+32+16, bLogOff)
			fixRegionTables(f)
		}), ErrCorrupt, "overlaps the log"},
		{"unknown required metadata item", dynamic(func(b *builder) {
			b.extraItems = []MetadataEntry{{ItemID: NewGUID(), Length: 8, Flags: itemIsRequired}}
		}), ErrUnsupported, "required but not known"},
		{"known item ID marked IsUser and required", dynamic(func(b *builder) {
			b.extraItems = []MetadataEntry{{ItemID: ItemFileParameters, Length: 8, Flags: itemIsRequired | itemIsUser}}
		}), ErrUnsupported, "required but not known"},
		{"metadata item outside the region", patched(func(f []byte) { put32(f, mdFirstEntry+16, MiB-4) }), ErrCorrupt, "outside the metadata region"},
		{"metadata item inside the table", patched(func(f []byte) { put32(f, mdFirstEntry+16, 64) }), ErrCorrupt, "outside the metadata region"},
		{"block size not a power of two", patched(func(f []byte) { put32(f, mdBlockSize, 3*MiB) }), ErrCorrupt, "block size"},
		{"block size too small", patched(func(f []byte) { put32(f, mdBlockSize, 512*KiB) }), ErrCorrupt, "block size"},
		{"block size too large", patched(func(f []byte) { put32(f, mdBlockSize, 512*MiB) }), ErrCorrupt, "block size"},
		{"logical sector size 1024", patched(func(f []byte) { put32(f, mdLogicalSector, 1024) }), ErrCorrupt, "logical sector size"},
		{"physical sector size 0", patched(func(f []byte) { put32(f, mdLogicalSector+4, 0) }), ErrCorrupt, "physical sector size"},
		{"virtual size not a multiple of the sector", patched(func(f []byte) { put64(f, mdVirtualSize, 8*MiB+100) }), ErrCorrupt, "virtual disk size"},
		{"virtual size zero", patched(func(f []byte) { put64(f, mdVirtualSize, 0) }), ErrCorrupt, "virtual disk size"},
		{"virtual size above 64 TiB", patched(func(f []byte) { put64(f, mdVirtualSize, 1<<50) }), ErrCorrupt, "virtual disk size"},
		{"parent without a locator", dynamic(func(b *builder) { b.parent = true }), nil, ""}, // replaced below
		{"truncated BAT", dynamic(nil)[:bBATOff+4*KiB], ErrTruncated, "BAT region"},
		{"log GUID without a valid entry", dynamic(func(b *builder) { b.logGuid = NewGUID() }), ErrCorrupt, "no valid sequence"},
		{"log entry of another log GUID", dynamic(func(b *builder) {
			b.logGuid = NewGUID()
			b.log = []logSpec{{seq: 1, guid: NewGUID(), flushed: 5 * MiB, last: 5 * MiB, ops: []logOp{{off: bBATOff, data: make([]byte, logSector)}}}}
		}), ErrCorrupt, "no valid sequence"},
		{"log flushed past the end of the file", dynamic(func(b *builder) {
			b.logGuid = NewGUID()
			b.log = []logSpec{{seq: 1, flushed: 64 * MiB, last: 64 * MiB, ops: []logOp{{off: bBATOff, data: make([]byte, logSector)}}}}
		}), ErrTruncated, "flushed file offset"},
		{"log writes over a header", dynamic(func(b *builder) {
			b.logGuid = NewGUID()
			b.log = []logSpec{{seq: 1, flushed: 5 * MiB, last: 5 * MiB, ops: []logOp{{off: header1Off, data: make([]byte, logSector)}}}}
		}), ErrCorrupt, "headers"},
		{"log writes past its last file offset", dynamic(func(b *builder) {
			b.logGuid = NewGUID()
			b.log = []logSpec{{seq: 1, flushed: 5 * MiB, last: 5 * MiB, ops: []logOp{{off: 40 * MiB, zeroLen: MiB}}}}
		}), ErrCorrupt, "last offset"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file, want, field := tc.file, tc.want, tc.field
			switch tc.name {
			case "equal sequence numbers, different headers":
				put64(file, header1Off+16, 1) // a different FileWriteGuid
				fixHeader(file, header1Off)
				want, field = ErrCorrupt, "both headers have sequence number 5"
			case "parent without a locator":
				b := newBuilder(8*MiB, MiB)
				b.parent = true
				file = b.build()
				put32(file, bMetaOff+10, 5) // drop the locator item from the table
				want, field = ErrCorrupt, "no parent locator"
			}
			p := writeFile(t, file)
			before := fileSum(t, p)
			for _, writable := range []bool{false, true} {
				img, err := Open(p, writable)
				if err == nil {
					img.Close()
					t.Fatalf("Open(writable=%v) succeeded", writable)
				}
				if testing.Verbose() && !writable {
					t.Log(err)
				}
				if !errors.Is(err, want) {
					t.Errorf("Open(writable=%v) = %v, want it to wrap %v", writable, err, want)
				}
				if msg := err.Error(); !strings.Contains(msg, p) || !strings.Contains(msg, field) || strings.Count(msg, "\n") > 0 {
					t.Errorf("Open(writable=%v) = %q: want one line naming %s and %q", writable, msg, p, field)
				}
			}
			if fileSum(t, p) != before {
				t.Error("a failed open changed the file")
			}
		})
	}
}

// TestBadEntry: Open reads no BAT entry (the table is paged); a bad one fails the
// reads and writes that need its page, with an error naming the file and the entry
// that wraps ErrCorrupt, and Check reports it.
func TestBadEntry(t *testing.T) {
	for _, tc := range []struct {
		name  string
		file  []byte
		field string
		bits  bool // only what reads the sector bits fails (ReadAt reads the block)
	}{
		{"BAT entry past the end of the file", dynamic(func(b *builder) { b.rawBAT[1] = uint64(makeEntry(FullyPresent, 100*MiB)) }), "BAT entry 1 (block 1) points to 104857600+1048576, past the end of the file", false},
		{"BAT entry at 2^63", dynamic(func(b *builder) { b.rawBAT[1] = 1<<63 | uint64(FullyPresent) }), "BAT entry 1 (block 1) points to 9223372036854775808+1048576, past the end of the file", false},
		{"BAT entry at the largest offset", dynamic(func(b *builder) { b.rawBAT[1] = ^uint64(0)&^(1<<20-1) | uint64(FullyPresent) }), "points to 18446744073708503040+1048576, past the end of the file", false},
		{"sector bitmap entry at 2^63", dynamic(func(b *builder) {
			b.parent = true
			b.locator = []KeyValue{{"parent_linkage", "{x}"}}
			b.states[0] = PartiallyPresent
			b.bits[0] = []int64{0}
			b.rawBAT[b.geometry().chunkRatio] = 1<<63 | uint64(Present)
		}), "(sector bitmap) points to 9223372036854775808+1048576, past the end of the file", true},
		{"BAT entries overlap", dynamic(func(b *builder) { b.rawBAT[1] = uint64(makeEntry(FullyPresent, b.blockOffset(0))) }), "overlap", false},
		{"BAT entry over the metadata", dynamic(func(b *builder) { b.rawBAT[1] = uint64(makeEntry(FullyPresent, bMetaOff)) }), "overlapping the metadata region", false},
		{"BAT entry at offset 0", dynamic(func(b *builder) { b.rawBAT[1] = uint64(makeEntry(FullyPresent, 0)) }), "overlapping the header section", false},
		{"BAT entry state 4", dynamic(func(b *builder) { b.rawBAT[1] = 4 }), "invalid state 4", false},
		{"PARTIALLY_PRESENT without a parent", dynamic(func(b *builder) { b.states[0] = PartiallyPresent }), "PARTIALLY_PRESENT", false},
		{"PARTIALLY_PRESENT without a sector bitmap", dynamic(func(b *builder) {
			b.parent = true
			b.locator = []KeyValue{{"parent_linkage", "{x}"}}
			b.states[0] = PartiallyPresent
			b.rawBAT[b.geometry().chunkRatio] = 0
		}), "sector bitmap entry", false},
		{"truncated blocks", dynamic(nil)[:bBATOff+MiB+MiB/2], "past the end of the file", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeFile(t, tc.file)
			before := fileSum(t, p)
			oneLine := func(op string, err error) {
				t.Helper()
				if err == nil {
					t.Fatalf("%s succeeded", op)
				}
				if !errors.Is(err, ErrCorrupt) {
					t.Errorf("%s = %v, want it to wrap ErrCorrupt", op, err)
				}
				if msg := err.Error(); !strings.Contains(msg, p) || !strings.Contains(msg, tc.field) || strings.Contains(msg, "\n") || strings.Contains(msg, "-") {
					t.Errorf("%s = %q: want one line naming %s and %q, no negative number", op, msg, p, tc.field)
				}
			}
			for _, writable := range []bool{false, true} {
				img, err := Open(p, writable)
				if err != nil {
					t.Fatalf("Open(writable=%v) = %v; the entries are checked when read", writable, err)
				}
				if !tc.bits {
					_, err = img.ReadAt(make([]byte, img.Size()), 0)
					oneLine("ReadAt", err)
				}
				_, _, err = img.Run(0, img.Size())
				oneLine("Run", err)
				if writable {
					_, err = img.WriteAt(make([]byte, 512), MiB)
					oneLine("WriteAt", err)
				} else {
					found := false
					for _, pr := range img.Check() {
						found = found || pr.Severity == image.Error && strings.Contains(pr.Message, tc.field)
					}
					if !found {
						t.Errorf("Check does not say %q: %v", tc.field, img.Check())
					}
				}
				img.Close()
			}
			if fileSum(t, p) != before {
				t.Error("the file changed")
			}
		})
	}
}

// TestDamagedButReadable: one bad copy of a header or a region table, and unknown
// optional items, do not stop an open.
func TestDamagedButReadable(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(b *builder)
		pat  func(f []byte)
		slot int64
		note string // what Notes says of the copy used ("": nothing)
	}{
		{"newer header bad: the older is used", nil, func(f []byte) { f[header2Off+200]++ }, header1Off, fmt.Sprintf("header at %d is invalid", header2Off)},
		{"older header bad", nil, func(f []byte) { f[header1Off+200]++ }, header2Off, fmt.Sprintf("header at %d is invalid", header1Off)},
		{"first region table bad", nil, func(f []byte) { f[regionTable1Off+20]++ }, header2Off, fmt.Sprintf("region table at %d is invalid", regionTable1Off)},
		{"second region table bad", nil, func(f []byte) { f[regionTable2Off+20]++ }, header2Off, ""},
		{"unknown optional region and item, BAT and metadata not marked required (as qemu writes them)", func(b *builder) {
			b.extraRegions = []RegionEntry{{Guid: NewGUID(), FileOffset: uint64(b.blockOffset(5)), Length: MiB}}
			b.extraItems = []MetadataEntry{{ItemID: NewGUID(), Length: 8}, {ItemID: ItemFileParameters, Length: 3, Flags: itemIsUser}}
		}, func(f []byte) {
			put32(f, regionTable1Off+16+28, 0)
			put32(f, regionTable1Off+16+32+28, 0)
			put32(f, regionTable2Off+16+28, 0)
			put32(f, regionTable2Off+16+32+28, 0)
			fixRegionTables(f)
		}, header2Off, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBuilder(8*MiB, MiB)
			b.states[2] = FullyPresent
			b.data[2] = pattern(MiB, 5)
			if tc.edit != nil {
				tc.edit(b)
			}
			f := b.build()
			tc.pat(f)
			img, err := Open(writeFile(t, f), false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if img.headerSlot != tc.slot {
				t.Errorf("header at %d, want %d", img.headerSlot, tc.slot)
			}
			switch notes := img.Notes(); {
			case tc.note == "" && len(notes) != 0:
				t.Errorf("notes %q, want none", notes)
			case tc.note != "" && (len(notes) != 1 || !strings.Contains(notes[0], tc.note) || !strings.HasPrefix(notes[0], img.Name()+": ")):
				t.Errorf("notes %q, want one naming the file that says %q", notes, tc.note)
			}
			got := make([]byte, MiB)
			if _, err := img.ReadAt(got, 2*MiB); err != nil || string(got) != string(b.data[2]) {
				t.Errorf("block 2 reads wrong (%v)", err)
			}
		})
	}
}
