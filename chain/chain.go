// Package chain opens a virtual disk and its ancestors and composes them into one disk:
// reads resolve top first, run by run; writes land in the top image.
package chain

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/probe"
)

// MaxDepth bounds the number of images in a chain; deeper is taken as a loop or a
// hostile file rather than a real snapshot history.
const MaxDepth = 128

var (
	ErrCycle    = errors.New("parent chain has a cycle")
	ErrTooDeep  = errors.New("parent chain too deep")
	ErrNoSpace  = errors.New("write past the end of the disk")
	ErrReadOnly = errors.New("chain is read-only")
	// ErrPending: a merge journal names the top, so it cannot stop being the top.
	ErrPending = errors.New("a merge of the top is pending")
	// ErrTooManyParents: OpenOptions.Parents names more levels than the chain has.
	ErrTooManyParents = errors.New("more parents given than the chain has")
)

// Layer is one image of a chain.
type Layer struct {
	Image   image.Image
	Path    string // as found: the top as given, parents through their locators
	FoundBy string // which locator found it ("W2ru", "relative_path", ...), "" for the top
}

// FirstLocator is the name of the locator a child made by vhdfs finds its parent
// through (the first of its ParentHints), for Layer.FoundBy of a parent put in place
// rather than found.
func FirstLocator(child image.Image) string {
	if h, err := child.ParentHints(); err == nil && len(h) > 0 {
		return h[0].Source
	}
	return ""
}

// Chain is an open chain, top (depth 0) to base. Reads may run concurrently with each
// other and with one write; writes and merges serialise on WriteLock.
type Chain struct {
	// wmu serialises writes and merges. Held across a whole
	// read-modify-write so edges of concurrent unaligned writes do not interleave.
	wmu sync.Mutex
	// mu guards layers: readers and writers hold it for reading, a merge takes it for
	// writing only to swap in the new chain.
	mu     sync.RWMutex
	layers []*Layer
	notes  []string // set by OpenWith: see Notes
}

// OpenOptions says how Open opens a chain.
type OpenOptions struct {
	// Writable opens the top for writing; ancestors are always opened read-only.
	Writable bool
	// ForceShare opens every image read-only without taking any lock (qemu-img's -U):
	// for reading images that another process has open for writing.
	ForceShare bool
	// Parents names the parents by hand, top down: Parents[0] is the top's parent,
	// Parents[1] that parent's parent, and so on. A level named here is looked for
	// at that path only, instead of through its child's locators, and is still
	// checked by unique ID. Levels below the last one named use their locators.
	// Naming more levels than the chain has is an error (ErrTooManyParents).
	Parents []string
	// Salvage opens every image read-only and reads around damage (see probe.Salvage);
	// a parent that is missing or does not match ends the chain there, its sectors
	// reading as zeros. Notes says what was done. It never goes with Writable.
	Salvage bool
}

// mode is the probe mode of the ancestors (and of the top, unless it is writable).
func (o OpenOptions) mode() probe.Mode {
	switch {
	case o.Salvage && o.ForceShare:
		return probe.SalvageForceShare
	case o.Salvage:
		return probe.Salvage
	case o.ForceShare:
		return probe.ForceShare
	}
	return probe.ReadOnly
}

// Open opens the image at path and every ancestor. The top is opened for writing if
// writable; ancestors are always opened read-only.
//
// A chain whose merge journal says a re-link was cut short is refused (ErrJournal):
// writers run merge.Recover first.
func Open(path string, writable bool) (*Chain, error) {
	return OpenWith(path, OpenOptions{Writable: writable})
}

