package vhd

import (
	"encoding/binary"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/vhdfs/vhdfs/internal/fileio"
)

// locatorSpace is the data space each parent locator gets when vhdfs creates a
// differencing image, as Windows gives its W2ku locator; as much again stays free
// behind them, so that a re-link (SetParent) writes its new locators into space no
// header points at before one header write switches to them.
const locatorSpace = 4096

// locatorData is one parent locator to be written: its slot, code and data.
type locatorData struct {
	slot int
	code uint32
	data []byte
}

// parentFields points h at the parent with unique ID parentID at parentPath: the
// parent's base name (what blktap, VirtualBox and XCP-ng write, what blktap's check
// and Xen Orchestra compare with), a time stamp of 0 (what Windows writes; the parent
// file's mtime changes with every write through a mount and no reader enforces it),
// and no locators yet: it returns the W2ru (".\name.vhd", UTF-16LE) and MacX
// ("file://./name.vhd", UTF-8) locators, both relative to childPath, as blktap writes
// them, so that a chain moved together resolves. No W2ku: that holds an absolute
// Windows path, and none can be formed from a Linux one.
func parentFields(h *Header, parentID UUID, parentPath, childPath string) ([]locatorData, error) {
	rel, parentAbs, err := fileio.ParentPaths(parentPath, childPath)
	if err != nil {
		return nil, err
	}
	base := filepath.Base(parentAbs)
	name := encodeUTF16(base, binary.BigEndian)
	if len(name) > len(h.ParentUnicodeName) {
		return nil, fmt.Errorf("parent file name %q is too long for the header: %w", base, ErrInvalidArg)
	}
	locs := []locatorData{
		{0, PlatformW2ru, encodeUTF16(strings.ReplaceAll(rel, "/", `\`), binary.LittleEndian)},
		{1, PlatformMacX, []byte("file://" + rel)},
	}
	for _, l := range locs {
		if len(l.data) > maxLocatorBytes {
			return nil, fmt.Errorf("parent path %q is too long for a locator: %w", rel, ErrInvalidArg)
		}
	}
	h.ParentUniqueID = parentID
	h.ParentTimestamp = 0
	h.ParentUnicodeName = [512]byte{}
	copy(h.ParentUnicodeName[:], name)
	h.ParentLocators = [8]Locator{}
	return locs, nil
}

// reserveLocators places locs from offset end for a new image: each in a data space of
// locatorSpace bytes (more for a longer path), then as much room again, left free for
// a re-link. It fills in h's locator entries and returns the data by slot and the new
// end.
func reserveLocators(h *Header, locs []locatorData, end int64) (map[int][]byte, int64) {
	data := map[int][]byte{}
	var total int64
	for _, l := range locs {
		space := max(locatorSpace, roundUp(int64(len(l.data)), SectorSize))
		h.ParentLocators[l.slot] = Locator{
			PlatformCode:       l.code,
			PlatformDataSpace:  uint32(space), // in bytes, as Windows and blktap write it
			PlatformDataLength: uint32(len(l.data)),
			PlatformDataOffset: uint64(end + total),
		}
		data[l.slot] = l.data
		total += space
	}
	return data, end + 2*total
}

// span is a range of the file [off, off+len).
type span struct{ off, len int64 }

// freeLocatorRoomLocked lists the sector-aligned ranges before the first data block
// (or the footer, if there is none) that no metadata uses: not the footer copy, the
// header, the BAT, a blktap batmap, nor the bytes the current parent locators hold.
// The caller holds mu.
func (img *Image) freeLocatorRoomLocked() []span {
	limit := img.footerOff
	for _, e := range img.bat.allocated() {
		limit = min(limit, int64(e)*SectorSize)
	}
	h := img.header
	busy := []span{{0, FooterSize}, {int64(img.footer.DataOffset), HeaderSize}}
	batEnd := int64(h.TableOffset) + roundUp(int64(h.MaxTableEntries)*4, SectorSize)
	busy = append(busy, span{int64(h.TableOffset), batEnd - int64(h.TableOffset)})
	if string(img.footer.CreatorApp[:3]) == "tap" {
		// blktap keeps a batmap header in the sector after the BAT and its map
		// wherever that header says.
		busy = append(busy, span{batEnd, SectorSize})
		b := make([]byte, 24)
		if _, err := img.f.ReadAt(b, batEnd); err == nil && string(b[:8]) == "tdbatmap" {
			busy = append(busy, span{int64(binary.BigEndian.Uint64(b[8:])), int64(binary.BigEndian.Uint32(b[16:])) * SectorSize})
		}
	}
	for _, l := range h.ParentLocators {
		if l.PlatformCode != PlatformNone {
			busy = append(busy, span{int64(l.PlatformDataOffset), roundUp(int64(l.PlatformDataLength), SectorSize)})
		}
	}
	free := []span{{FooterSize, limit - FooterSize}}
	for _, b := range busy {
		var next []span
		for _, f := range free {
			if !overlaps(f.off, f.len, b.off, b.len) {
				next = append(next, f)
				continue
			}
			if b.off > f.off {
				next = append(next, span{f.off, b.off - f.off})
			}
			if e := b.off + b.len; e < f.off+f.len {
				next = append(next, span{e, f.off + f.len - e})
			}
		}
		free = next
	}
	return free
}

// placeLocators puts each of locs first-fit into free, sector-aligned, filling in
// h's entries with a data space of the data's length rounded up to a sector. ok is
// false if one does not fit.
func placeLocators(h *Header, locs []locatorData, free []span) (ok bool) {
	free = append([]span(nil), free...)
	for _, l := range locs {
		need := roundUp(int64(len(l.data)), SectorSize)
		placed := false
		for i, f := range free {
			off := roundUp(f.off, SectorSize)
			if f.off+f.len-off < need {
				continue
			}
			h.ParentLocators[l.slot] = Locator{
				PlatformCode:       l.code,
				PlatformDataSpace:  uint32(need),
				PlatformDataLength: uint32(len(l.data)),
				PlatformDataOffset: uint64(off),
			}
			free[i] = span{off + need, f.off + f.len - off - need}
			placed = true
			break
		}
		if !placed {
			return false
		}
	}
	return true
}
