package chain

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/vhdfs/vhdfs/internal/fileio"
)

// exportChunk is the unit of work of Export.
const exportChunk = 4 << 20

// Export writes the flattened chain to out as a sparse raw image: only the ranges some
// layer stores and that are not all zeros (in 4 KiB granules) are written; the rest
// stay holes. Chunks go to several workers. progress, if not nil, is called with the
// bytes done so far.
func Export(c *Chain, out *os.File, progress func(done int64)) error {
	size := c.Size()
	if err := out.Truncate(size); err != nil {
		return fmt.Errorf("%s: truncate to %d: %w", out.Name(), size, err)
	}
	return exportParallel(c, out, false, progress)
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
	return exportParallel(c, out, true, progress)
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
		if _, err := c.ReadAt(p, off); err != nil {
			return err
		}
		if _, err := w.Write(p); err != nil {
			return fmt.Errorf("write at %d: %w", off, err)
		}
		off += int64(len(p))
		if progress != nil {
			progress(off)
		}
	}
	return nil
}

// exportParallel writes the chain to out with several workers; dense writes every
// byte, otherwise ranges no layer stores and all-zero granules are skipped.
func exportParallel(c *Chain, out *os.File, dense bool, progress func(done int64)) error {
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
				var err error
				if dense {
					err = exportDenseAt(c, out, buf, i*exportChunk, size)
				} else {
					err = exportChunkAt(c, out, buf, i*exportChunk, size)
				}
				if err != nil {
					errOnce.Do(func() { firstErr = err })
					failed.Store(true)
					return
				}
				n := min(exportChunk, size-i*exportChunk)
				d := done.Add(n)
				if d/fileio.WritebackEvery != (d-n)/fileio.WritebackEvery {
					fileio.StartWriteback(out)
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

func exportDenseAt(c *Chain, out *os.File, buf []byte, off, size int64) error {
	p := buf[:min(exportChunk, size-off)]
	if _, err := c.ReadAt(p, off); err != nil {
		return err
	}
	if _, err := out.WriteAt(p, off); err != nil {
		return fmt.Errorf("%s: write at %d: %w", out.Name(), off, err)
	}
	return nil
}

func exportChunkAt(c *Chain, out *os.File, buf []byte, off, size int64) error {
	end := min(off+exportChunk, size)
	for pos := off; pos < end; {
		n, present, err := c.Run(0, pos, end-pos)
		if err != nil {
			return err
		}
		if present {
			p := buf[:n]
			if _, err := c.ReadAt(p, pos); err != nil {
				return err
			}
			if err := writeNonZero(out, p, pos); err != nil {
				return err
			}
		}
		pos += n
	}
	return nil
}

// sparseGranule is the unit, aligned in the output, in which Export leaves all-zero
// data as holes: a file system block. Blocks of dynamic images are mostly zeros.
const sparseGranule = 4096

// writeNonZero writes p, which belongs at off, skipping its all-zero granules;
// neighbouring non-zero granules go out in one write.
func writeNonZero(out *os.File, p []byte, off int64) error {
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
			if _, err := out.WriteAt(p[i:j], off+int64(i)); err != nil {
				return fmt.Errorf("%s: write at %d: %w", out.Name(), off+int64(i), err)
			}
		}
		i = j
	}
	return nil
}