// OpenWith is Open with options: see OpenOptions. ForceShare wins over Writable.
func OpenWith(path string, o OpenOptions) (*Chain, error) {
	if err := checkJournal(path); err != nil {
		return nil, err
	}
	if o.Salvage && o.Writable {
		return nil, fmt.Errorf("%s: a salvage open is read-only: %w", path, image.ErrInvalidArg)
	}
	m := o.mode()
	if o.Writable && !o.ForceShare {
		m = probe.Writable
	}
	top, err := openImage(path, m)
	if err != nil {
		return nil, err
	}
	var notes []string
	layers, err := walkParents(&Layer{Image: top, Path: path}, o, &notes)
	if err != nil {
		for _, l := range layers {
			l.Image.Close()
		}
		return nil, err
	}
	return &Chain{layers: layers, notes: notes}, nil
}

func openImage(path string, m probe.Mode) (image.Image, error) {
	return probe.Open(path, m)
}

// Notes lists what opening the chain did that a sound chain would not need, one
// line each naming the file: each layer's notes (see image.Noter), then an orphan's
// missing parent. The caller prints them on stderr.
func (c *Chain) Notes() []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return layerNotes(c.layers, c.notes)
}

func layerNotes(layers []*Layer, own []string) []string {
	var out []string
	for _, l := range layers {
		if n, ok := l.Image.(image.Noter); ok {
			out = append(out, n.Notes()...)
		}
	}
	return append(out, own...)
}

// orphaned reports whether a salvage open may end the chain at cur for err (a
// missing or mismatched parent), and says so in notes.
func orphaned(o OpenOptions, cur *Layer, err error, notes *[]string) bool {
	if !o.Salvage || !(errors.Is(err, image.ErrParentMissing) || errors.Is(err, image.ErrParentMismatch)) {
		return false
	}
	msg := strings.TrimPrefix(err.Error(), cur.Path+": ")
	for _, sentinel := range []error{image.ErrParentMissing, image.ErrParentMismatch} {
		msg = strings.TrimSuffix(msg, ": "+sentinel.Error())
	}
	*notes = append(*notes, fmt.Sprintf("%s: %s; reading zeros where the parent would be", cur.Path, msg))
	return true
}

// walkParents returns the chain that starts at top. On error it also returns the
// layers it opened so far, top first, still open: the caller closes them.
func walkParents(top *Layer, o OpenOptions, notes *[]string) ([]*Layer, error) {
	layers := []*Layer{top}
	seen := map[image.ID]string{top.Image.ID(): top.Path}
	for cur := top; cur.Image.Type() == image.Differencing; {
		if len(layers) >= MaxDepth {
			return layers, fmt.Errorf("%s: more than %d images below it: %w", top.Path, MaxDepth, ErrTooDeep)
		}
		parent, err := findParent(cur.Image, cur.Path, givenParent(o.Parents, len(layers)-1), o.mode())
		if orphaned(o, cur, err, notes) {
			break
		}
		if err != nil {
			return layers, err
		}
		id := parent.Image.ID()
		if prev, ok := seen[id]; ok {
			parent.Image.Close()
			return layers, fmt.Errorf("%s: parent %s has unique ID %s, already in the chain as %s: %w", cur.Path, parent.Path, id, prev, ErrCycle)
		}
		seen[id] = parent.Path
		layers = append(layers, parent)
		cur = parent
	}
	if n := len(layers) - 1; len(o.Parents) > n {
		return layers, fmt.Errorf("%s: %d parents given, but the chain has %d (the last is %s): %w", top.Path, len(o.Parents), n, layers[n].Path, ErrTooManyParents)
	}
	return layers, nil
}

// givenParent is the path given by hand for the parent at level i (0: the top's
// parent), or "".
func givenParent(parents []string, i int) string {
	if i < len(parents) {
		return parents[i]
	}
	return ""
}

// Layers returns the layers, top first. The slice is a copy; the layers are shared.
func (c *Chain) Layers() []*Layer {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return append([]*Layer(nil), c.layers...)
}

// Len is the number of images in the chain.
func (c *Chain) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.layers)
}

// Size is the virtual size of the top image, the size of the disk.
func (c *Chain) Size() int64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.layers[0].Image.Size()
}

