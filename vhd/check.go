package vhd

import (
	"bytes"
	"fmt"
	"os"
	"path"
	"syscall"
	"time"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/imagelock"
)

// Severity and Problem are the image package's.
type (
	Severity = image.Severity
	Problem  = image.Problem
)

const (
	Note    = image.Note
	Warning = image.Warning
	Error   = image.Error
)

// maxPerEntry bounds the findings Check names entry by entry (a crafted table of
// millions of entries would otherwise give millions of lines); the rest are counted
// in one line.
const maxPerEntry = 20

// Check verifies the invariants of an open image beyond those Open enforces (Open
// already refuses bad cookies and checksums, a truncated file, a bad block size, a
// table too small for the size, BAT entries past the end or overlapping metadata or
// each other, and bad parent locators).
func (img *Image) Check() []Problem {
	var out []Problem
	add := func(s Severity, format string, args ...any) {
		out = append(out, Problem{Severity: s, File: img.name, Message: fmt.Sprintf(format, args...)})
	}
	f := &img.footer
	img.mu.RLock()
	state := img.footerState // a writer's first allocation changes FooterShort
	img.mu.RUnlock()
	switch state {
	case FooterCopyOnly:
		add(Error, "footer at the end is damaged (%v); the copy at offset 0 is good: run 'vhdfs check --repair'", img.footerErr)
	case FooterShort:
		add(Note, "the footer is 511 bytes long, as images made before Virtual PC 2004 have it; harmless")
	}
	if f.Features&featureReserved == 0 {
		add(Note, "the footer's features field (%#08x) lacks the bit 0x2 the format requires: XenServer and XCP-ng (blktap) refuse such an image; other tools read it", f.Features)
	}
	// Byte 85 is blktap's "hidden" flag, 0 or 1; the rest must be zero.
	if f.Reserved[0] > 1 || !fileio.AllZero(f.Reserved[1:]) {
		add(Note, "the footer's unused bytes 85-511 are not zero: XenServer and XCP-ng (blktap) refuse such an image; other tools read it")
	}
	now := Timestamp(time.Now())
	if f.Timestamp > now+timestampSlack {
		add(Note, "the image's creation time, %s, lies in the future (the clock where it was made was wrong): XenServer and XCP-ng (blktap) refuse such an image; other tools read it", Time(f.Timestamp).Format(time.RFC3339))
	}
	if chsPacked(f.Geometry) > chsPacked(CHS(img.size)) {
		what := fmt.Sprintf("the disk geometry %d/%d/%d is larger than the size needs", f.Geometry.Cylinders, f.Geometry.Heads, f.Geometry.Sectors)
		if f.Geometry == MaxGeometry {
			what = "the disk geometry is 65535/16/255, the mark of an exact size that qemu and Azure write"
		}
		add(Note, "%s: XenServer and XCP-ng (blktap) call that geometry too large and refuse the image; other tools read it", what)
	}
	if f.Features&^uint32(0x3) != 0 {
		add(Warning, "the footer's features field (%#08x) has bits this version of vhdfs does not know: the image may use something it does not understand", f.Features)
	}
	if f.SavedState > 1 {
		add(Error, "footer saved state is %d, want 0 or 1", f.SavedState)
	} else if f.SavedState == 1 {
		add(Warning, "footer saved state is set: the disk belongs to a saved virtual machine")
	}
	if f.UniqueID.IsZero() {
		add(Warning, "footer unique ID is zero: a differencing image on this one cannot tell it from another")
	}
	if g := CHS(img.size); f.Geometry != g && f.Geometry != MaxGeometry {
		add(Note, "the disk geometry %d/%d/%d is not the %d/%d/%d computed for the size, as some tools write it; harmless", f.Geometry.Cylinders, f.Geometry.Heads, f.Geometry.Sectors, g.Cylinders, g.Heads, g.Sectors)
	}
	if f.Geometry.Bytes() != img.size && f.Geometry != MaxGeometry {
		add(Note, "geometry describes %d bytes but the current size is %d: tools that size disks by geometry (Virtual PC, older qemu) see a different disk", f.Geometry.Bytes(), img.size)
	}
	if img.header == nil {
		return out
	}
	if img.copyFooter == nil {
		add(Error, "footer copy at offset 0 is missing or damaged")
	} else if state != FooterCopyOnly && !bytes.Equal(img.copyFooter.Marshal(), f.Marshal()) {
		if c := *img.copyFooter; resizedCopy(c, *f) {
			add(Warning, "footer copy at offset 0 records size %d, the footer at the end %d: a resize was interrupted; 'vhdfs resize' to either size rewrites it", c.CurrentSize, f.CurrentSize)
		} else {
			add(Error, "footer copy at offset 0 differs from the footer at the end")
		}
	}
	h := img.header
	if h.DataOffset != noDataOffset {
		add(Note, "the dynamic header's unused data offset is %#x, not all ones as the format says: readers ignore it", h.DataOffset)
	}
	if h.Reserved1 != 0 || !fileio.AllZero(h.Reserved2[:]) {
		add(Note, "the dynamic header's unused fields are not zero: XenServer and XCP-ng (blktap) refuse such an image; other tools read it")
	}
	if img.blockSize > DefaultBlockSize {
		add(Note, "block size %d is above 2 MiB: blktap (XCP-ng, XenServer) cannot open it", img.blockSize)
	}
	need := (img.size + img.blockSize - 1) / img.blockSize
	if int64(h.MaxTableEntries) != need {
		add(Note, "the block table has %d entries where the size needs %d; harmless", h.MaxTableEntries, need)
	}
	if img.blockSize != DefaultBlockSize && img.blockSize != 512<<10 && img.blockSize <= DefaultBlockSize {
		add(Note, "block size %d: Windows makes only 2 MiB and 512 KiB blocks, though it reads others", img.blockSize)
	}
	img.mu.RLock()
	dataEnd, blocks := img.metaEnd, false
	past := 0
	for i, e := range img.bat.allocated() {
		blocks = true
		if int64(i) >= need {
			if past++; past <= maxPerEntry {
				add(Warning, "BAT entry %d is allocated but lies past the disk size", i)
			}
		}
		dataEnd = max(dataEnd, int64(e)*SectorSize+img.bitmapSize+img.blockSize)
	}
	if past > maxPerEntry {
		add(Warning, "%d more BAT entries are allocated past the disk size", past-maxPerEntry)
	}
	footerOff := img.footerOff
	img.mu.RUnlock()
	batBytes := int64(h.MaxTableEntries) * 4
	if pad := roundUp(batBytes, SectorSize) - batBytes; pad > 0 {
		buf := make([]byte, pad)
		if _, err := img.f.ReadAt(buf, int64(h.TableOffset)+batBytes); err == nil && !bytes.Equal(buf, bytes.Repeat([]byte{0xff}, int(pad))) {
			add(Note, "the unused end of the block table, after entry %d, is not 0xFFFFFFFF as the format says: readers ignore it", h.MaxTableEntries)
		}
	}
	// Without blocks, the space before the footer is room for parent locators.
	if state == FooterAtEnd && blocks && footerOff > roundUp(dataEnd, SectorSize)+dataAlign {
		add(Note, "%d bytes between the last block and the footer belong to no block (left by an interrupted write); 'vhdfs compact' gives them back", footerOff-dataEnd)
	}
	if img.footer.DiskType == TypeDifferencing {
		seen := map[uint32]bool{}
		for i, l := range h.ParentLocators {
			if l.PlatformCode == PlatformNone {
				if l != (Locator{}) {
					add(Note, "parent locator %d is unused but not cleared: readers ignore it", i)
				}
				continue
			}
			if seen[l.PlatformCode] {
				add(Warning, "parent locator %d repeats platform code %s", i, PlatformName(l.PlatformCode))
			}
			seen[l.PlatformCode] = true
			sp, ok := l.SpaceBytes()
			if !ok || int64(l.PlatformDataLength) > sp {
				add(Warning, "parent locator %d (%s) data length %d exceeds its data space %d", i, PlatformName(l.PlatformCode), l.PlatformDataLength, l.PlatformDataSpace)
			}
			if l.PlatformDataOffset == 0 || l.PlatformDataSpace == 0 || l.PlatformDataLength == 0 {
				add(Note, "parent locator %d (%s) has a zero data offset, space or length: XenServer and XCP-ng (blktap) refuse such an image; other tools read it", i, PlatformName(l.PlatformCode))
			}
			if ok && int64(l.PlatformDataOffset)+sp > footerOff {
				add(Warning, "parent locator %d (%s) claims space at %d+%d, past the footer at %d; XenServer and XCP-ng (blktap) refuse such an image", i, PlatformName(l.PlatformCode), l.PlatformDataOffset, sp, footerOff)
			}
			if l.Reserved != 0 {
				add(Note, "parent locator %d (%s) has an unused field that is not zero: XenServer and XCP-ng (blktap) refuse such an image; other tools read it", i, PlatformName(l.PlatformCode))
			}
		}
		if !seen[PlatformW2ru] && !seen[PlatformW2ku] && !seen[PlatformMacX] {
			add(Warning, "no W2ru, W2ku or MacX parent locator: only the parent name can find the parent")
		}
		img.checkLocatorNames(add)
	} else if !h.ParentUniqueID.IsZero() || h.ParentTimestamp != 0 || !fileio.AllZero(h.ParentUnicodeName[:]) || h.ParentLocators != [8]Locator{} {
		add(Note, "the image has no parent but its header's parent fields are set (perhaps left by a merge): XenServer and XCP-ng (blktap) refuse such an image; other tools read it")
	}
	img.checkBlocksAfterHeaders(add)
	if img.footer.DiskType == TypeDynamic {
		img.checkClearBits(add)
	}
	return out
}

