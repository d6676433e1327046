package vhd

import (
	"sync"
	"sync/atomic"
)

// Bitmaps are read, cached and written in pages: 4 KiB of bitmap (16 MiB of data),
// or the whole bitmap when it is smaller. A 4 KiB read of a block with 2 GiB of data
// reads one page of its 512 KiB bitmap. Pages start on sector boundaries of the
// bitmap and are whole sectors long, as bitmaps are.
const (
	bitmapPage       = 4096
	sectorsPerPage   = bitmapPage * 8
	bytesPerPageData = sectorsPerPage * SectorSize
)

// bitmapCacheBytes bounds the clean bitmap pages that all open images of the process
// keep together, whatever their block size and however many they are.
const bitmapCacheBytes = 16 << 20

// pageOverhead is what a cached page costs besides its bytes (the entry, the map
// slot), counted against the budget so that 512-byte pages do not overrun it.
const pageOverhead = 128

// maxDirtyBitmapBytes bounds the bitmap pages a writable image holds between syncs;
// past it, WriteAt syncs.
const maxDirtyBitmapBytes = 4 << 20

// nextImageID numbers open images for the keys of the bitmap cache.
var nextImageID atomic.Uint64

// pageKey names page page of the bitmap of block blk of the image with id img.
type pageKey struct {
	img  uint64
	blk  uint32
	page uint32
}

type cachedPage struct {
	key  pageKey
	data []byte // never changed while cached
	used atomic.Bool
	slot int // index in pageCache.ring; guarded by pageCache.mu
}

// pageCache holds clean bitmap pages (their bits as on disk) up to a byte budget and
// evicts with the clock algorithm: a hit marks a page used, and the hand spares a
// used page once. Its lock is always taken last, inside an Image's mu.
type pageCache struct {
	budget int64

	mu    sync.RWMutex
	bytes int64                   // guarded by mu: pages' bytes plus overhead
	pages map[pageKey]*cachedPage // guarded by mu
	ring  []*cachedPage           // guarded by mu: the pages in clock order
	hand  int                     // guarded by mu
}

// bitmapCache is shared by every open image of the process.
var bitmapCache = newPageCache(bitmapCacheBytes)

func newPageCache(budget int64) *pageCache {
	return &pageCache{budget: budget, pages: map[pageKey]*cachedPage{}}
}

// get returns the cached page k, or nil. The page must not be modified.
func (c *pageCache) get(k pageKey) []byte {
	c.mu.RLock()
	p := c.pages[k]
	c.mu.RUnlock()
	if p == nil {
		return nil
	}
	if !p.used.Load() {
		p.used.Store(true)
	}
	return p.data
}

// put caches data as page k, in place of any page k there was, evicting pages to
// stay within the budget. The cache owns data from now on.
func (c *pageCache) put(k pageKey, data []byte) {
	cost := int64(len(data)) + pageOverhead
	if cost > c.budget {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.pages[k]; old != nil {
		c.removeLocked(old)
	}
	for c.bytes+cost > c.budget {
		if c.hand >= len(c.ring) {
			c.hand = 0
		}
		p := c.ring[c.hand]
		if p.used.Load() {
			p.used.Store(false)
			c.hand++
			continue
		}
		c.removeLocked(p) // the last page takes its slot, under the hand
	}
	p := &cachedPage{key: k, data: data, slot: len(c.ring)}
	c.ring = append(c.ring, p)
	c.pages[k] = p
	c.bytes += cost
}

// take removes page k from the cache and returns it (nil if it was not there), for
// a writer to change it.
func (c *pageCache) take(k pageKey) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.pages[k]
	if p == nil {
		return nil
	}
	c.removeLocked(p)
	return p.data
}

// drop removes the pages of the image with id img.
func (c *pageCache) drop(img uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := len(c.ring) - 1; i >= 0; i-- {
		if c.ring[i].key.img == img {
			c.removeLocked(c.ring[i])
		}
	}
}

func (c *pageCache) removeLocked(p *cachedPage) {
	last := c.ring[len(c.ring)-1]
	c.ring[p.slot] = last
	last.slot = p.slot
	c.ring[len(c.ring)-1] = nil
	c.ring = c.ring[:len(c.ring)-1]
	delete(c.pages, p.key)
	c.bytes -= int64(len(p.data)) + pageOverhead
}

// size returns the bytes the cache charges against its budget.
func (c *pageCache) size() int64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.bytes
}
