package vhdx

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/faults"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/imagelock"
	"github.com/vhdfs/vhdfs/internal/pagecache"
)

// File is what an Image needs of its backing file; *os.File implements it.
type File interface {
	io.ReaderAt
	io.WriterAt
	io.Closer
	Sync() error
	Stat() (os.FileInfo, error)
	Truncate(size int64) error
}

// DiskType is the kind of image, as the metadata says it.
type DiskType = image.Type

const (
	TypeFixed        = image.Fixed        // LeaveBlockAllocated, no parent
	TypeDynamic      = image.Dynamic      // no parent
	TypeDifferencing = image.Differencing // HasParent
)

// Image is one open VHDX file. ReadAt and Run may be called concurrently with each
// other and with WriteAt; WriteAt calls serialise on the image's lock.
type Image struct {
	name     string
	writable bool
	lock     *imagelock.Handle // nil for images not opened by Open
	dev, ino uint64            // identity of the file, for SameFile; zero unless opened by Open

	src        *source
	header     Header                   // the current one
	headerSlot int64                    // where the current header is: header1Off or header2Off
	regions    []RegionEntry            // changed by a Resize that moves the BAT, under mu
	meta       atomic.Pointer[Metadata] // replaced whole by SetParent; read without mu
	geo        geometry

	id         uint64       // names its bitmap slices and BAT pages in pagecache.Bitmaps
	batOff     int64        // where the BAT region starts; a Resize that moves it changes it under mu
	spans      []span       // the header section, the log and the regions, which no block may overlap; as batOff
	logEntries int          // entries of the log replayed at open
	grown      atomic.Int64 // the file's size as a read-only handle last saw it grow (see fileSize)
	hot        atomic.Pointer[hotPage]

	mu               sync.RWMutex // WriteAt holds it; ReadAt and Run read under it
	fileWriteGuidSet bool         // guarded by mu: a new FileWriteGuid is on disk (§2.2.2.1)
	dataWriteGuidSet bool         // guarded by mu: a new DataWriteGuid is on disk
	logSeq           uint64       // guarded by mu: the sequence number of the last log entry written
	failed           error        // guarded by mu: a metadata update that failed half way; no more writes
	noReserve        bool         // guarded by mu: see NoReservation
	notes            []string     // see Notes; set while opening
	salvage          bool         // opened by OpenSalvage: read-only, blocks past the end read as zeros
}

// Notes lists, one line each naming the file, the copies an open fell back to: a
// header or region table that is invalid, its other copy used (§2.2.2, §2.2.3).
func (img *Image) Notes() []string { return append([]string(nil), img.notes...) }

// Open opens the image at name, read-only unless writable, and locks it with qemu's
// protocol (package imagelock): a writable image is shared with readers only, a
// read-only one with other readers only. A conflict wraps ErrLocked. A read-only
// image whose log is not empty shows the replayed view and stays as it is; a
// writable one has its log replayed into the file.
func Open(name string, writable bool) (*Image, error) {
	return open(name, name, writable, false, false)
}

// OpenForceShare opens the image at name read-only without any lock, as qemu-img's
// -U (force-share) does: it can read an image another process writes, and may then
// see it torn.
func OpenForceShare(name string) (*Image, error) {
	return open(name, name, false, false, true)
}

// open opens path, called name in errors (see fileio.OpenImage). A path other than
// name is a /proc/self/fd link of Reopen: its log must already be empty for a
// writable open (see Reopen).
func open(path, name string, writable, joint, noLock bool) (*Image, error) {
	o, err := fileio.OpenImage(path, name, writable, joint, noLock, ErrNotVHDX)
	if err != nil {
		return nil, err
	}
	img, err := openFile(faults.Wrap(o.File), name, writable, path == name, false)
	if err != nil {
		o.Close()
		return nil, err
	}
	img.lock, img.dev, img.ino = o.Lock, o.Dev, o.Ino
	return img, nil
}

