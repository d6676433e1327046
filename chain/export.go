package chain

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
)

// exportChunk is the unit of work of Export.
const exportChunk = 4 << 20

// Export writes the flattened chain to out, a regular file, as a sparse raw image: only
// the ranges some layer stores and that are not all zeros (in 4 KiB granules of out)
// are written; the rest stay holes. The bytes come from the layers' files: where the
// file systems can, out shares their blocks (reflink, on XFS and btrfs), and takes no
// new space; elsewhere they are written. Where a layer cannot say which file holds
// them, they are read through the chain. Chunks go to several workers. progress, if
// not nil, is called with the bytes done so far.
func Export(c *Chain, out *os.File, progress func(done int64)) error {
	size := c.Size()
	if err := out.Truncate(size); err != nil {
		return fmt.Errorf("%s: truncate to %d: %w", out.Name(), size, err)
	}
	var noClone atomic.Bool // the file systems cannot share blocks: WriteAt from then on
	return exportParallel(context.Background(), c, fileWriteback(out), func(buf []byte, off, n int64) error {
		if err := copyChunkAt(c, out, buf, off, n, &noClone); err != nil {
			// Whatever the file path did is right and is written again: the
			// chain's own read either does the chunk or reports what is wrong.
			return exportChunkAt(c, out, buf, off, n)
		}
		return nil
	}, progress)
}

// ExportDevice writes the flattened chain to the start of out, a block device at least
// as large as the chain: every byte, zeros included (what the device held before must
// not show through), nothing past the chain's size, and no truncate.
func ExportDevice(c *Chain, out *os.File, progress func(done int64)) error {
	size := c.Size()
	devSize, err := out.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("%s: size: %w", out.Name(), err)
	}
	if devSize < size {
		return fmt.Errorf("%s: device of %d bytes is smaller than the image (%d bytes): %w", out.Name(), devSize, size, ErrNoSpace)
	}
	return exportParallel(context.Background(), c, fileWriteback(out), func(buf []byte, off, n int64) error {
		return exportDenseAt(c, out, buf[:n], off)
	}, progress)
}

// ExportStream writes the flattened chain to w in order, every byte: for a pipe or
// stdout, which take no seeks. Into a pipe, the image files' runs are spliced.
func ExportStream(c *Chain, w io.Writer, progress func(done int64)) error {
	if f, ok := w.(*os.File); ok && isPipe(f) {
		return exportPipe(c, f, progress)
	}
	size := c.Size()
	buf := make([]byte, exportChunk)
	for off := int64(0); off < size; {
		p := buf[:min(exportChunk, size-off)]
		if err := copyOut(c, w, p, off); err != nil {
			return err
		}
		off += int64(len(p))
		if progress != nil {
			progress(off)
		}
	}
	return nil
}

// fileWriteback starts writing out's dirty pages back, for exportParallel.
func fileWriteback(out *os.File) func() { return func() { fileio.StartWriteback(out) } }

// exportParallel writes the chain out with several workers, each calling chunk for
// [off, off+n) of the chain with a buffer of exportChunk bytes; n is exportChunk but
// at the end. Every fileio.WritebackEvery bytes it calls writeback. Once ctx is done
// no chunk starts, and it returns ctx's error unless a chunk failed first.
func exportParallel(ctx context.Context, c *Chain, writeback func(), chunk func(buf []byte, off, n int64) error, progress func(done int64)) error {
	size := c.Size()
	chunks := (size + exportChunk - 1) / exportChunk
	var next, done atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var failed atomic.Bool
	var wg sync.WaitGroup
	workers := min(runtime.GOMAXPROCS(0)*2, 8)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, exportChunk)
			for {
				i := next.Add(1) - 1
				if i >= chunks || failed.Load() {
					return
				}
				if err := ctx.Err(); err != nil {
					errOnce.Do(func() { firstErr = err })
					failed.Store(true)
					return
				}
				n := min(exportChunk, size-i*exportChunk)
				if err := chunk(buf, i*exportChunk, n); err != nil {
					errOnce.Do(func() { firstErr = err })
					failed.Store(true)
					return
				}
				d := done.Add(n)
				if d/fileio.WritebackEvery != (d-n)/fileio.WritebackEvery {
					writeback()
				}
				if progress != nil {
					progress(d)
				}
			}
		}()
	}
	wg.Wait()
	// No fsync, as cp and qemu-img convert: the caller syncs if it wants to.
	return firstErr
}

// exportDenseAt writes p, read from the chain at off, to out at off: every byte.
func exportDenseAt(c *Chain, out *os.File, p []byte, off int64) error {
	if _, err := c.ReadAt(p, off); err != nil {
		return err
	}
	if _, err := out.WriteAt(p, off); err != nil {
		return fmt.Errorf("%s: write at %d: %w", out.Name(), off, err)
	}
	return nil
}

