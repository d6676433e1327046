package vhd

import (
	"encoding/binary"
	"syscall"

	"github.com/vhdfs/vhdfs/internal/faults"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/imagelock"
	"github.com/vhdfs/vhdfs/internal/pagecache"

	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
)

// File is what an Image needs of its backing file; *os.File implements it. Tests pass
// a File that fails after a number of writes to prove the write order crash-safe.
type File interface {
	io.ReaderAt
	io.WriterAt
	io.Closer
	Sync() error
	Stat() (os.FileInfo, error)
	Truncate(size int64) error
}

// FooterState says where the footer an image was opened with came from.
type FooterState int

const (
	FooterAtEnd    FooterState = iota // the last 512 bytes
	FooterShort                       // the last 511 bytes (before Virtual PC 2004)
	FooterCopyOnly                    // only the copy at offset 0 is valid
)

func (s FooterState) String() string {
	return [...]string{"footer at the end", "511-byte footer", "footer copy at offset 0 only"}[s]
}

const unallocated = ^uint32(0)

// Image is one open VHD file. ReadAt and Run may be called concurrently with each
// other and with WriteAt; WriteAt and Sync serialise on the image's lock.
type Image struct {
	f         File
	name      string
	writable  bool
	lock      *imagelock.Handle // nil for images not opened by Open
	dev, ino  uint64            // identity of the file, for SameFile
	noReserve bool              // set before the first write: see NoReservation
	salvage   bool              // opened by OpenSalvage: read-only, damage read around
	notes     []string          // see Notes; set while opening

	footer      Footer
	footerState FooterState // guarded by mu once open: an allocation ends a 511-byte footer
	footerErr   error       // why the end footer was not used, when it was not
	copyFooter  *Footer
	header      *Header // nil for fixed images

	size       int64
	blockSize  int64
	bitmapSize int64
	metaEnd    int64    // end of header, BAT and locators
	meta       []region // footer copy, header, BAT and locator data

	id uint64 // names its pages in bitmapCache, which holds those clean on disk

	mu         sync.RWMutex
	bat        batTable                 // guarded by mu
	dirtyBAT   map[uint32]bool          // guarded by mu: entries not yet written to disk
	dirty      map[pagecache.Key][]byte // guarded by mu: bitmap pages not yet written to disk
	dirtyBytes int64                    // guarded by mu: the bytes of dirty
	footerOff  int64                    // guarded by mu: where the end footer is; new blocks go here
}

// maxDirtyBlocks bounds the BAT entries kept in memory between syncs.
const maxDirtyBlocks = 4096

// Open opens the image at name, read-only unless writable, and locks it with qemu's
// protocol (package imagelock): a writable image is shared with readers only, a
// read-only one with other readers only. A conflict wraps ErrLocked.
func Open(name string, writable bool) (*Image, error) {
	return open(name, name, writable, false, false)
}

// OpenForceShare opens the image at name read-only without any lock, as qemu-img's
// -U (force-share) does: it can read an image another process writes, and may then
// see it torn.
func OpenForceShare(name string) (*Image, error) {
	return open(name, name, false, false, true)
}

// open opens path, called name in errors (see fileio.OpenImage).
func open(path, name string, writable, joint, noLock bool) (*Image, error) {
	o, err := fileio.OpenImage(path, name, writable, joint, noLock, ErrNotVHD)
	if err != nil {
		return nil, err
	}
	var file File = o.File
	if faults.Armed() {
		file = faults.File{File: o.File}
	}
	img, err := openFile(file, name, writable, false)
	if err != nil {
		o.Close()
		return nil, err
	}
	img.lock, img.dev, img.ino = o.Lock, o.Dev, o.Ino
	return img, nil
}

// ReopenImage opens the file img has open a second time, by its descriptor rather than
// its path, so it is the same file whatever was renamed since; writable for a merge.
// Its lock is joint with img's. The caller checks the unique ID if it matters.
func (img *Image) ReopenImage(writable bool) (*Image, error) {
	f, ok := osFile(img.f)
	if !ok {
		return nil, fmt.Errorf("%s: reopen: %w", img.name, ErrInvalidArg)
	}
	r, err := open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), img.name, writable, true, img.lock == nil && !writable)
	if err != nil {
		return nil, err
	}
	if r.dev != img.dev || r.ino != img.ino {
		r.Close()
		return nil, fmt.Errorf("%s: reopen found another file: %w", img.name, ErrInvalidArg)
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
	dev, ino := fileID(st)
	if dev != img.dev || ino != img.ino {
		return fmt.Errorf("%s: is no longer the file that was opened (it was moved or replaced): %w", path, ErrReplaced)
	}
	return nil
}