// Reopen opens the file img has open a second time, through its descriptor rather
// than its path, so it is the same file whatever was renamed since; writable for a
// merge. Its lock is joint with img's (a handle opened by OpenForceShare gets none
// for reading). The caller checks the ID if it matters. A writable reopen of an
// image whose log img replayed only in memory is refused: it would replay the log
// into the file under img, whose view of the metadata would then go stale; open the
// image writable first (vhdfs check --repair).
func (img *Image) Reopen(writable bool) (image.Image, error) {
	r, err := img.reopen(writable)
	if err != nil {
		return nil, err
	}
	return r, nil
}

func (img *Image) reopen(writable bool) (*Image, error) {
	f, ok := faults.OSFile(img.src.f)
	if !ok {
		return nil, fmt.Errorf("%s: reopen: not a plain file: %w", img.name, ErrInvalidArg)
	}
	if writable && img.src.ov != nil {
		return nil, fmt.Errorf("%s: reopen for writing: the log holds %d entries, replayed in memory only: %w", img.name, img.logEntries, ErrUnsupported)
	}
	// The new handle reads the file: what this one has pending goes there first.
	if err := img.Sync(); err != nil {
		return nil, err
	}
	r, err := open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), img.name, writable, true, img.lock == nil && !writable)
	if err != nil {
		return nil, err
	}
	if r.dev != img.dev || r.ino != img.ino {
		r.Close()
		return nil, fmt.Errorf("%s: reopen found another file: %w", img.name, ErrReplaced)
	}
	return r, nil
}

// SameFile reports an error unless path names the file img has open (the same
// device and inode), following symlinks.
func (img *Image) SameFile(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%s: no longer there: %w", path, err)
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || uint64(sys.Dev) != img.dev || sys.Ino != img.ino {
		return fmt.Errorf("%s: is no longer the file that was opened (it was moved or replaced): %w", path, ErrReplaced)
	}
	return nil
}

// FileID is the device and inode of the file the image has open.
func (img *Image) FileID() (dev, ino uint64) { return img.dev, img.ino }

// AllocatedBytes is the space of the FULLY_PRESENT and PARTIALLY_PRESENT blocks
// (scanBAT: what the table holds, read past its holes), of those it could read.
func (img *Image) AllocatedBytes() int64 {
	img.mu.RLock()
	defer img.mu.RUnlock()
	var n int64
	_ = img.scanBAT(func(i int64, e batEntry) bool {
		if s := e.state(); !img.geo.isBitmap(i) && (s == FullyPresent || s == PartiallyPresent) {
			n++
		}
		return true
	})
	return n * img.geo.blockSize
}

// OpenFile opens an image on f, named name in errors. It reads and checks the file
// identifier, both headers, the region table, the metadata and the BAT region (its
// entries are checked a page at a time as reads need them), after replaying a
// non-empty log in memory; it writes nothing unless writable and the log
// is not empty, and then replays the log into the file only once everything checked
// out. The image takes ownership of f on success.
func OpenFile(f File, name string, writable bool) (*Image, error) {
	return openFile(f, name, writable, true, false)
}

