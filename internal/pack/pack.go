// Package pack plans the compaction of a file made of extents: the last movable
// extents move into the lowest holes that fit them, so that the file can end sooner.
// It knows no format; vhd and vhdx describe their blocks and metadata as extents.
package pack

import (
	"cmp"
	"slices"
)

// Extent is a range of the file in use: metadata that stays (Fixed) or a block that
// may move, named by ID.
type Extent struct {
	ID       int64
	Off, Len int64
	Fixed    bool
}

// End is where the extent ends.
func (e Extent) End() int64 { return e.Off + e.Len }

// Move is one extent to copy from From to To.
type Move struct {
	ID       int64
	From, To int64
	Len      int64
}

// Fit returns where in the hole [start, end) an extent of n bytes goes, or false if
// it does not fit there.
type Fit func(start, end, n int64) (int64, bool)

// Plan returns the moves that fill the holes between extents from the lowest up with
// the movable extents from the highest down, as long as each move takes an extent
// lower in the file, and the end of the last extent afterwards. A hole filled never
// overlaps an extent in use at the time of its move: before any move, after the
// moves before it. Extents must not overlap; the hole search starts at offset 0.
func Plan(extents []Extent, fit Fit) ([]Move, int64) {
	ext := slices.Clone(extents)
	slices.SortFunc(ext, func(a, b Extent) int { return cmp.Compare(a.Off, b.Off) })
	gone := make([]bool, len(ext))
	hi := len(ext) - 1
	top := func() { // the highest movable extent still in place
		for hi >= 0 && (ext[hi].Fixed || gone[hi]) {
			hi--
		}
	}
	top()
	var moves []Move
	pos := int64(0)
	for i := 0; i < len(ext) && i <= hi; i++ {
		if gone[i] {
			continue
		}
		for hi >= i {
			e := ext[hi]
			to, ok := fit(pos, ext[i].Off, e.Len)
			if !ok || to >= e.Off {
				break
			}
			moves = append(moves, Move{ID: e.ID, From: e.Off, To: to, Len: e.Len})
			gone[hi] = true
			pos = to + e.Len
			top()
		}
		if !gone[i] {
			pos = max(pos, ext[i].End())
		}
	}
	end := pos
	for k, e := range ext {
		if !gone[k] {
			end = max(end, e.End())
		}
	}
	return moves, end
}