// SizeAt is the virtual size of the view from depth down.
func (c *Chain) SizeAt(depth int) int64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.layers[depth].Image.Size()
}

// ReadAt reads the composed disk. Reads past Size return io.EOF.
func (c *Chain) ReadAt(p []byte, off int64) (int, error) {
	return c.ReadAtDepth(p, off, 0)
}

// ReadAtDepth reads the view of the chain from layer depth down (0 is the whole
// chain). Past the view's size it returns io.EOF.
func (c *Chain) ReadAtDepth(p []byte, off int64, depth int) (int, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if depth < 0 || depth >= len(c.layers) {
		return 0, fmt.Errorf("read at depth %d of a chain of %d: %w", depth, len(c.layers), image.ErrInvalidArg)
	}
	return readLayers(c.layers[depth:], p, off)
}

// readLayers reads [off, off+len(p)) of the view of layers (top first), resolving
// runs: each maximal run of bytes stored in one layer is read with one call.
func readLayers(layers []*Layer, p []byte, off int64) (int, error) {
	size := layers[0].Image.Size()
	if off >= size {
		return 0, io.EOF
	}
	want := len(p)
	if rem := size - off; int64(len(p)) > rem {
		p = p[:rem]
	}
	if err := readFrom(layers, p, off); err != nil {
		return 0, err
	}
	if len(p) < want {
		return len(p), io.EOF
	}
	return len(p), nil
}

func readFrom(layers []*Layer, p []byte, off int64) error {
	img := layers[0].Image
	if end := img.Size(); off+int64(len(p)) > end {
		// A child may be larger than its parent: past the parent's end are zeros.
		split := max(end-off, 0)
		clear(p[split:])
		p = p[:split]
	}
	for len(p) > 0 {
		n, present, err := img.Run(off, int64(len(p)))
		if err != nil {
			return err
		}
		switch {
		case present:
			if _, err := img.ReadAt(p[:n], off); err != nil {
				return err
			}
		case len(layers) > 1:
			if err := readFrom(layers[1:], p[:n], off); err != nil {
				return err
			}
		default:
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
	return nil
}

// Run reports whether the byte at off of the view from depth down is stored in any
// layer (as opposed to reading as zeros because no layer holds it), and how many
// bytes from off, at most n, share that answer.
func (c *Chain) Run(depth int, off, n int64) (int64, bool, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if depth < 0 || depth >= len(c.layers) {
		return 0, false, fmt.Errorf("run at depth %d of a chain of %d: %w", depth, len(c.layers), image.ErrInvalidArg)
	}
	return runFrom(c.layers[depth:], off, n)
}

// ErrGone is returned for a layer that a merge has taken out of the chain.
var ErrGone = errors.New("layer is no longer in the chain")

// ReadAtLayer reads the view from layer l down, finding l in the chain under the
// same lock as the read, so a concurrent merge cannot swap the layers in between.
func (c *Chain) ReadAtLayer(l *Layer, p []byte, off int64) (int, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	d := c.depthLocked(l)
	if d < 0 {
		return 0, fmt.Errorf("%s: %w", l.Path, ErrGone)
	}
	return readLayers(c.layers[d:], p, off)
}

// RunLayer is Run for the view from layer l down.
func (c *Chain) RunLayer(l *Layer, off, n int64) (int64, bool, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	d := c.depthLocked(l)
	if d < 0 {
		return 0, false, fmt.Errorf("%s: %w", l.Path, ErrGone)
	}
	return runFrom(c.layers[d:], off, n)
}

// Contains reports whether l is still a layer of the chain.
func (c *Chain) Contains(l *Layer) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.depthLocked(l) >= 0
}

func (c *Chain) depthLocked(l *Layer) int {
	for i, x := range c.layers {
		if x == l {
			return i
		}
	}
	return -1
}

func runFrom(layers []*Layer, off, n int64) (int64, bool, error) {
	img := layers[0].Image
	if off >= img.Size() {
		return n, false, nil
	}
	n = min(n, img.Size()-off)
	k, present, err := img.Run(off, n)
	if err != nil || present || len(layers) == 1 {
		return k, present, err
	}
	return runFrom(layers[1:], off, k)
}

// WriteAt writes p at off into the top image. Whole logical sectors (512 or 4096
// bytes, as the top has them) are written as they are; a partial sector at either edge is first read through the chain so the rest of it
// keeps its bytes. A write that starts at or past Size fails with ErrNoSpace; one that
// runs past it writes what fits and returns ErrNoSpace with the count.
func (c *Chain) WriteAt(p []byte, off int64) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.RLock()
	defer c.mu.RUnlock()
	top := c.layers[0]
	if !top.Image.Writable() {
		return 0, fmt.Errorf("%s: %w", top.Path, ErrReadOnly)
	}
	return c.writeLocked(p, off)
}

