// Package pagecache keeps the sector bitmaps of open images in memory (and VHDX's
// block table pages), for every format at once, within one byte budget per process:
// a Run over a block whose sectors come from different layers then reads no bitmap
// from the file.
package pagecache

import (
	"sync"
	"sync/atomic"
)

// Budget bounds the bytes that all open images of the process keep together,
// whatever their format, block size and number.
const Budget = 16 << 20

// Overhead is what a cached page costs besides its bytes (the entry, the map slot),
// counted against the budget so that 256-byte pages do not overrun it.
const Overhead = 128

var nextImage atomic.Uint64

// NewImage numbers an open image for its keys.
func NewImage() uint64 { return nextImage.Add(1) }

// Key names a page: page Page of the bitmap of block Block of the image Image; a
// format that pages its block table too (VHDX) keys its pages with Block -1.
type Key struct {
	Image       uint64
	Block, Page int64
}

type page struct {
	key  Key
	data []byte // never changed while cached
	used atomic.Bool
	slot int // index in Cache.ring; guarded by Cache.mu
}

// Cache holds pages as the files hold them, up to a byte budget, and evicts with the
// clock algorithm: a hit marks a page used, and the hand spares a used page once.
// Its lock is always taken last, inside an image's own.
type Cache struct {
	budget int64

	mu    sync.RWMutex
	bytes int64         // guarded by mu: pages' bytes plus overhead
	pages map[Key]*page // guarded by mu
	ring  []*page       // guarded by mu: the pages in clock order
	hand  int           // guarded by mu
}

// Bitmaps is the cache every open image of the process shares.
var Bitmaps = New(Budget)

// New returns an empty cache of budget bytes.
func New(budget int64) *Cache { return &Cache{budget: budget, pages: map[Key]*page{}} }

// Get returns the cached page k, or nil. The caller must not change it.
func (c *Cache) Get(k Key) []byte {
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

// Put caches data as page k, in place of any page k there was, evicting pages to
// stay within the budget. The cache owns data from now on.
func (c *Cache) Put(k Key, data []byte) {
	cost := int64(len(data)) + Overhead
	if cost > c.budget {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.pages[k]; old != nil {
		c.removeLocked(old)
	}
	for c.bytes+cost > c.budget && len(c.ring) > 0 {
		c.hand %= len(c.ring)
		p := c.ring[c.hand]
		if p.used.Swap(false) {
			c.hand++
			continue
		}
		c.removeLocked(p) // the last page takes its slot, under the hand
	}
	p := &page{key: k, data: data, slot: len(c.ring)}
	c.ring = append(c.ring, p)
	c.pages[k] = p
	c.bytes += cost
}

// Take removes page k and returns it (nil if it was not cached), for a writer to
// change it.
func (c *Cache) Take(k Key) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.pages[k]
	if p == nil {
		return nil
	}
	c.removeLocked(p)
	return p.data
}

// Drop removes every page of the image img.
func (c *Cache) Drop(img uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := len(c.ring) - 1; i >= 0; i-- {
		if i < len(c.ring) && c.ring[i].key.Image == img {
			c.removeLocked(c.ring[i])
		}
	}
}

func (c *Cache) removeLocked(p *page) {
	last := c.ring[len(c.ring)-1]
	c.ring[p.slot], last.slot = last, p.slot
	c.ring[len(c.ring)-1] = nil
	c.ring = c.ring[:len(c.ring)-1]
	delete(c.pages, p.key)
	c.bytes -= int64(len(p.data)) + Overhead
}

// Size returns the bytes charged against the budget and the pages held.
func (c *Cache) Size() (bytes int64, pages int) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.bytes, len(c.ring)
}
