package chain

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// errPipeClosed: the pipe's reader went away during a splice.
var errPipeClosed = errors.New("reader of the pipe went away")

// isPipe reports whether f is a pipe (a FIFO), which splice(2) can write into.
func isPipe(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeNamedPipe != 0
}

// exportPipe is ExportStream into a pipe: the runs the image files hold are spliced
// into it (the pipe takes references to the files' pages; no byte is copied through
// vhdfs), and the zeros no layer stores are written. A splice into a full pipe waits
// for its reader, under the chain's read lock, which only writers to the chain take.
func exportPipe(c *Chain, out *os.File, progress func(done int64)) error {
	rc, err := out.SyscallConn()
	if err != nil {
		return err
	}
	size := c.Size()
	var buf []byte // for the chunks not all in plain files
	for off := int64(0); off < size; {
		n := min(exportChunk, size-off)
		pos := off
		_, err := c.FileRuns(nil, off, n, func(p Piece) error {
			var err error
			if p.File == nil {
				err = writeZeros(out, p.N)
			} else {
				err = spliceAll(rc, p.File, p.FileOff, p.N)
			}
			if err != nil {
				return fmt.Errorf("write at %d: %w", pos, err)
			}
			pos += p.N
			return nil
		})
		if errors.Is(err, ErrNotInFile) {
			// Some layer does not hold these bytes in its file as they are (a
			// VHDX block stored as zeros, a log replayed in memory only): the
			// rest of the chunk is copied.
			if buf == nil {
				buf = make([]byte, exportChunk)
			}
			err = copyOut(c, out, buf[:off+n-pos], pos)
		}
		if errors.Is(err, errPipeClosed) {
			// End the way a plain write does: through os.File, which for standard
			// output ends the process with SIGPIPE, as a shell pipeline expects.
			if _, werr := out.Write([]byte{0}); werr != nil {
				err = fmt.Errorf("write at %d: %w", pos, werr)
			}
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

// spliceAll splices n bytes of f from off into the pipe behind rc, waiting for room
// (through the poller when the pipe is non-blocking). A file that cannot be spliced
// from, found before any byte went, is ErrNotInFile: the caller copies instead.
func spliceAll(rc syscall.RawConn, f *os.File, off, n int64) error {
	src := int(f.Fd())
	sent := false // any byte of f went into the pipe
	for n > 0 {
		var k int64
		var err error
		werr := rc.Write(func(fd uintptr) bool {
			k, err = unix.Splice(src, &off, int(fd), nil, int(n), unix.SPLICE_F_MORE)
			return err != unix.EAGAIN
		})
		switch {
		case werr != nil:
			return werr
		case err == unix.EINTR:
			continue
		case err == unix.EPIPE:
			return errPipeClosed
		case !sent && (err == unix.EINVAL || err == unix.ENOSYS || err == unix.EOPNOTSUPP):
			return fmt.Errorf("splice from %s: %v: %w", f.Name(), err, ErrNotInFile) // a file system that cannot splice
		case err != nil:
			return fmt.Errorf("splice from %s at %d: %w", f.Name(), off, err)
		case k == 0:
			return fmt.Errorf("splice from %s at %d: %w", f.Name(), off, io.ErrUnexpectedEOF)
		}
		n -= k
		sent = true
	}
	return nil
}

// copyOut reads len(p) bytes of the chain at off into p and writes them to out.
func copyOut(c *Chain, out *os.File, p []byte, off int64) error {
	if _, err := c.ReadAt(p, off); err != nil {
		return err
	}
	if _, err := out.Write(p); err != nil {
		if errors.Is(err, syscall.EPIPE) {
			return errPipeClosed
		}
		return fmt.Errorf("write at %d: %w", off, err)
	}
	return nil
}

// writeZeros writes n zero bytes to out.
func writeZeros(out *os.File, n int64) error {
	for n > 0 {
		k, err := out.Write(zeroChunk[:min(n, int64(len(zeroChunk)))])
		if errors.Is(err, syscall.EPIPE) {
			return errPipeClosed
		}
		if err != nil {
			return err
		}
		n -= int64(k)
	}
	return nil
}

// zeroChunk is what writeZeros writes from.
var zeroChunk = make([]byte, 64<<10)
