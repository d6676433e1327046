package chain

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/vhdfs/vhdfs/vhd"
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
				if err := exportChunkAt(c, out, buf, i*exportChunk, size); err != nil {
					errOnce.Do(func() { firstErr = err })
					failed.Store(true)
					return
				}
				n := min(exportChunk, size-i*exportChunk)
				d := done.Add(n)
				if d/vhd.WritebackEvery != (d-n)/vhd.WritebackEvery {
					vhd.StartWriteback(out)
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
		for i < len(p) && vhd.AllZero(p[i:granuleEnd(i)]) {
			i = granuleEnd(i)
		}
		j := i
		for j < len(p) && !vhd.AllZero(p[j:granuleEnd(j)]) {
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
