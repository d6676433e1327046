package chain

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/image"
)

// Convert writes the flattened chain into dst, a new base image (fixed or dynamic,
// of any format) that reads as zeros, is opened for writing, and is at least as
// large as the chain: past the chain's size it stays zeros. Only the granules (4 KiB
// of the disk) that some layer stores and that are not all zeros are written, so a
// dynamic dst allocates no block the chain does not hold data in; a fixed dst has
// the file ranges that would hold zeros made holes first, where the file system can.
// The chain is read in chunks by several workers, from its layers' files where they
// say which file holds the bytes (FileRuns: holes in those files are not read), else
// through the chain. Once ctx is done no chunk starts and Convert returns ctx's
// error. progress, if not nil, is called with the bytes of the chain done so far,
// from the workers' goroutines, as Export calls it.
// Convert neither syncs nor closes dst.
func Convert(ctx context.Context, c *Chain, dst image.Image, progress func(done int64)) error {
	if dst.Size() < c.Size() {
		return fmt.Errorf("%s: %d bytes, smaller than the chain's %d: %w", dst.Name(), dst.Size(), c.Size(), image.ErrInvalidArg)
	}
	if dst.Type() == image.Differencing {
		return fmt.Errorf("%s: a differencing image would show its parent: %w", dst.Name(), image.ErrInvalidArg)
	}
	if sector := dst.SectorSize(); c.Size()%sector != 0 {
		return fmt.Errorf("%s: the chain's %d bytes are not whole %d-byte sectors of it: %w", dst.Name(), c.Size(), sector, image.ErrInvalidArg)
	}
	// Space is taken as data arrives; a full file system fails the convert as a whole.
	dst.NoReservation()
	if dst.Type() == image.Fixed {
		if err := punchStored(dst); err != nil {
			return err
		}
	}
	return exportParallel(ctx, c, dst.StartWriteback, func(buf []byte, off, n int64) error {
		p := buf[:n]
		spans, err := readChunk(c, p, off)
		if err != nil {
			return err
		}
		for _, sp := range spans {
			if err := writeNonZero(dst, p[sp.i:sp.j], off+int64(sp.i)); err != nil {
				return err
			}
		}
		return nil
	}, progress)
}

// span is p[i:j] of a chunk.
type span struct{ i, j int }

// readChunk reads the data of [off, off+len(p)) of the chain into p and returns where
// it lies in p, in order; the rest of p is left as it was and reads as zeros in the
// chain (no layer stores it, or a layer's file has a hole there). It reads from the
// layers' files, past their holes, where FileRuns can say which file holds each run;
// else (a layer that cannot say) all of p through the chain.
func readChunk(c *Chain, p []byte, off int64) ([]span, error) {
	var spans []span
	add := func(i, j int) {
		if k := len(spans) - 1; k >= 0 && spans[k].j == i {
			spans[k].j = j
			return
		}
		spans = append(spans, span{i, j})
	}
	pos := off
	_, err := c.FileRuns(nil, off, int64(len(p)), func(pc Piece) error {
		at := int(pos - off) // where pc begins in p
		pos += pc.N
		if pc.File == nil {
			return nil
		}
		return pieceData(pc, func(data, n int64) error {
			i := at + int(data-pc.FileOff)
			if _, err := pc.File.ReadAt(p[i:i+int(n)], data); err != nil {
				return fmt.Errorf("%s: read %d bytes at %d: %w", pc.File.Name(), n, data, err)
			}
			add(i, i+int(n))
			return nil
		})
	})
	if errors.Is(err, ErrNotInFile) {
		_, err = c.ReadAt(p, off)
		spans = []span{{0, len(p)}}
	}
	return spans, err
}

// punchStored makes holes of the file ranges that hold dst's bytes (a new fixed image:
// all of them, written as zeros or reserved), so that only the data Convert writes
// takes space. A file system that cannot punch holes leaves them as they are: they
// read as zeros either way.
func punchStored(dst image.Image) error {
	size := dst.Size()
	for off := int64(0); off < size; {
		f, fileOff, k, ok := dst.FileRun(off, size-off)
		if !ok {
			return nil // not in a plain file: nothing this can punch
		}
		err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, fileOff, k)
		if errors.Is(err, unix.EOPNOTSUPP) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: punch %d bytes at %d: %w", dst.Name(), k, fileOff, err)
		}
		off += k
	}
	return nil
}
