package test

import (
	"encoding/binary"
	"os"
	"testing"
	"unicode/utf16"
)

// Offsets of the VHD fields the tests patch, from the specification ("Hard Disk
// Footer Format", "Dynamic Disk Header Format"). The tests read and patch raw bytes
// instead of going through package vhd, so a misreading there cannot hide here.
const (
	footerLen         = 512
	headerLen         = 1024
	footerCookieOff   = 0
	footerDataOffOff  = 16
	footerTimeOff     = 24
	footerCreatorOff  = 28
	footerCurSizeOff  = 48
	footerTypeOff     = 60
	footerChecksumOff = 64
	footerUniqueIDOff = 68

	headerCookieOff     = 0
	headerTableOffOff   = 16
	headerMaxEntriesOff = 28
	headerBlockSizeOff  = 32
	headerChecksumOff   = 36
	headerParentIDOff   = 40
	headerParentNameOff = 64
	headerParentNameLen = 512
	headerLocatorsOff   = 576
	locatorLen          = 24

	platformW2ru = 0x57327275
	platformW2ku = 0x57326B75
	platformMacX = 0x4D616358
)

// vhdChecksum is the ones' complement of the byte sum of b with the 4-byte checksum
// field at sumOff taken as zero.
func vhdChecksum(b []byte, sumOff int) uint32 {
	var sum uint32
	for i, c := range b {
		if i < sumOff || i >= sumOff+4 {
			sum += uint32(c)
		}
	}
	return ^sum
}

// readAt reads n bytes of a file at off.
func readAt(t testing.TB, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("read %d bytes of %s at %d: %v", n, path, off, err)
	}
	return b
}

// patchAt writes b into a file at off.
func patchAt(t testing.TB, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatalf("patch %s at %d: %v", path, off, err)
	}
}

func patchU32(t testing.TB, path string, off int64, v uint32) {
	t.Helper()
	patchAt(t, path, off, binary.BigEndian.AppendUint32(nil, v))
}

// fixFooterChecksum recomputes the checksum of the footer at off.
func fixFooterChecksum(t testing.TB, path string, off int64) {
	t.Helper()
	patchU32(t, path, off+footerChecksumOff, vhdChecksum(readAt(t, path, off, footerLen), footerChecksumOff))
}

// fixHeaderChecksum recomputes the checksum of the dynamic header at off.
func fixHeaderChecksum(t testing.TB, path string, off int64) {
	t.Helper()
	patchU32(t, path, off+headerChecksumOff, vhdChecksum(readAt(t, path, off, headerLen), headerChecksumOff))
}

// patchFooters patches both footers of an image (the copy at 0 of a dynamic or
// differencing image too) at field offset off, and recomputes their checksums
// unless keepSum.
func patchFooters(t testing.TB, path string, off int64, b []byte, keepSum bool) {
	t.Helper()
	l := readLayout(t, path)
	places := []int64{l.FooterOff}
	if l.Dynamic {
		places = append(places, 0)
	}
	for _, p := range places {
		patchAt(t, path, p+off, b)
		if !keepSum {
			fixFooterChecksum(t, path, p)
		}
	}
}

// patchHeader patches the dynamic header at field offset off and recomputes its
// checksum unless keepSum.
func patchHeader(t testing.TB, path string, off int64, b []byte, keepSum bool) {
	t.Helper()
	l := readLayout(t, path)
	if !l.Dynamic {
		t.Fatalf("%s has no dynamic header", path)
	}
	patchAt(t, path, l.HeaderOff+off, b)
	if !keepSum {
		fixHeaderChecksum(t, path, l.HeaderOff)
	}
}

// locator is a parent locator entry as stored.
type locator struct {
	Code, Space, Length uint32
	Offset              uint64
}

// layout is where an image keeps its structures, read from its bytes.
type layout struct {
	FileSize   int64
	FooterOff  int64 // of the footer at the end (a 512-byte footer)
	Dynamic    bool  // dynamic or differencing: has a header, BAT and a footer copy at 0
	Size       int64 // the footer's current size
	UniqueID   [16]byte
	HeaderOff  int64
	TableOff   int64
	MaxEntries uint32
	BlockSize  uint32
	BAT        []uint32
	ParentID   [16]byte
	Locators   [8]locator
}