// exportChunkAt writes [off, off+n) of the chain to out by reading it through the
// chain: ranges no layer stores and all-zero granules are skipped.
func exportChunkAt(c *Chain, out *os.File, buf []byte, off, n int64) error {
	end := off + n
	for pos := off; pos < end; {
		k, present, err := c.Run(0, pos, end-pos)
		if err != nil {
			return err
		}
		if present {
			p := buf[:k]
			if _, err := c.ReadAt(p, pos); err != nil {
				return err
			}
			if err := writeNonZero(out, p, pos); err != nil {
				return err
			}
		}
		pos += k
	}
	return nil
}

// copyChunkAt writes [off, off+n) of the chain to out from the files of its layers
// (FileRuns): zero pieces stay holes, file pieces go to copyPiece. buf holds at least
// n bytes. It fails with ErrNotInFile where a layer cannot say which file holds its
// bytes; what it wrote before failing is right.
func copyChunkAt(c *Chain, out *os.File, buf []byte, off, n int64, noClone *atomic.Bool) error {
	pos := off
	_, err := c.FileRuns(nil, off, n, func(p Piece) error {
		at := pos
		pos += p.N
		if p.File == nil {
			return nil // out was truncated to size: a hole
		}
		// The chain's read lock, held by FileRuns until this returns, keeps p.File
		// open (a merge closes layers under the write lock): every syscall on it is
		// made here.
		return copyPiece(p, out, buf, at, noClone)
	})
	return err
}

// copyPiece writes the piece p, which belongs at off of the view, to out: the holes of
// p.File read as zeros and stay holes unread; the data is read into buf, which holds
// at least p.N bytes, and its non-zero granules go by copyNonZero.
func copyPiece(p Piece, out *os.File, buf []byte, off int64, noClone *atomic.Bool) error {
	return pieceData(p, func(data, n int64) error {
		b := buf[:n]
		if _, err := p.File.ReadAt(b, data); err != nil {
			return fmt.Errorf("%s: read %d bytes at %d: %w", p.File.Name(), len(b), data, err)
		}
		return copyNonZero(p.File, data, b, out, off+data-p.FileOff, noClone)
	})
}

// pieceData calls fn, in order, for each extent of data [data, data+n) of p.File
// within the piece p (SEEK_DATA, SEEK_HOLE): what lies between them are holes, which
// read as zeros. A piece shorter than minSeekPiece is one extent, holes and all. A
// piece past the end of its file is an error.
func pieceData(p Piece, fn func(data, n int64) error) error {
	if p.N < minSeekPiece {
		return fn(p.FileOff, p.N)
	}
	fd := int(p.File.Fd())
	end := p.FileOff + p.N
	for pos := p.FileOff; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err == unix.ENXIO {
			return holeToEnd(p.File, end) // no data from pos on
		}
		if err != nil {
			return fmt.Errorf("%s: seek data from %d: %w", p.File.Name(), pos, err)
		}
		if data >= end {
			return nil
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("%s: seek hole from %d: %w", p.File.Name(), data, err)
		}
		hole = min(hole, end)
		if err := fn(data, hole-data); err != nil {
			return err
		}
		pos = hole
	}
	return nil
}

// minSeekPiece is the shortest piece whose holes pieceData looks for: below it, two
// lseeks cost more than reading the piece (on ext4, SEEK_DATA over reserved, unwritten
// extents walks their page cache: some 150 µs a call, measured on the 4 KiB runs of
// differencing images). The zeros read are skipped as granules all the same.
const minSeekPiece = 256 << 10

// holeToEnd checks that f, which has no data from some offset on, is at least end
// bytes long: a piece past the end of its file (a truncated image) is an error, not
// zeros.
func holeToEnd(f *os.File, end int64) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("%s: stat: %w", f.Name(), err)
	}
	if end > st.Size {
		return fmt.Errorf("%s: data up to %d, past the end of the file (%d bytes): %w", f.Name(), end, st.Size, io.ErrUnexpectedEOF)
	}
	return nil
}

