package chain

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Piece is a part of a range of a view: N bytes at FileOff of File, or N zeros
// (File nil).
type Piece struct {
	File    *os.File
	FileOff int64
	N       int64
}

// ErrNotInFile: a layer stores part of the range somewhere other than in one plain
// file at a known offset (FileRun said no), so the range cannot be spliced.
var ErrNotInFile = errors.New("range not stored in a plain file")

// ErrTooManyPieces: SpliceRuns met more pieces than its caller allows.
var ErrTooManyPieces = errors.New("too many pieces to splice")

// FileRuns calls fn, in order, for each piece of [off, off+n) of the view from layer
// l down (l nil: the whole chain): the runs of the image files that hold it and the
// zeros that no layer stores. It does so under the chain's read lock, so each File
// stays open, and the layers stay as they are, until fn returns; fn must not call the
// chain. It returns how many bytes the pieces cover (fewer than n at the view's end,
// io.EOF from off on), and stops at the first error, fn's or its own (ErrNotInFile,
// ErrGone for a layer that left the chain).
func (c *Chain) FileRuns(l *Layer, off, n int64, fn func(Piece) error) (int64, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	d := 0
	if l != nil {
		if d = c.depthLocked(l); d < 0 {
			return 0, fmt.Errorf("%s: %w", l.Path, ErrGone)
		}
	}
	layers := c.layers[d:]
	size := layers[0].Image.Size()
	if off < 0 || off >= size {
		return 0, io.EOF
	}
	n = min(n, size-off)
	return n, fileRunsFrom(layers, off, n, fn)
}

func fileRunsFrom(layers []*Layer, off, n int64, fn func(Piece) error) error {
	img := layers[0].Image
	if end := img.Size(); off+n > end {
		// A child may be larger than its parent: past the parent's end are zeros.
		split := max(end-off, 0)
		if split > 0 {
			if err := fileRunsFrom(layers, off, split, fn); err != nil {
				return err
			}
		}
		return fn(Piece{N: n - split})
	}
	for n > 0 {
		k, present, err := img.Run(off, n)
		if err != nil {
			return err
		}
		switch {
		case present:
			for m := k; m > 0; {
				f, fo, j, ok := img.FileRun(off+k-m, m)
				if !ok {
					return fmt.Errorf("%s at %d: %w", layers[0].Path, off+k-m, ErrNotInFile)
				}
				if err := fn(Piece{File: f, FileOff: fo, N: j}); err != nil {
					return err
				}
				m -= j
			}
		case len(layers) > 1:
			if err := fileRunsFrom(layers[1:], off, k, fn); err != nil {
				return err
			}
		default:
			if err := fn(Piece{N: k}); err != nil {
				return err
			}
		}
		off, n = off+k, n-k
	}
	return nil
}

// SpliceRuns loads [off, off+n) of the view from layer l (nil: the whole chain) into
// the pipe whose write end is the descriptor pipe, in order: the runs of the image
// files go by splice(2), so the pipe holds references to their pages and nothing
// needs the files once it returns, and the zeros no layer stores are written. flags
// go to splice and decide how a full pipe is met: unix.SPLICE_F_NONBLOCK (with a
// non-blocking pipe) fails with EAGAIN, 0 (with a blocking one) waits for the reader.
// More than maxPieces pieces (0: any number) is ErrTooManyPieces, before the first
// byte of the one too many; so is more than maxBufs pipe buffers (0: any number), an
// upper bound reckoned before each splice or write (see pipeBufs). A run no layer holds in a plain file, or a file that
// cannot be spliced from, is ErrNotInFile, before any byte of that run. It returns
// how many bytes went into the pipe, on error too (io.EOF from off on the view's end).
func (c *Chain) SpliceRuns(l *Layer, off, n int64, pipe, flags, maxPieces, maxBufs int) (int64, error) {
	var sent int64
	pieces, bufs := 0, int64(0)
	// room takes k more buffers, or fails before they go in.
	room := func(k int64) error {
		if maxBufs > 0 && bufs+k > int64(maxBufs) {
			return ErrTooManyPieces
		}
		bufs += k
		return nil
	}
	_, err := c.FileRuns(l, off, n, func(p Piece) error {
		if pieces++; maxPieces > 0 && pieces > maxPieces {
			return ErrTooManyPieces
		}
		if p.File == nil {
			for left := p.N; left > 0; {
				chunk := min(left, int64(len(zeroChunk)))
				if err := room(pipeBufs(0, chunk)); err != nil {
					return err
				}
				k, err := unix.Write(pipe, zeroChunk[:chunk])
				if err == unix.EINTR {
					continue
				}
				if err != nil {
					return fmt.Errorf("write zeros to a pipe: %w", err)
				}
				left, sent = left-int64(k), sent+int64(k)
			}
			return nil
		}
		src := int(p.File.Fd())
		for left, fo := p.N, p.FileOff; left > 0; {
			if err := room(pipeBufs(fo, left)); err != nil {
				return err
			}
			k, err := unix.Splice(src, &fo, pipe, nil, int(left), flags)
			switch {
			case err == unix.EINTR:
				continue
			case left == p.N && (err == unix.EINVAL || err == unix.ENOSYS || err == unix.EOPNOTSUPP):
				return fmt.Errorf("splice from %s: %v: %w", p.File.Name(), err, ErrNotInFile)
			case err != nil:
				return fmt.Errorf("splice from %s at %d: %w", p.File.Name(), fo, err)
			case k == 0:
				return fmt.Errorf("splice from %s at %d: %w", p.File.Name(), fo, io.ErrUnexpectedEOF)
			}
			left, sent = left-k, sent+k
		}
		return nil
	})
	return sent, err
}

// pipeBufs is at most how many pipe buffers n bytes take that are spliced from a
// file at off (a buffer per page they touch: a run that starts or ends inside a page,
// as runs split at sector boundaries between layers do, takes more than its bytes
// fill) or written
// (off 0: a buffer per page or part of one). Whoever moves the pipe's contents on
// with splice(2) needs as many free slots in the pipe it moves them to: a
// pipe-to-pipe splice moves whole buffers and stops, short, at a full pipe.
func pipeBufs(off, n int64) int64 {
	if n <= 0 {
		return 0
	}
	page := int64(os.Getpagesize())
	return (off+n-1)/page - off/page + 1
}

// zeroChunk is what SpliceRuns writes zeros from.
var zeroChunk = make([]byte, 64<<10)