// readLayout parses the footer at the end and, for dynamic and differencing images,
// the header, the BAT and the locator entries.
func readLayout(t testing.TB, path string) layout {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	l := layout{FileSize: st.Size(), FooterOff: st.Size() - footerLen}
	foot := readAt(t, path, l.FooterOff, footerLen)
	if string(foot[:8]) != "conectix" {
		t.Fatalf("%s: no footer at %d", path, l.FooterOff)
	}
	l.Size = int64(binary.BigEndian.Uint64(foot[footerCurSizeOff:]))
	copy(l.UniqueID[:], foot[footerUniqueIDOff:])
	if binary.BigEndian.Uint32(foot[footerTypeOff:]) == 2 {
		return l
	}
	l.Dynamic = true
	l.HeaderOff = int64(binary.BigEndian.Uint64(foot[footerDataOffOff:]))
	h := readAt(t, path, l.HeaderOff, headerLen)
	l.TableOff = int64(binary.BigEndian.Uint64(h[headerTableOffOff:]))
	l.MaxEntries = binary.BigEndian.Uint32(h[headerMaxEntriesOff:])
	l.BlockSize = binary.BigEndian.Uint32(h[headerBlockSizeOff:])
	copy(l.ParentID[:], h[headerParentIDOff:])
	for i := range l.Locators {
		e := h[headerLocatorsOff+locatorLen*i:]
		l.Locators[i] = locator{
			Code:   binary.BigEndian.Uint32(e[0:]),
			Space:  binary.BigEndian.Uint32(e[4:]),
			Length: binary.BigEndian.Uint32(e[8:]),
			Offset: binary.BigEndian.Uint64(e[16:]),
		}
	}
	bat := readAt(t, path, l.TableOff, int(l.MaxEntries)*4)
	for i := range l.MaxEntries {
		l.BAT = append(l.BAT, binary.BigEndian.Uint32(bat[4*i:]))
	}
	return l
}

// allocated returns the indexes of the allocated BAT entries.
func (l layout) allocated() []int {
	var out []int
	for i, e := range l.BAT {
		if e != 0xffffffff {
			out = append(out, i)
		}
	}
	return out
}

// locatorIndex is the slot of the locator with the platform code, or -1.
func (l layout) locatorIndex(code uint32) int {
	for i, loc := range l.Locators {
		if loc.Code == code {
			return i
		}
	}
	return -1
}

// patchBAT sets BAT entry i.
func patchBAT(t testing.TB, path string, i int, v uint32) {
	t.Helper()
	l := readLayout(t, path)
	patchU32(t, path, l.TableOff+4*int64(i), v)
}

// patchLocator rewrites locator entry slot of the dynamic header (checksum fixed).
func patchLocator(t testing.TB, path string, slot int, loc locator) {
	t.Helper()
	e := make([]byte, locatorLen)
	binary.BigEndian.PutUint32(e[0:], loc.Code)
	binary.BigEndian.PutUint32(e[4:], loc.Space)
	binary.BigEndian.PutUint32(e[8:], loc.Length)
	binary.BigEndian.PutUint64(e[16:], loc.Offset)
	patchHeader(t, path, int64(headerLocatorsOff+locatorLen*slot), e, false)
}

// patchParentName sets the header's Parent Unicode Name (UTF-16BE, NUL padded).
func patchParentName(t testing.TB, path, name string) {
	t.Helper()
	b := make([]byte, headerParentNameLen)
	for i, c := range utf16.Encode([]rune(name)) {
		binary.BigEndian.PutUint16(b[2*i:], c)
	}
	patchHeader(t, path, headerParentNameOff, b, false)
}

// utf16le encodes s as UTF-16LE without a BOM or NUL, as W2ru and W2ku locators hold it.
func utf16le(s string) []byte {
	var b []byte
	for _, c := range utf16.Encode([]rune(s)) {
		b = binary.LittleEndian.AppendUint16(b, c)
	}
	return b
}

// truncateFile cuts a file to size.
func truncateFile(t testing.TB, path string, size int64) {
	t.Helper()
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
}