// FileID is the device and inode of the file the image has open.
func (img *Image) FileID() (dev, ino uint64) { return img.dev, img.ino }

func fileID(st os.FileInfo) (dev, ino uint64) {
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		return uint64(sys.Dev), sys.Ino
	}
	return 0, 0
}

// OpenFile opens an image on f. It reads and validates the footer, the dynamic header
// and the BAT, and writes nothing. The image takes ownership of f.
func OpenFile(f File, name string, writable bool) (*Image, error) {
	return openFile(f, name, writable, false)
}

// openFile is OpenFile; salvage (never with writable) reads around damage instead of
// refusing it, as OpenSalvage says.
func openFile(f File, name string, writable, salvage bool) (*Image, error) {
	if salvage && writable {
		return nil, fmt.Errorf("%s: a salvage open is read-only: %w", name, ErrInvalidArg)
	}
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if st.IsDir() {
		return nil, fmt.Errorf("%s: is a directory: %w", name, ErrNotVHD)
	}
	if !st.Mode().IsRegular() && st.Mode()&os.ModeType != 0 {
		return nil, fmt.Errorf("%s: is not a regular file (%v): %w", name, st.Mode().Type(), ErrNotVHD)
	}
	img := &Image{f: f, name: name, writable: writable, salvage: salvage}
	if err := img.readFooter(st.Size()); err != nil {
		return nil, err
	}
	if salvage {
		// What lies past the data (the footer, or nothing) reads as zeros.
		img.f = &salvageFile{File: f, end: img.footerOff}
	}
	img.size = int64(img.footer.CurrentSize)
	if img.footer.DiskType == TypeFixed {
		if salvage && uint64(img.footerOff) < img.footer.CurrentSize && img.footer.CurrentSize <= maxDynamicSize {
			img.note("%s: fixed image holds %d data bytes but its footer says %d: disk bytes %d-%d read as zeros", name, img.footerOff, img.footer.CurrentSize, img.footerOff, img.footer.CurrentSize-1)
		} else if uint64(img.footerOff) < img.footer.CurrentSize { // also a size past MaxInt64
			return nil, fmt.Errorf("%s: fixed image holds %d data bytes but its footer says %d: %w", name, img.footerOff, img.footer.CurrentSize, ErrTruncated)
		}
		return img, nil
	}
	if writable && img.footerState == FooterCopyOnly {
		return nil, fmt.Errorf("%s: footer at the end is damaged (%v); open read-only or run 'vhdfs check --repair': %w", name, img.footerErr, ErrReadOnly)
	}
	if err := img.readHeader(); err != nil {
		return nil, err
	}
	if err := img.readBAT(); err != nil {
		return nil, err
	}
	img.id = pagecache.NewImage()
	img.dirtyBAT = map[uint32]bool{}
	img.dirty = map[pagecache.Key][]byte{}
	return img, nil
}

func (img *Image) readFooter(fileSize int64) error {
	name := img.name
	if fileSize < FooterSize-1 {
		return fmt.Errorf("%s: file is %d bytes, shorter than a VHD footer: %w", name, fileSize, ErrTruncated)
	}
	buf := make([]byte, FooterSize)
	var endErr error
	if fileSize >= FooterSize {
		if _, err := img.f.ReadAt(buf, fileSize-FooterSize); err != nil {
			return fmt.Errorf("%s: read footer at %d: %w", name, fileSize-FooterSize, err)
		}
		f, err := parseFooter(buf, name, fmt.Sprintf("footer at %d", fileSize-FooterSize))
		if err == nil {
			img.footer, img.footerOff, img.footerState = *f, fileSize-FooterSize, FooterAtEnd
		}
		endErr = err
	}
	if endErr != nil && fileSize%SectorSize == SectorSize-1 {
		short := make([]byte, FooterSize)
		if _, err := img.f.ReadAt(short[:FooterSize-1], fileSize-(FooterSize-1)); err != nil {
			return fmt.Errorf("%s: read footer at %d: %w", name, fileSize-(FooterSize-1), err)
		}
		if f, err := parseFooter(short, name, "511-byte footer"); err == nil {
			img.footer, img.footerOff, img.footerState, endErr = *f, fileSize-(FooterSize-1), FooterShort, nil
		}
	}
	// The copy at offset 0 of dynamic and differencing images. It is read even when
	// the file is too short for a header, so a truncated image says so (below, in
	// readHeader) instead of reporting the header's cookie as a bad footer.
	if fileSize >= FooterSize {
		cb := make([]byte, FooterSize)
		if _, err := img.f.ReadAt(cb, 0); err == nil {
			if f, err := parseFooter(cb, name, "footer copy at 0"); err == nil && f.DiskType != TypeFixed {
				img.copyFooter = f
			}
		}
	}
	if endErr != nil {
		if img.copyFooter == nil {
			if img.salvage {
				return img.salvageFixed(fileSize, endErr)
			}
			return endErr
		}
		img.footer, img.footerState, img.footerErr = *img.copyFooter, FooterCopyOnly, endErr
		img.footerOff = fileSize
		img.note("%s: footer at the end is damaged (%s); using the copy at offset 0", name, strings.TrimPrefix(endErr.Error(), name+": "))
	}
	return img.footer.validate(name)
}