// openFile is OpenFile; unless replay, a writable open of a file whose log is not
// empty fails, wrapping ErrUnsupported, and writes nothing.
// A salvage open (never writable) reads blocks past the end of a truncated file as
// zeros instead of refusing them, and notes them.
func openFile(f File, name string, writable, replay, salvage bool) (*Image, error) {
	if salvage && writable {
		return nil, fmt.Errorf("%s: a salvage open is read-only: %w", name, ErrInvalidArg)
	}
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if !st.Mode().IsRegular() && st.Mode()&os.ModeType != 0 {
		return nil, fmt.Errorf("%s: is not a regular file (%v): %w", name, st.Mode().Type(), ErrNotVHDX)
	}
	size := st.Size()
	img := &Image{name: name, writable: writable, salvage: salvage, src: &source{f: f, vsize: size}, id: pagecache.NewImage()}
	id := make([]byte, 8)
	n, err := f.ReadAt(id, fileIDOff)
	if err != nil && err != io.EOF {
		return nil, fmt.Errorf("%s: read file identifier: %w", name, err)
	}
	if n < len(id) || !isFileID(id) {
		// Not the bytes themselves: a locator may point at any file (a secret).
		return nil, fmt.Errorf("%s: no \"vhdxfile\" file identifier at offset 0: %w", name, ErrNotVHDX)
	}
	if size < regionTable2Off+regionTableSize {
		return nil, fmt.Errorf("%s: file is %d bytes, shorter than the VHDX header section: %w", name, size, ErrTruncated)
	}
	if err := img.readHeaders(); err != nil {
		return nil, err
	}
	if err := img.checkLogPlace(size); err != nil {
		return nil, err
	}
	if !img.header.LogGuid.IsZero() {
		if err := img.readLog(size); err != nil {
			return nil, err
		}
	}
	if err := img.readRegions(); err != nil {
		return nil, err
	}
	if err := img.checkLogReach(size); err != nil {
		return nil, err
	}
	if salvage {
		if err := img.noteLostBlocks(); err != nil {
			return nil, err
		}
	}
	if writable && img.src.ov != nil {
		if !replay {
			return nil, fmt.Errorf("%s: log holds %d entries to replay, and this open must not replay them: %w", name, img.logEntries, ErrUnsupported)
		}
		if err := img.replayIntoFile(); err != nil {
			return nil, err
		}
	}
	return img, nil
}

// readHeaders reads both headers and keeps the current one: the valid one with the
// higher sequence number (§2.2.2). Two valid headers with the same number must be
// identical.
func (img *Image) readHeaders() error {
	var hs [2]*Header
	var errs [2]error
	var raw [2][]byte
	for i, off := range []int64{header1Off, header2Off} {
		raw[i] = make([]byte, headerSize)
		if _, err := img.src.f.ReadAt(raw[i], off); err != nil {
			return fmt.Errorf("%s: read header at %d: %w", img.name, off, err)
		}
		hs[i], errs[i] = parseHeader(raw[i], off)
	}
	switch {
	case hs[0] == nil && hs[1] == nil:
		return fmt.Errorf("%s: both headers are invalid: %w; %w", img.name, errs[0], errs[1])
	case hs[1] == nil || hs[0] != nil && hs[0].SequenceNumber > hs[1].SequenceNumber:
		img.header, img.headerSlot = *hs[0], header1Off
	case hs[0] == nil || hs[1].SequenceNumber > hs[0].SequenceNumber:
		img.header, img.headerSlot = *hs[1], header2Off
	case string(raw[0]) == string(raw[1]):
		img.header, img.headerSlot = *hs[0], header1Off
	default:
		return fmt.Errorf("%s: both headers have sequence number %d but differ: %w", img.name, hs[0].SequenceNumber, ErrCorrupt)
	}
	for i, off := range []int64{header1Off, header2Off} {
		if hs[i] == nil {
			img.notes = append(img.notes, fmt.Sprintf("%s: header at %d is invalid (%s); using the one at %d", img.name, off, strings.TrimPrefix(errs[i].Error(), img.name+": "), img.headerSlot))
		}
	}
	if img.header.LogVersion != 0 {
		return fmt.Errorf("%s: header log version is %d, want 0: %w", img.name, img.header.LogVersion, ErrUnsupported)
	}
	return nil
}

// checkLogPlace checks that the log region lies in the file, past the header section.
func (img *Image) checkLogPlace(size int64) error {
	h := img.header
	if h.LogLength == 0 && h.LogGuid.IsZero() {
		return nil
	}
	if h.LogOffset%MiB != 0 || h.LogOffset < headerSection || h.LogLength%MiB != 0 || h.LogLength == 0 {
		return fmt.Errorf("%s: log at %d, length %d, is not 1 MiB-aligned past the header section: %w", img.name, h.LogOffset, h.LogLength, ErrCorrupt)
	}
	if h.LogOffset > uint64(size) || int64(h.LogOffset)+int64(h.LogLength) > size {
		return fmt.Errorf("%s: log at %d, length %d, runs past the end of the file at %d: %w", img.name, h.LogOffset, h.LogLength, size, ErrTruncated)
	}
	return nil
}

