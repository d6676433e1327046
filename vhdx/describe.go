package vhdx

import (
	"encoding/binary"
	"fmt"
	"strings"
	"unicode/utf16"

	"github.com/vhdfs/vhdfs/image"
)

// creatorLen is the size of the file identifier's Creator field (§2.2.1), UTF-16LE,
// at byte 8.
const creatorLen = 512

// Creator is the file identifier's Creator string: what made the file ("QEMU v…",
// "Microsoft Windows 10…"). Empty if it cannot be read.
func (img *Image) Creator() string {
	b := make([]byte, creatorLen)
	if _, err := img.src.f.ReadAt(b, fileIDOff+8); err != nil {
		return ""
	}
	u := make([]uint16, 0, creatorLen/2)
	for i := 0; i < creatorLen; i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return strings.TrimSpace(string(utf16.Decode(u)))
}

// Describe says what the file records: its creator, the parent locator's entries in
// the file's order, and the VHDX fields no other format has.
func (img *Image) Describe() image.Description {
	d := image.Description{Creator: img.Creator()}
	for i, kv := range img.meta.Load().ParentLocator {
		d.Locators = append(d.Locators, image.Locator{Slot: i, Platform: kv.Key, Path: kv.Value})
	}
	h := img.Header()
	d.Fields = [][2]string{
		{"logical sector size", fmt.Sprint(img.geo.sectorSize)},
		{"physical sector size", fmt.Sprint(img.meta.Load().PhysicalSectorSize)},
		{"block size", fmt.Sprint(img.geo.blockSize)},
		{"data write GUID", h.DataWriteGuid.String()},
		{"file write GUID", h.FileWriteGuid.String()},
		{"virtual disk ID", img.meta.Load().Page83Data.String()},
		{"log entries replayed", fmt.Sprint(img.logEntries)},
	}
	return d
}