func (img *Image) readHeader() error {
	name, off := img.name, int64(img.footer.DataOffset)
	if img.footer.DataOffset > uint64(img.footerOff) || off+HeaderSize > img.footerOff {
		return fmt.Errorf("%s: dynamic header at %d runs past the footer at %d: %w", name, img.footer.DataOffset, img.footerOff, ErrTruncated)
	}
	buf := make([]byte, HeaderSize)
	if _, err := img.f.ReadAt(buf, off); err != nil {
		return fmt.Errorf("%s: read dynamic header at %d: %w", name, off, err)
	}
	h, err := parseHeader(buf, name, off)
	if err != nil {
		return err
	}
	img.header = h
	img.blockSize = int64(h.BlockSize)
	img.bitmapSize = bitmapBytes(h.BlockSize)

	need := (img.size + img.blockSize - 1) / img.blockSize
	if int64(h.MaxTableEntries) < need {
		return fmt.Errorf("%s: dynamic header max table entries %d cannot cover %d bytes in %d-byte blocks (need %d): %w", name, h.MaxTableEntries, img.size, img.blockSize, need, ErrCorrupt)
	}
	batOff, batLen := int64(h.TableOffset), roundUp(int64(h.MaxTableEntries)*4, SectorSize)
	if h.TableOffset%SectorSize != 0 {
		return fmt.Errorf("%s: BAT offset %d is not sector-aligned: %w", name, h.TableOffset, ErrCorrupt)
	}
	if h.TableOffset > uint64(img.footerOff) || batOff+int64(h.MaxTableEntries)*4 > img.footerOff {
		return fmt.Errorf("%s: BAT at %d with %d entries runs past the footer at %d: %w", name, h.TableOffset, h.MaxTableEntries, img.footerOff, ErrTruncated)
	}
	if overlaps(batOff, batLen, 0, FooterSize) || overlaps(batOff, batLen, off, HeaderSize) {
		return fmt.Errorf("%s: BAT at %d overlaps the footer copy or the dynamic header: %w", name, batOff, ErrCorrupt)
	}
	img.metaEnd = max(off+HeaderSize, batOff+batLen)
	img.meta = []region{{0, FooterSize, "the footer copy"}, {off, HeaderSize, "the dynamic header"}, {batOff, batLen, "the BAT"}}
	if img.footer.DiskType != TypeDifferencing {
		return nil
	}
	if h.ParentUniqueID.IsZero() {
		return fmt.Errorf("%s: differencing header has a zero parent unique ID: %w", name, ErrCorrupt)
	}
	for i, l := range h.ParentLocators {
		if !knownPlatform(l.PlatformCode) {
			return fmt.Errorf("%s: parent locator %d has unknown platform code %#08x: %w", name, i, l.PlatformCode, ErrCorrupt)
		}
		if l.PlatformCode == PlatformNone || l.PlatformDataLength == 0 {
			continue
		}
		lo, ln := int64(l.PlatformDataOffset), int64(l.PlatformDataLength)
		if ln > maxLocatorBytes {
			return fmt.Errorf("%s: parent locator %d (%s) data length %d exceeds %d: %w", name, i, PlatformName(l.PlatformCode), ln, maxLocatorBytes, ErrCorrupt)
		}
		if lo < FooterSize || lo+ln > img.footerOff {
			return fmt.Errorf("%s: parent locator %d (%s) data at %d+%d lies outside the file: %w", name, i, PlatformName(l.PlatformCode), l.PlatformDataOffset, ln, ErrCorrupt)
		}
		if overlaps(lo, ln, off, HeaderSize) || overlaps(lo, ln, batOff, batLen) {
			return fmt.Errorf("%s: parent locator %d (%s) data at %d overlaps the header or the BAT: %w", name, i, PlatformName(l.PlatformCode), lo, ErrCorrupt)
		}
		end := lo + ln
		if sp, ok := l.SpaceBytes(); ok && lo+sp > end && lo+sp <= img.footerOff {
			end = lo + sp
		}
		img.metaEnd = max(img.metaEnd, end)
		img.meta = append(img.meta, region{lo, ln, fmt.Sprintf("parent locator %d", i)})
	}
	return nil
}

