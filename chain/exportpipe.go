package chain

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// isPipe reports whether f is a pipe (a FIFO), which splice(2) can write into.
func isPipe(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeNamedPipe != 0
}

// exportPipe is ExportStream into a pipe: the runs the image files hold are spliced
// into it (SpliceRuns: no byte is copied through vhdfs), the zeros written. The pipe
// is made blocking (os.File.Fd does that), so a full pipe waits for its reader, under
// the chain's read lock, which only writers to the chain take.
func exportPipe(c *Chain, out *os.File, progress func(done int64)) error {
	fd := int(out.Fd())
	size := c.Size()
	var buf []byte // for the chunks not all in plain files
	for off := int64(0); off < size; {
		n := min(exportChunk, size-off)
		k, err := c.SpliceRuns(nil, off, n, fd, 0, 0, 0)
		switch {
		case errors.Is(err, ErrNotInFile):
			// Some layer does not hold these bytes in its file as they are (a
			// VHDX block stored as zeros, a log replayed in memory only): the
			// rest of the chunk is copied.
			if buf == nil {
				buf = make([]byte, exportChunk)
			}
			err = copyOut(c, out, buf[:n-k], off+k)
		case err != nil:
			err = fmt.Errorf("write at %d: %w", off+k, err)
		}
		if errors.Is(err, syscall.EPIPE) {
			// End the way a plain write does: through os.File, which for standard
			// output ends the process with SIGPIPE, as a shell pipeline expects.
			_, _ = out.Write([]byte{0})
		}
		if err != nil {
			return err
		}
		off += n
		if progress != nil {
			progress(off)
		}
	}
	return nil
}

// copyOut reads len(p) bytes of the chain at off into p and writes them to w.
func copyOut(c *Chain, w io.Writer, p []byte, off int64) error {
	if _, err := c.ReadAt(p, off); err != nil {
		return err
	}
	if _, err := w.Write(p); err != nil {
		return fmt.Errorf("write at %d: %w", off, err)
	}
	return nil
}