// RepairFooter restores a damaged footer at the end of a dynamic or differencing image
// from the copy at offset 0, and changes nothing else. The footer goes right after the
// last block or metadata; a damaged tail past it is cut off. It reports whether it
// wrote anything. The image must not be open elsewhere.
func RepairFooter(name string) (bool, error) {
	f, err := os.OpenFile(name, os.O_RDWR|syscall.O_NONBLOCK|syscall.O_NOCTTY, 0)
	if err != nil {
		return false, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		return false, fmt.Errorf("%s: not a regular file: %w", name, ErrNotVHD)
	}
	if err := fileio.RefuseWriteProtected(name, st); err != nil {
		return false, err
	}
	lock, err := imagelock.Acquire(f, name, imagelock.Writer)
	if err != nil {
		return false, err
	}
	defer lock.Release()
	img, err := open(name, name, false, true, false)
	if err != nil {
		return false, err
	}
	state := img.footerState
	dataEnd := img.metaEnd
	for _, e := range img.bat.allocated() {
		dataEnd = max(dataEnd, int64(e)*SectorSize+img.bitmapSize+img.blockSize)
	}
	foot := img.footer
	img.Close()
	if state != FooterCopyOnly {
		return false, nil
	}
	end := roundUp(dataEnd, SectorSize)
	if _, err := f.WriteAt(foot.Marshal(), end); err != nil {
		return false, fmt.Errorf("%s: write footer at %d: %w", name, end, err)
	}
	if err := f.Sync(); err != nil {
		return false, fmt.Errorf("%s: fsync: %w", name, err)
	}
	if err := f.Truncate(end + FooterSize); err != nil {
		return false, fmt.Errorf("%s: truncate to %d: %w", name, end+FooterSize, err)
	}
	if err := f.Sync(); err != nil {
		return false, fmt.Errorf("%s: fsync: %w", name, err)
	}
	return true, nil
}

