package chain

import (
	"context"
	"hash"
)

// HashView writes the flattened chain into h in order, every byte (what no layer
// stores as zeros), as an export writes it. It reads through the chain, beside an
// export that writes sparse, in parallel or by splice and so cannot feed a hash
// itself: the page cache the export has just filled mostly serves it. progress, if
// not nil, is called with the bytes hashed so far. Once ctx is done it stops and
// returns ctx's error.
func HashView(ctx context.Context, c *Chain, h hash.Hash, progress func(done int64)) error {
	size := c.Size()
	buf := make([]byte, exportChunk)
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		p := buf[:min(exportChunk, size-off)]
		if _, err := c.ReadAt(p, off); err != nil {
			return err
		}
		h.Write(p)
		off += int64(len(p))
		if progress != nil {
			progress(off)
		}
	}
	return nil
}
