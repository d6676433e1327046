package vhd

import "iter"

// batPage is the number of BAT entries held per page in memory.
const batPage = 1024

// batTable is the block allocation table in memory: pages of batPage entries, a nil
// page standing for batPage unallocated ones, so that a sparse 2 TiB image (a million
// entries) costs a few pages rather than 4 MiB. The Image's mu guards it.
type batTable struct {
	pages [][]uint32
	n     int
}

func newBAT(n int) batTable {
	return batTable{pages: make([][]uint32, (n+batPage-1)/batPage), n: n}
}

func (b *batTable) len() int { return b.n }

func (b *batTable) get(i int64) uint32 {
	p := b.pages[i/batPage]
	if p == nil {
		return unallocated
	}
	return p[i%batPage]
}

func (b *batTable) set(i int64, e uint32) {
	p := b.pages[i/batPage]
	if p == nil {
		if e == unallocated {
			return
		}
		p = make([]uint32, batPage)
		for k := range p {
			p[k] = unallocated
		}
		b.pages[i/batPage] = p
	}
	p[i%batPage] = e
}

// allocated yields the index and entry of every allocated block, in index order.
func (b *batTable) allocated() iter.Seq2[int, uint32] {
	return func(yield func(int, uint32) bool) {
		for pi, p := range b.pages {
			for k, e := range p {
				if e != unallocated && !yield(pi*batPage+k, e) {
					return
				}
			}
		}
	}
}
