package vhdx

import (
	"sync"
	"sync/atomic"
)

// The sector bits of PARTIALLY_PRESENT blocks are kept in memory after the first Run
// that needs them, a block's slice at a time (BlockSize / LogicalSectorSize / 8
// bytes: 256 bytes for 1 MiB blocks of 512-byte sectors, 64 KiB at most). Without
// it every Run on such a block is a pread: BenchmarkReadPartial shows reads of a
// block whose runs alternate every 4 KiB twice as fast with the cache.
const (
	// sliceCacheBytes bounds the slices all open images of the process keep together.
	sliceCacheBytes = 16 << 20
	// sliceOverhead is what a cached slice costs besides its bytes (the entry, the
	// map slot), so that 256-byte slices do not overrun the budget.
	sliceOverhead = 96
)

// nextImageID numbers open images for the keys of the slice cache.
var nextImageID atomic.Uint64

// sliceKey names the bits of block blk of the image numbered img.
type sliceKey struct {
	img uint64
	blk int64
}

type cachedSlice struct {
	key  sliceKey
	bits []byte // never changed while cached
	used atomic.Bool
	slot int // index in sliceCache.ring; guarded by sliceCache.mu
}

// sliceCache holds sector bit slices as the file has them, up to a byte budget, and
// evicts with the clock algorithm: a hit marks a slice used, and the hand spares a
// used slice once. Its lock is taken inside an Image's mu, never the other way.
type sliceCache struct {
	budget int64

	mu    sync.RWMutex
	bytes int64                     // guarded by mu
	m     map[sliceKey]*cachedSlice // guarded by mu
	ring  []*cachedSlice            // guarded by mu: the slices in clock order
	hand  int                       // guarded by mu
}

var bitmapCache = newSliceCache(sliceCacheBytes)

func newSliceCache(budget int64) *sliceCache {
	return &sliceCache{budget: budget, m: map[sliceKey]*cachedSlice{}}
}

// get returns the cached bits of k, or nil. The caller must not change them.
func (c *sliceCache) get(k sliceKey) []byte {
	c.mu.RLock()
	s := c.m[k]
	c.mu.RUnlock()
	if s == nil {
		return nil
	}
	s.used.Store(true)
	return s.bits
}

// put caches bits as k's, which the caller no longer changes.
func (c *sliceCache) put(k sliceKey, bits []byte) {
	cost := int64(len(bits)) + sliceOverhead
	if cost > c.budget {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.m[k]; old != nil {
		c.removeLocked(old)
	}
	for c.bytes+cost > c.budget && len(c.ring) > 0 {
		c.hand %= len(c.ring)
		s := c.ring[c.hand]
		if s.used.Swap(false) {
			c.hand++
			continue
		}
		c.removeLocked(s)
	}
	s := &cachedSlice{key: k, bits: bits, slot: len(c.ring)}
	c.ring = append(c.ring, s)
	c.m[k] = s
	c.bytes += cost
}

// invalidate forgets k's bits.
func (c *sliceCache) invalidate(k sliceKey) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.m[k]; s != nil {
		c.removeLocked(s)
	}
}

// drop forgets every slice of the image numbered img.
func (c *sliceCache) drop(img uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := 0; i < len(c.ring); {
		if s := c.ring[i]; s.key.img == img {
			c.removeLocked(s) // moves the last slice to i
			continue
		}
		i++
	}
}

// removeLocked takes s out of the map and the ring (the last slice takes its slot).
func (c *sliceCache) removeLocked(s *cachedSlice) {
	last := c.ring[len(c.ring)-1]
	c.ring[s.slot], last.slot = last, s.slot
	c.ring = c.ring[:len(c.ring)-1]
	delete(c.m, s.key)
	c.bytes -= int64(len(s.bits)) + sliceOverhead
}

// size is the bytes the cache counts, for tests.
func (c *sliceCache) size() (bytes int64, slices int) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.bytes, len(c.ring)
}
