package vhd

import (
	"encoding/binary"
	"fmt"
	"path"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// Platform codes of parent locators.
const (
	PlatformNone uint32 = 0
	PlatformWi2r uint32 = 0x57693272 // deprecated
	PlatformWi2k uint32 = 0x5769326B // deprecated
	PlatformW2ru uint32 = 0x57327275 // relative Windows path, UTF-16LE
	PlatformW2ku uint32 = 0x57326B75 // absolute Windows path, UTF-16LE
	PlatformMac  uint32 = 0x4D616320 // Mac OS alias blob
	PlatformMacX uint32 = 0x4D616358 // file:// URL, UTF-8
)

// maxLocatorBytes bounds the locator data we read: a path, never more.
const maxLocatorBytes = 64 << 10

// PlatformName is the four-character code of a platform.
func PlatformName(code uint32) string {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], code)
	return printable(b[:])
}

func knownPlatform(code uint32) bool {
	switch code {
	case PlatformNone, PlatformWi2r, PlatformWi2k, PlatformW2ru, PlatformW2ku, PlatformMac, PlatformMacX:
		return true
	}
	return false
}

// SpaceBytes is the locator's reserved data space in bytes. The specification says
// sectors, but Windows, Virtual PC and blktap store bytes; like blktap, a value below
// 512 is taken as sectors and a multiple of 512 as bytes. ok is false otherwise.
func (l Locator) SpaceBytes() (n int64, ok bool) {
	switch {
	case l.PlatformDataSpace < SectorSize:
		return int64(l.PlatformDataSpace) * SectorSize, true
	case l.PlatformDataSpace%SectorSize == 0:
		return int64(l.PlatformDataSpace), true
	}
	return 0, false
}

// ParentLocation is one place a differencing image says its parent is.
type ParentLocation struct {
	Source string // "W2ru", "W2ku", "MacX" or "name"
	Path   string // as decoded, with Windows separators where the source had them
}

// decodeUTF16 decodes UTF-16 in the given byte order, stopping at a NUL.
// Unpaired surrogates become U+FFFD rather than failing.
func decodeUTF16(b []byte, order binary.ByteOrder) string {
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		c := order.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

func encodeUTF16(s string, order binary.ByteOrder) []byte {
	u := utf16.Encode([]rune(s))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		order.PutUint16(b[2*i:], c)
	}
	return b
}

// ParentName is the header's Parent Unicode Name (UTF-16BE).
func (h *Header) ParentName() string {
	return decodeUTF16(h.ParentUnicodeName[:], binary.BigEndian)
}

// decodeLocator turns locator data into a location; ok is false for codes that do not
// name a path we can use.
func decodeLocator(code uint32, data []byte) (ParentLocation, bool) {
	switch code {
	case PlatformW2ru, PlatformW2ku:
		return ParentLocation{Source: PlatformName(code), Path: decodeUTF16(data, binary.LittleEndian)}, true
	case PlatformMacX:
		s := strings.TrimRight(string(data), "\x00")
		if !utf8.ValidString(s) {
			return ParentLocation{}, false
		}
		return ParentLocation{Source: "MacX", Path: s}, true
	}
	return ParentLocation{}, false
}

// WindowsToSlash turns a Windows path into a slash path: separators become '/', a
// drive letter is dropped, and a leading ".\" stays as "./".
func WindowsToSlash(p string) string {
	p = strings.ReplaceAll(p, `\`, "/")
	if len(p) >= 2 && p[1] == ':' && (p[0]|0x20) >= 'a' && (p[0]|0x20) <= 'z' {
		p = p[2:]
	}
	return p
}

// MacXToPath turns a MacX file URL into a clean path ("file://./p.vhd" → "p.vhd").
func MacXToPath(u string) string {
	u = strings.TrimPrefix(u, "file://")
	return path.Clean(strings.ReplaceAll(u, "%20", " "))
}

// ParentLocations reads the parent locators of a differencing image, in the order a
// parent should be searched: W2ru, W2ku, MacX, then the header's parent name.
func (img *Image) ParentLocations() ([]ParentLocation, error) {
	// Only a differencing image has a parent, and only its locators were validated.
	if img.header == nil || img.footer.DiskType != TypeDifferencing {
		return nil, nil
	}
	h, _ := img.Header()
	byCode := map[uint32]ParentLocation{}
	for i, l := range h.ParentLocators {
		if l.PlatformCode == PlatformNone || l.PlatformDataLength == 0 {
			continue
		}
		if _, seen := byCode[l.PlatformCode]; seen {
			continue
		}
		buf := make([]byte, l.PlatformDataLength)
		if _, err := img.f.ReadAt(buf, int64(l.PlatformDataOffset)); err != nil {
			return nil, fmt.Errorf("%s: read parent locator %d (%s) at %d: %w", img.name, i, PlatformName(l.PlatformCode), l.PlatformDataOffset, err)
		}
		if loc, ok := decodeLocator(l.PlatformCode, buf); ok && loc.Path != "" {
			byCode[l.PlatformCode] = loc
		}
	}
	var out []ParentLocation
	for _, c := range []uint32{PlatformW2ru, PlatformW2ku, PlatformMacX} {
		if loc, ok := byCode[c]; ok {
			out = append(out, loc)
		}
	}
	if n := h.ParentName(); n != "" {
		out = append(out, ParentLocation{Source: "name", Path: n})
	}
	return out, nil
}

// LocatorPath is the path parent locator slot i holds, decoded ("" for codes that
// hold no path, or when it cannot be read).
func (img *Image) LocatorPath(i int) string {
	h, ok := img.Header()
	if !ok || i < 0 || i >= len(h.ParentLocators) || img.footer.DiskType != TypeDifferencing {
		return ""
	}
	l := h.ParentLocators[i]
	if l.PlatformDataLength == 0 || l.PlatformDataLength > maxLocatorBytes {
		return ""
	}
	buf := make([]byte, l.PlatformDataLength)
	if _, err := img.f.ReadAt(buf, int64(l.PlatformDataOffset)); err != nil {
		return ""
	}
	loc, _ := decodeLocator(l.PlatformCode, buf)
	return loc.Path
}