// cloneRange shares n bytes of src at srcOff into dst at dstOff (FICLONERANGE: the
// reflink of XFS and btrfs), so the export takes no new space and no byte is copied.
// It fails with errUnaligned for a range it cannot share but another might (not in
// whole 4 KiB blocks on both sides, or src on another file system than dst), and with
// an error wrapping image.ErrNoKernelCopy where dst's file system shares no blocks
// (ext4, tmpfs). Tests replace it.
var cloneRange = func(src *os.File, srcOff int64, dst *os.File, dstOff, n int64) error {
	if srcOff%sparseGranule != 0 || dstOff%sparseGranule != 0 || n%sparseGranule != 0 {
		return errUnaligned
	}
	err := unix.IoctlFileCloneRange(int(dst.Fd()), &unix.FileCloneRange{
		Src_fd:      int64(src.Fd()),
		Src_offset:  uint64(srcOff),
		Src_length:  uint64(n),
		Dest_offset: uint64(dstOff),
	})
	switch err {
	case nil:
		return nil
	case unix.EINVAL, unix.EXDEV: // blocks larger than 4 KiB; a layer on another file system
		return errUnaligned
	case unix.EOPNOTSUPP, unix.ENOTTY, unix.ENOSYS:
		return fmt.Errorf("%s: clone %d bytes of %s at %d to %d: %v: %w", dst.Name(), n, src.Name(), srcOff, dstOff, err, image.ErrNoKernelCopy)
	}
	return fmt.Errorf("%s: clone %d bytes of %s at %d to %d: %w", dst.Name(), n, src.Name(), srcOff, dstOff, err)
}

// errUnaligned: cloneRange cannot share this range (not in whole blocks, or from
// another file system); it may share the next.
var errUnaligned = errors.New("range cannot be shared")

// copyNonZero puts the non-zero granules of p, the bytes of src at srcOff, into out
// at off. Where src and out agree on where blocks start (srcOff and off are congruent
// modulo a granule), a span's whole granules are shared by cloneRange if it can, and
// its partial first and last granules (at the sector edges of a differencing image's
// runs) are written from p; everything else is written. Once the file systems refuse
// to share (noClone is set, for every worker), it writes them all. Copying by
// copy_file_range instead was measured slower on ext4 than writing from p, which the
// zero check has read already.
func copyNonZero(src *os.File, srcOff int64, p []byte, out *os.File, off int64, noClone *atomic.Bool) error {
	return nonZeroSpans(p, off, func(i, j int) error {
		// [a, b): the span's whole granules, shared or (a == b) none.
		a, b := i, i
		if !noClone.Load() && (srcOff-off)%sparseGranule == 0 {
			a = min(j, int((off+int64(i)+sparseGranule-1)/sparseGranule*sparseGranule-off))
			b = max(a, int((off+int64(j))/sparseGranule*sparseGranule-off))
		}
		if b > a {
			err := cloneRange(src, srcOff+int64(a), out, off+int64(a), int64(b-a))
			switch {
			case errors.Is(err, image.ErrNoKernelCopy):
				noClone.Store(true)
				a, b = i, i
			case errors.Is(err, errUnaligned):
				a, b = i, i
			case err != nil:
				return err
			}
		}
		if err := writeAt(out, p[i:a], off+int64(i)); err != nil {
			return err
		}
		return writeAt(out, p[b:j], off+int64(b))
	})
}

// sink is where an export writes: a raw file, or an image (which takes whole logical
// sectors).
type sink interface {
	io.WriterAt
	Name() string
}

// writeAt writes p to out at off; nothing for an empty p.
func writeAt(out sink, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if _, err := out.WriteAt(p, off); err != nil {
		if _, ok := out.(*os.File); !ok {
			return err // an image's errors name it and the offset
		}
		return fmt.Errorf("%s: write at %d: %w", out.Name(), off, err)
	}
	return nil
}

// sparseGranule is the unit, aligned in the output, in which Export leaves all-zero
// data as holes: a file system block. Blocks of dynamic images are mostly zeros.
const sparseGranule = 4096

// writeNonZero writes p, which belongs at off, skipping its all-zero granules;
// neighbouring non-zero granules go out in one write.
func writeNonZero(out sink, p []byte, off int64) error {
	return nonZeroSpans(p, off, func(i, j int) error { return writeAt(out, p[i:j], off+int64(i)) })
}

// nonZeroSpans calls fn, in order, for each run p[i:j] of neighbouring granules that
// are not all zeros; p belongs at off, and granules are aligned to off, not to p (the
// first and last may be partial).
func nonZeroSpans(p []byte, off int64, fn func(i, j int) error) error {
	granuleEnd := func(i int) int {
		return min(len(p), int((off+int64(i))/sparseGranule*sparseGranule+sparseGranule-off))
	}
	for i := 0; i < len(p); {
		for i < len(p) && fileio.AllZero(p[i:granuleEnd(i)]) {
			i = granuleEnd(i)
		}
		j := i
		for j < len(p) && !fileio.AllZero(p[j:granuleEnd(j)]) {
			j = granuleEnd(j)
		}
		if j > i {
			if err := fn(i, j); err != nil {
				return err
			}
		}
		i = j
	}
	return nil
}