// readRegions reads the region table (the first valid copy), then the metadata and
// the BAT it points at.
func (img *Image) readRegions() error {
	name := img.name
	var entries []RegionEntry
	var errs []error
	for _, off := range []int64{regionTable1Off, regionTable2Off} {
		b := make([]byte, regionTableSize)
		if err := img.src.readAt(b, off); err != nil {
			return fmt.Errorf("%s: read region table at %d: %w", name, off, err)
		}
		e, err := parseRegionTable(b, off)
		if err == nil {
			entries = e
			break
		}
		errs = append(errs, err)
	}
	if entries == nil && len(errs) == 2 {
		return fmt.Errorf("%s: both region tables are invalid: %w; %w", name, errs[0], errs[1])
	}
	if len(errs) == 1 {
		img.notes = append(img.notes, fmt.Sprintf("%s: region table at %d is invalid (%s); using the copy at %d", name, regionTable1Off, strings.TrimPrefix(errs[0].Error(), name+": "), regionTable2Off))
	}
	img.regions = entries
	meta := []span{{0, headerSection, "the header section"}}
	if img.header.LogLength > 0 {
		meta = append(meta, span{int64(img.header.LogOffset), int64(img.header.LogLength), "the log"})
	}
	var bat, md *RegionEntry
	for i := range entries {
		e := &entries[i]
		var what string
		switch e.Guid {
		case RegionBAT:
			what = "the BAT region"
			if bat != nil {
				return fmt.Errorf("%s: region table lists the BAT twice: %w", name, ErrCorrupt)
			}
			bat = e
		case RegionMetadata:
			what = "the metadata region"
			if md != nil {
				return fmt.Errorf("%s: region table lists the metadata region twice: %w", name, ErrCorrupt)
			}
			md = e
		default:
			if e.Required() {
				return fmt.Errorf("%s: region %d (%v) is required but not known: %w", name, i, e.Guid, ErrUnsupported)
			}
			what = fmt.Sprintf("region %d (%v)", i, e.Guid)
		}
		// qemu writes Required = 0 for the BAT and the metadata: not checked.
		off, n := int64(e.FileOffset), int64(e.Length)
		if e.FileOffset%MiB != 0 || e.FileOffset < headerSection || n%MiB != 0 || n == 0 {
			return fmt.Errorf("%s: %s at %d, length %d, is not 1 MiB-aligned past the header section: %w", name, what, e.FileOffset, n, ErrCorrupt)
		}
		if e.FileOffset > uint64(img.src.vsize) || off+n > img.src.vsize {
			return fmt.Errorf("%s: %s at %d, length %d, runs past the end of the file at %d: %w", name, what, off, n, img.src.vsize, ErrTruncated)
		}
		for _, m := range meta {
			if overlaps(off, n, m.off, m.len) {
				return fmt.Errorf("%s: %s at %d overlaps %s at %d: %w", name, what, off, m.name, m.off, ErrCorrupt)
			}
		}
		meta = append(meta, span{off, n, what})
	}
	if bat == nil || md == nil {
		return fmt.Errorf("%s: region table lacks the BAT or the metadata region: %w", name, ErrCorrupt)
	}
	m, err := img.readMetadata(int64(md.FileOffset), int64(md.Length))
	if err != nil {
		return err
	}
	img.meta.Store(m)
	img.geo = newGeometry(int64(m.VirtualDiskSize), int64(m.BlockSize), int64(m.LogicalSectorSize), m.HasParent)
	return img.checkBATRegion(int64(bat.FileOffset), int64(bat.Length), meta)
}

// updateHeader writes the current header, changed by edit and with the next sequence
// number, over the other header, and makes it durable (§2.2.2.1): the old one stays
// whole until the new one is.
func (img *Image) updateHeader(edit func(*Header)) error {
	h := img.header
	edit(&h)
	h.SequenceNumber++
	slot := int64(header1Off)
	if img.headerSlot == header1Off {
		slot = header2Off
	}
	if _, err := img.src.f.WriteAt(h.Marshal(), slot); err != nil {
		return fmt.Errorf("%s: write header at %d: %w", img.name, slot, err)
	}
	if err := img.src.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	img.header, img.headerSlot = h, slot
	return nil
}