// timestampSlack is how far in the future blktap lets a time stamp lie (NFS clocks).
const timestampSlack = 1800

// chsPacked is the geometry as blktap compares it: C<<16 | H<<8 | S.
func chsPacked(g Geometry) uint32 {
	return uint32(g.Cylinders)<<16 | uint32(g.Heads)<<8 | uint32(g.Sectors)
}

// checkLocatorNames compares the file name each path locator names with the
// header's parent name, as blktap's vhd-util check does. blktap compares with the
// whole name, which for Windows-made images is a full path: that is a note.
func (img *Image) checkLocatorNames(add func(Severity, string, ...any)) {
	h, _ := img.Header()
	name := h.ParentName()
	base := path.Base(WindowsToSlash(name))
	if name != base {
		add(Note, "the parent name \"%s\" is a full path, as Windows writes it: XenServer and XCP-ng (blktap) refuse such an image; other tools find the parent", name)
	}
	locs, err := img.ParentLocations()
	if err != nil {
		add(Warning, "%v", err)
		return
	}
	for _, l := range locs {
		if l.Source == "name" {
			continue
		}
		p := WindowsToSlash(l.Path)
		if l.Source == "MacX" {
			p = MacXToPath(l.Path)
		}
		if b := path.Base(p); b != base {
			add(Warning, "the %s parent locator names %q but the header's parent name is %q: the image disagrees with itself about its parent, and XenServer and XCP-ng (blktap) refuse it", l.Source, b, base)
		}
	}
}