// writeLocked is WriteAt for a caller that holds wmu and mu (for reading) and has
// checked that the top is writable.
func (c *Chain) writeLocked(p []byte, off int64) (int, error) {
	top := c.layers[0]
	size := top.Image.Size()
	if off < 0 || off >= size {
		return 0, fmt.Errorf("%s: write at %d, disk size %d: %w", top.Path, off, size, ErrNoSpace)
	}
	var short error
	if rem := size - off; int64(len(p)) > rem {
		p, short = p[:rem], fmt.Errorf("%s: write past the end at %d: %w", top.Path, size, ErrNoSpace)
	}
	if len(p) == 0 {
		return 0, short
	}
	sector := top.Image.SectorSize()
	start := off / sector * sector
	end := (off + int64(len(p)) + sector - 1) / sector * sector
	buf := p
	if start != off || end != off+int64(len(p)) {
		buf = make([]byte, end-start)
		headPartial, tailPartial := start != off, end != off+int64(len(p))
		if headPartial {
			if err := readFrom(c.layers, buf[:sector], start); err != nil {
				return 0, err
			}
		}
		if last := end - sector; tailPartial && !(headPartial && last == start) {
			if err := readFrom(c.layers, buf[last-start:], last); err != nil {
				return 0, err
			}
		}
		copy(buf[off-start:], p)
	}
	if _, err := top.Image.WriteAt(buf, start); err != nil {
		return 0, err
	}
	return len(p), short
}

// Sync makes every write before it durable. It does not wait for a running merge
// (which synced the top before it began, and holds off writes).
func (c *Chain) Sync() error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.layers[0].Image.Sync()
}

// WriteLock holds off writes (for a merge); it returns the unlock function.
func (c *Chain) WriteLock() func() {
	c.wmu.Lock()
	return c.wmu.Unlock
}

// Replace swaps in a new list of layers; the caller holds the write lock and closes
// what it no longer needs.
func (c *Chain) Replace(layers []*Layer) {
	c.mu.Lock()
	c.layers = layers
	c.mu.Unlock()
}

// Close syncs the top and closes every image.
func (c *Chain) Close() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	var first error
	for _, l := range c.layers {
		if err := l.Image.Close(); err != nil && first == nil {
			first = err
		}
	}
	c.layers = nil
	return first
}

// Abs returns an absolute, cleaned path for display and comparison.
func Abs(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// Source reports which layer of [from, to) stores the byte at off, the one nearest
// the top winning, as an index into the chain (-1 if none of them does), and how many
// bytes from off, at most n, share that answer.
func (c *Chain) Source(from, to int, off, n int64) (int64, int, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	for i := from; i < to; i++ {
		k, present, err := c.layers[i].Image.Run(off, n)
		if err != nil {
			return 0, -1, err
		}
		if present {
			return k, i, nil
		}
		n = k
	}
	return n, -1, nil
}

// SyncLocked is Sync for a caller that holds the write lock.
func (c *Chain) SyncLocked() error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.layers[0].Image.Sync()
}