// Name is the path the image was opened with, or the one SetName gave it.
func (img *Image) Name() string { return img.name }

// SetName changes the name errors and problems give the image (after a rename).
// Call it before the image is shared between goroutines.
func (img *Image) SetName(name string) { img.name = name }

// Format is "vhdx".
func (img *Image) Format() string { return "vhdx" }

// SectorSize is the logical sector size: the unit of WriteAt and of the bitmaps.
func (img *Image) SectorSize() int64 { return img.geo.sectorSize }

// Size is the virtual disk size in bytes.
func (img *Image) Size() int64 { return img.geo.size }

// BlockSize is the payload block size.
func (img *Image) BlockSize() int64 { return img.geo.blockSize }

// LogicalSectorSize is 512 or 4096: the unit of the sector bitmaps.
func (img *Image) LogicalSectorSize() int64 { return img.geo.sectorSize }

// PhysicalSectorSize is 512 or 4096.
func (img *Image) PhysicalSectorSize() int64 { return int64(img.meta.Load().PhysicalSectorSize) }

// HasParent reports whether the image is a differencing image.
func (img *Image) HasParent() bool { return img.meta.Load().HasParent }

// Type is fixed, dynamic or differencing, from the file parameters.
func (img *Image) Type() DiskType {
	switch {
	case img.meta.Load().HasParent:
		return TypeDifferencing
	case img.meta.Load().LeaveBlockAllocated:
		return TypeFixed
	}
	return TypeDynamic
}

// DataWriteGuid is the current header's DataWriteGuid: what a child's
// parent_linkage must name. The first write changes it.
func (img *Image) DataWriteGuid() GUID { return img.Header().DataWriteGuid }

// FileWriteGuid is the current header's FileWriteGuid.
func (img *Image) FileWriteGuid() GUID { return img.Header().FileWriteGuid }

// VirtualDiskID is the page 83 data; children copy it, so it identifies no file.
func (img *Image) VirtualDiskID() GUID { return img.meta.Load().Page83Data }

// Header returns a copy of the current header.
func (img *Image) Header() Header {
	img.mu.RLock()
	defer img.mu.RUnlock()
	return img.header
}

// Metadata returns a copy of the known metadata items.
func (img *Image) Metadata() Metadata {
	m := *img.meta.Load()
	m.ParentLocator = append([]KeyValue(nil), m.ParentLocator...)
	return m
}

// ParentLocator returns the parent locator's key/value pairs; nil without a locator.
func (img *Image) ParentLocator() map[string]string {
	if img.meta.Load().ParentLocator == nil {
		return nil
	}
	m := make(map[string]string, len(img.meta.Load().ParentLocator))
	for _, kv := range img.meta.Load().ParentLocator {
		m[kv.Key] = kv.Value
	}
	return m
}

// LogReplayed is the number of log entries replayed at open: in memory for a
// read-only image, into the file for a writable one.
func (img *Image) LogReplayed() int { return img.logEntries }

// LogPending reports whether the file holds log entries this read-only handle
// replayed in memory only (image.LogHolder).
func (img *Image) LogPending() bool { return img.src.ov != nil }

var _ image.LogHolder = (*Image)(nil)

// Writable reports whether the image was opened for writing.
func (img *Image) Writable() bool { return img.writable }

// Sync makes every write before it durable: the metadata changes that wait
// (commitLocked) go through the log, then the file is flushed.
func (img *Image) Sync() error {
	if !img.writable {
		return nil
	}
	img.mu.Lock()
	err := img.flushPendingLocked()
	img.mu.Unlock()
	if err != nil {
		return err
	}
	if err := img.src.f.Sync(); err != nil {
		return fmt.Errorf("%s: fsync: %w", img.name, err)
	}
	return nil
}

// Close closes the file and releases its lock.
func (img *Image) Close() error {
	err := img.Sync()
	if cerr := img.src.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("%s: close: %w", img.name, cerr)
	}
	img.lock.Release()
	pagecache.Bitmaps.Drop(img.id)
	return err
}