// checkBlocksAfterHeaders reports data blocks that start before the end of the
// metadata as blktap computes it: the header, the BAT and every parent locator's
// whole data space. blktap's vhd-util check rejects such an image ("block N clobbers
// headers"); old vhdfs re-links put locators past the blocks like this.
func (img *Image) checkBlocksAfterHeaders(add func(Severity, string, ...any)) {
	h, _ := img.Header()
	eoh := max(int64(img.footer.DataOffset)+HeaderSize, int64(h.TableOffset)+roundUp(int64(h.MaxTableEntries)*4, SectorSize))
	if img.footer.DiskType == TypeDifferencing {
		for _, l := range h.ParentLocators {
			if l.PlatformCode == PlatformNone {
				continue
			}
			sp, ok := l.SpaceBytes()
			if !ok {
				sp = int64(l.PlatformDataLength)
			}
			eoh = max(eoh, int64(l.PlatformDataOffset)+sp)
		}
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	for i, e := range img.bat.allocated() {
		if off := int64(e) * SectorSize; off < eoh {
			add(Warning, "block %d at %d lies inside the space of the header, block table and parent locators, which ends at %d; XenServer and XCP-ng (blktap) refuse such an image", i, off, eoh)
			return
		}
	}
}

// checkClearBits reports data in the sectors of a dynamic image's blocks whose
// bitmap bit is clear. The specification says they are zero; vhdfs and qemu return
// what the block holds, blktap and libvhdi return zeros, so the readers disagree.
func (img *Image) checkClearBits(add func(Severity, string, ...any)) {
	img.mu.RLock()
	type blk struct {
		i int
		e uint32
	}
	var blocks []blk
	for i, e := range img.bat.allocated() {
		blocks = append(blocks, blk{i, e})
	}
	img.mu.RUnlock()
	bm := make([]byte, img.bitmapSize)
	sec := make([]byte, 64<<10)
	for _, b := range blocks {
		off := int64(b.e) * SectorSize
		if _, err := img.f.ReadAt(bm, off); err != nil {
			add(Error, "read bitmap of block %d at %d: %v", b.i, off, err)
			return
		}
		spb := img.blockSize / SectorSize
		for s := int64(0); s < spb; {
			if bm[s/8]&(0x80>>(s%8)) != 0 {
				s++
				continue
			}
			e := s
			for e < spb && bm[e/8]&(0x80>>(e%8)) == 0 && (e-s)*SectorSize < int64(len(sec)) {
				e++
			}
			p := sec[:(e-s)*SectorSize]
			if _, err := img.f.ReadAt(p, off+img.bitmapSize+s*SectorSize); err != nil {
				add(Error, "read block %d at %d: %v", b.i, off, err)
				return
			}
			if !fileio.AllZero(p) {
				add(Warning, "block %d has data in sectors its bitmap marks unwritten: vhdfs and qemu read that data, XenServer (blktap) and libvhdi read zeros, so the tools see different disks", b.i)
				break
			}
			s = e
		}
	}
}
