package chain

import (
	"fmt"

	"github.com/vhdfs/vhdfs/image"
)

// MapRun is one run of a chain's map, in the shape of `qemu-img map --output=json`:
// Length bytes from Start of the virtual disk resolve to the layer at Depth (0 is
// the top). A run that no layer stores has Depth equal to the number of layers,
// Present false and Zero true. Data runs say where the layer's file holds them
// (Offset, in File); a present run without data reads zeros (a VHDX block in the ZERO
// state). Offset is nil where the run has no data, or where the format cannot say
// where it is (a VHDX whose pending log is replayed in memory).
type MapRun struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"`
	File    string `json:"file,omitempty"`
}

// MapAll is Map's depth for the whole chain.
const MapAll = -1

// Map lists the runs of the chain's disk and the layer each resolves to, top first,
// adjacent runs of one layer merged (same depth, present, zero and data, offsets
// contiguous). It asks the layers' Run and FileRun, a run at a time, never a
// sector at a time, so a sparse disk costs what its block tables hold.
//
// depth MapAll maps the whole disk. A depth d ≥ 0 lists only what layer d itself
// stores (its change set): the runs it holds, nothing else, over its own size.
func Map(c *Chain, depth int) ([]MapRun, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if depth < MapAll || depth >= len(c.layers) {
		return nil, fmt.Errorf("map at depth %d of a chain of %d: %w", depth, len(c.layers), image.ErrInvalidArg)
	}
	var out []MapRun
	add := func(r MapRun) {
		if n := len(out); n > 0 && mergeable(out[n-1], r) {
			out[n-1].Length += r.Length
			return
		}
		out = append(out, r)
	}
	if depth >= 0 {
		l := c.layers[depth]
		size := l.Image.Size()
		for off := int64(0); off < size; {
			k, present, err := l.Image.Run(off, size-off)
			if err != nil {
				return nil, fmt.Errorf("map %s at %d: %w", l.Path, off, err)
			}
			if k <= 0 {
				return nil, fmt.Errorf("map %s at %d: empty run: %w", l.Path, off, image.ErrInvalidArg)
			}
			if present {
				runs, err := storedRuns(l, depth, off, k)
				if err != nil {
					return nil, err
				}
				for _, r := range runs {
					add(r)
				}
			}
			off += k
		}
		return out, nil
	}
	size := c.layers[0].Image.Size()
	for off := int64(0); off < size; {
		k, d, err := sourceLocked(c.layers, off, size-off)
		if err != nil {
			return nil, err
		}
		if d < 0 {
			add(MapRun{Start: off, Length: k, Depth: len(c.layers), Zero: true})
		} else {
			runs, err := storedRuns(c.layers[d], d, off, k)
			if err != nil {
				return nil, err
			}
			for _, r := range runs {
				add(r)
			}
		}
		off += k
	}
	return out, nil
}

// sourceLocked reports which of layers (top first) stores the byte at off, -1 if
// none does, and for how many bytes from off, at most n, that holds. A layer
// smaller than the disk stores nothing past its end.
func sourceLocked(layers []*Layer, off, n int64) (int64, int, error) {
	for i, l := range layers {
		size := l.Image.Size()
		if off >= size {
			continue
		}
		k, present, err := l.Image.Run(off, min(n, size-off))
		if err != nil {
			return 0, -1, fmt.Errorf("map %s at %d: %w", l.Path, off, err)
		}
		if k <= 0 {
			return 0, -1, fmt.Errorf("map %s at %d: empty run: %w", l.Path, off, image.ErrInvalidArg)
		}
		if present {
			return k, i, nil
		}
		n = k
	}
	return n, -1, nil
}

// storedRuns splits [off, off+n), which layer l stores, into runs: stored as zeros
// without data (image.ZeroStorer), or data, with where the file holds it. Data the
// file holds in no one place FileRun can name (a VHDX whose pending log is replayed
// in memory) is a data run without an offset.
func storedRuns(l *Layer, depth int, off, n int64) ([]MapRun, error) {
	var out []MapRun
	zs, _ := l.Image.(image.ZeroStorer)
	for end := off + n; off < end; {
		r := MapRun{Start: off, Depth: depth, Present: true, File: l.Path}
		if zs != nil {
			k, zero, err := zs.ZeroRun(off, end-off)
			if err != nil {
				return nil, fmt.Errorf("map %s at %d: %w", l.Path, off, err)
			}
			if zero {
				r.Length, r.Zero = k, true
				out = append(out, r)
				off += k
				continue
			}
		}
		r.Data = true
		if _, fileOff, k, ok := l.Image.FileRun(off, end-off); ok && k > 0 {
			r.Length, r.Offset = k, &fileOff
		} else {
			r.Length = end - off
			if zs != nil {
				if k, _, err := zs.ZeroRun(off, end-off); err == nil {
					r.Length = k
				}
			}
		}
		out = append(out, r)
		off += r.Length
	}
	return out, nil
}

func mergeable(a, b MapRun) bool {
	if a.Depth != b.Depth || a.Present != b.Present || a.Zero != b.Zero || a.Data != b.Data || a.File != b.File || a.Start+a.Length != b.Start {
		return false
	}
	switch {
	case a.Offset == nil && b.Offset == nil:
		return true
	case a.Offset != nil && b.Offset != nil:
		return *a.Offset+a.Length == *b.Offset
	}
	return false
}