func (img *Image) readBAT() error {
	h := img.header
	img.bat = newBAT(int(h.MaxTableEntries))
	type extent struct {
		start int64
		idx   int
	}
	var used []extent
	blockLen := img.bitmapSize + img.blockSize
	// Read in pieces: a 2 TiB image has a 4 MiB table, mostly unallocated.
	buf := make([]byte, 64<<10)
	for base := 0; base < img.bat.len(); base += len(buf) / 4 {
		n := min(len(buf)/4, img.bat.len()-base)
		off := int64(h.TableOffset) + int64(base)*4
		if _, err := img.f.ReadAt(buf[:4*n], off); err != nil {
			return fmt.Errorf("%s: read BAT at %d: %w", img.name, off, err)
		}
		for k := 0; k < n; k++ {
			e := binary.BigEndian.Uint32(buf[4*k:])
			if e == unallocated {
				continue
			}
			i := base + k
			img.bat.set(int64(i), e)
			start := int64(e) * SectorSize
			if start+blockLen > img.footerOff && img.salvage {
				img.lostBlock(i, start+img.bitmapSize, img.footerOff)
			} else if start+blockLen > img.footerOff {
				return fmt.Errorf("%s: BAT entry %d points to %d, past the end of the data at %d: %w", img.name, i, start, img.footerOff, ErrCorrupt)
			}
			for _, m := range img.meta {
				if overlaps(start, blockLen, m.off, m.len) {
					return fmt.Errorf("%s: BAT entry %d points to %d, overlapping %s at %d: %w", img.name, i, start, m.name, m.off, ErrCorrupt)
				}
			}
			used = append(used, extent{start, i})
		}
	}
	sort.Slice(used, func(a, b int) bool { return used[a].start < used[b].start })
	for k := 1; k < len(used); k++ {
		if used[k].start < used[k-1].start+blockLen {
			return fmt.Errorf("%s: BAT entries %d and %d overlap at %d: %w", img.name, used[k-1].idx, used[k].idx, used[k].start, ErrCorrupt)
		}
	}
	return nil
}

// region is a range of the file that holds metadata.
type region struct {
	off, len int64
	name     string
}

func overlaps(a, alen, b, blen int64) bool { return a < b+blen && b < a+alen }

func roundUp(n, m int64) int64 { return (n + m - 1) / m * m }

// SetName changes the name errors give for the image (after a rename); call it
// before the image is shared.
func (img *Image) SetName(name string) { img.name = name }

// Name is the path the image was opened with.
func (img *Image) Name() string { return img.name }

// Size is the virtual disk size in bytes (the footer's Current Size).
func (img *Image) Size() int64 { return img.size }

// Type is the disk type.
func (img *Image) Type() DiskType { return img.footer.DiskType }

// Footer returns a copy of the footer in use.
func (img *Image) Footer() Footer {
	img.mu.RLock() // SetUniqueID changes it
	defer img.mu.RUnlock()
	return img.footer
}

// Header returns a copy of the dynamic header; ok is false for fixed images.
func (img *Image) Header() (h Header, ok bool) {
	if img.header == nil {
		return Header{}, false
	}
	img.mu.RLock() // SetParent rewrites it
	defer img.mu.RUnlock()
	return *img.header, true
}

// FooterState says where the footer came from; FooterErr why the end one was not used.
func (img *Image) FooterState() (FooterState, error) {
	img.mu.RLock()
	defer img.mu.RUnlock()
	return img.footerState, img.footerErr
}

// BlockSize is the block size of a dynamic or differencing image, 0 for fixed.
func (img *Image) BlockSize() int64 { return img.blockSize }

// Writable reports whether the image was opened for writing.
func (img *Image) Writable() bool { return img.writable }

// AllocatedBytes is the data space of the allocated blocks (the size for fixed images).
func (img *Image) AllocatedBytes() int64 {
	if img.header == nil {
		return img.size
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	var n int64
	for range img.bat.allocated() {
		n++
	}
	return n * img.blockSize
}

// Close writes pending metadata of a writable image and closes the file.
func (img *Image) Close() error {
	var err error
	if img.writable {
		err = img.Sync()
	}
	if img.header != nil {
		bitmapCache.Drop(img.id)
	}
	if cerr := img.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("%s: close: %w", img.name, cerr)
	}
	img.lock.Release()
	return err
}

// StartWriteback asks the kernel to begin writing the file's dirty pages without
// waiting for them, so that a later Sync of a long sequence of writes (a merge) has
// less left to do. A no-op for files that are not *os.File.
func (img *Image) StartWriteback() {
	if f, ok := osFile(img.f); ok {
		fileio.StartWriteback(f)
	}
}
