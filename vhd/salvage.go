package vhd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"strings"

	"github.com/vhdfs/vhdfs/internal/fileio"
)

// OpenSalvage opens the image at name read-only (with the usual read lock, none if
// noLock) and reads as much of a damaged file as its structures allow instead of
// refusing it: a fixed image whose footer is damaged reads as its data, sized by the
// file; blocks a truncated dynamic or differencing image has lost read as zeros.
// Notes says what was done. A file with no VHD footer at all is still ErrNotVHD (see
// OpenSalvageRaw). An image opened so is never written.
func OpenSalvage(name string, noLock bool) (*Image, error) {
	o, err := fileio.OpenImage(name, name, false, false, noLock, ErrNotVHD)
	if err != nil {
		return nil, err
	}
	img, err := openFile(o.File, name, false, true)
	if err != nil {
		o.Close()
		return nil, err
	}
	img.lock, img.dev, img.ino = o.Lock, o.Dev, o.Ino
	return img, nil
}

// OpenSalvageRaw opens the file at name as the data of a fixed VHD whose footer is
// gone: the whole file, whose size must be a positive multiple of 512. It is the
// last resort of a salvage open, for a file no format claims.
func OpenSalvageRaw(name string, noLock bool) (*Image, error) {
	o, err := fileio.OpenImage(name, name, false, false, noLock, ErrNotVHD)
	if err != nil {
		return nil, err
	}
	st, err := o.File.Stat()
	if err != nil {
		o.Close()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	size := st.Size()
	if size <= 0 || size%SectorSize != 0 {
		o.Close()
		return nil, fmt.Errorf("%s: %d bytes, not whole sectors of fixed data: %w", name, size, ErrNotVHD)
	}
	img := &Image{name: name, salvage: true, size: size, footerOff: size}
	img.footer = salvageFooter(size)
	img.f = &salvageFile{File: o.File, end: size}
	img.lock, img.dev, img.ino = o.Lock, o.Dev, o.Ino
	img.note("%s: no VHD footer; read as fixed data, %d bytes (the whole file)", name, size)
	return img, nil
}

// Notes lists, one line each, what the open did that a sound image would not need:
// a footer read from its copy, a damaged footer passed over, blocks lost to a
// truncation.
func (img *Image) Notes() []string { return append([]string(nil), img.notes...) }

func (img *Image) note(format string, args ...any) {
	img.notes = append(img.notes, fmt.Sprintf(format, args...))
}

// salvageFooter is the footer a fixed image of size bytes would have, for an image
// whose own is lost; its unique ID is zero.
func salvageFooter(size int64) Footer {
	return Footer{Cookie: footerCookie, Features: 2, FormatVersion: formatVersion, DataOffset: ^uint64(0),
		OriginalSize: uint64(size), CurrentSize: uint64(size), Geometry: CHS(size), DiskType: TypeFixed}
}

// footerShaped reports whether the 512 bytes b look like a fixed image's footer that
// is damaged: at least two of its constant fields (cookie with at most one byte off,
// format version, the all-ones data offset, disk type fixed) are as a footer has them.
func footerShaped(b []byte) bool {
	var f Footer
	if binary.Read(bytes.NewReader(b[:FooterSize]), binary.BigEndian, &f) != nil {
		return false
	}
	signs := 0
	diff := 0
	for i := range f.Cookie {
		if f.Cookie[i] != footerCookie[i] {
			diff++
		}
	}
	if diff <= 1 {
		signs++
	}
	if f.FormatVersion == formatVersion {
		signs++
	}
	if f.DataOffset == ^uint64(0) {
		signs++
	}
	if f.DiskType == TypeFixed {
		signs++
	}
	return signs >= 2
}

// salvageFixed makes img a fixed image of the file's data when its end footer
// (endErr) is damaged and no copy stands in: the file minus the footer-shaped
// trailer. It returns endErr when the trailer is not footer-shaped.
func (img *Image) salvageFixed(fileSize int64, endErr error) error {
	if fileSize < FooterSize+SectorSize || fileSize%SectorSize != 0 {
		return endErr
	}
	buf := make([]byte, FooterSize)
	if _, err := img.f.ReadAt(buf, fileSize-FooterSize); err != nil || !footerShaped(buf) {
		return endErr
	}
	size := fileSize - FooterSize
	img.footer, img.footerOff, img.footerState, img.footerErr = salvageFooter(size), size, FooterAtEnd, endErr
	img.note("%s: fixed-image footer at %d is damaged (%s); read as fixed data, %d bytes (the file less the footer)", img.name, size, strings.TrimPrefix(endErr.Error(), img.name+": "), size)
	return nil
}

// salvageFile is an image's file as a salvage open reads it: bytes at or past end
// (where the file stops holding data) read as zeros, so that what a truncation lost
// reads as zeros. It never writes.
type salvageFile struct {
	File
	end int64
}

func (f *salvageFile) ReadAt(p []byte, off int64) (int, error) {
	n := len(p)
	if off+int64(n) > f.end {
		keep := max(f.end-off, 0)
		clear(p[keep:])
		p = p[:keep]
	}
	if len(p) > 0 {
		if k, err := f.File.ReadAt(p, off); err != nil && !(err == io.EOF && k == len(p)) {
			if err != io.EOF {
				return k, err
			}
			clear(p[k:])
		}
	}
	return n, nil
}

func (f *salvageFile) WriteAt(p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("write at %d of an image opened for salvage: %w", off, ErrReadOnly)
}

func (f *salvageFile) Truncate(int64) error {
	return fmt.Errorf("truncate an image opened for salvage: %w", ErrReadOnly)
}

// lostBlock notes block i, whose data starts at dataStart in the file, as running
// past the end of the data at end: wholly or from a disk offset on.
func (img *Image) lostBlock(i int, dataStart, end int64) {
	lo, hi := int64(i)*img.blockSize, min(int64(i+1)*img.blockSize, img.size)
	if lo >= img.size {
		img.note("%s: BAT entry %d (beyond the disk size) points past the end of the file at %d; ignored", img.name, i, end)
		return
	}
	if dataStart >= end {
		img.note("%s: block %d (disk bytes %d-%d) lies past the end of the file at %d: reads as zeros", img.name, i, lo, hi-1, end)
		return
	}
	from := lo + (end - dataStart)
	if from < hi {
		img.note("%s: block %d is cut by the end of the file at %d: disk bytes %d-%d read as zeros", img.name, i, end, from, hi-1)
	}
}
