package pagecache

import (
	"bytes"
	"testing"
)

// TestClock: the cache keeps within its budget, a page read since the hand last
// passed survives an eviction, Put replaces, a page over the budget is not kept,
// Take removes, and Drop removes one image's pages only.
func TestClock(t *testing.T) {
	const pages, n = 8, 512
	c := New(pages * (n + Overhead))
	key := func(img uint64, i int64) Key { return Key{Image: img, Block: i} }
	for i := range int64(pages) {
		c.Put(key(1, i), bytes.Repeat([]byte{byte(i)}, n))
	}
	if b, p := c.Size(); b != c.budget || p != pages {
		t.Fatalf("full cache charges %d bytes for %d pages, want %d for %d", b, p, c.budget, pages)
	}
	if got := c.Get(key(1, 0)); len(got) != n || got[0] != 0 {
		t.Fatal("page 0 is not cached")
	}
	c.Put(key(2, 100), make([]byte, n))
	switch {
	case c.Get(key(1, 0)) == nil:
		t.Error("the page just read was evicted")
	case c.Get(key(1, 1)) != nil:
		t.Error("the oldest unread page was kept")
	case c.Get(key(2, 100)) == nil:
		t.Error("the new page is not cached")
	}
	c.Put(key(1, 0), bytes.Repeat([]byte{9}, n))
	if got := c.Get(key(1, 0)); got[0] != 9 {
		t.Error("Put did not replace")
	}
	c.Put(key(3, 0), make([]byte, c.budget))
	if c.Get(key(3, 0)) != nil {
		t.Error("a page over the budget is cached")
	}
	c.Drop(1)
	for i := range int64(pages) {
		if c.Get(key(1, i)) != nil {
			t.Errorf("page %d of a dropped image is still cached", i)
		}
	}
	if b, p := c.Size(); p != 1 || b != n+Overhead || c.Get(key(2, 100)) == nil {
		t.Errorf("after Drop: %d bytes, %d pages; want image 2's one page", b, p)
	}
	// A 4 KiB page takes the room of several small ones.
	for i := range int64(pages) {
		c.Put(key(4, i), make([]byte, n))
	}
	c.Put(key(2, 101), make([]byte, 4096))
	if b, _ := c.Size(); b > c.budget {
		t.Errorf("cache charges %d bytes, over its budget of %d", b, c.budget)
	}
	if c.Take(key(2, 101)) == nil || c.Get(key(2, 101)) != nil {
		t.Error("Take did not remove the page")
	}
}
