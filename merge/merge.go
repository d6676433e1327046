// Package merge commits layers of a VHD chain into an ancestor with the semantics of
// Windows' MergeVirtualDisk: a copy of every sector the merged layers hold into the
// target, the layer nearest the top winning. Every sector written to the target is
// still shadowed by a merged layer until the chain is re-linked, so the view through
// the top never changes, an interrupted merge leaves a usable chain, and running the
// same merge again completes it.
package merge

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/vhd"
)

var (
	ErrDepth    = errors.New("bad merge depth")
	ErrTooLarge = errors.New("layers differ in size")
)

// Options of a merge.
type Options struct {
	// From is the depth of the first layer merged: 0 merges from the top (the top is
	// then replaced by a new empty differencing image); S ≥ 1 merges a middle range
	// while the top stays and takes writes.
	From int
	// Depth is how many layers are merged; the target is the layer at From+Depth.
	// 0 is the default, 1 (as the bare `merge` command); callers that read a depth
	// from people reject an explicit 0 themselves.
	Depth int
	// Progress, if set, is called with the bytes copied so far and the total.
	Progress func(done, total int64)
	// Logf, if set, receives a line for each step.
	Logf func(format string, args ...any)
	// Hook, if set, is called at each named point of the merge ("copy-start",
	// "copy-half", "copy-done", "relink-before", "relink-after"); tests use it to
	// stop or kill the process there.
	Hook func(point string)
}

// Validate checks the options against a chain of n images and fills defaults.
func (o *Options) Validate(n int) error {
	if o.Depth == 0 {
		o.Depth = 1
	}
	if o.From < 0 || o.Depth < 1 {
		return fmt.Errorf("from=%d depth=%d: depth must be at least 1: %w", o.From, o.Depth, ErrDepth)
	}
	// Not From+Depth >= n: huge values (vhdfs merge --from) would overflow past it.
	if o.Depth >= n || o.From >= n-o.Depth {
		if o.From == 0 {
			return fmt.Errorf("depth=%d: must be less than the %d images in the chain: %w", o.Depth, n, ErrDepth)
		}
		return fmt.Errorf("from=%d depth=%d: the target layer %d is past the base of a chain of %d images: %w", o.From, o.Depth, o.From+o.Depth, n, ErrDepth)
	}
	if o.Progress == nil {
		o.Progress = func(int64, int64) {}
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	if o.Hook == nil {
		o.Hook = func(string) {}
	}
	return nil
}

// Result of a finished merge.
type Result struct {
	Target   string   // the image that received the data
	Detached []string // images merged away: left on disk, no longer in the chain
	Bytes    int64    // bytes copied
}

// Message is a line for people.
func (r *Result) Message() string {
	msg := fmt.Sprintf("merged %d bytes into %s", r.Bytes, r.Target)
	if len(r.Detached) > 0 {
		msg += "; no longer in the chain (left on disk, now invalid): " + strings.Join(r.Detached, ", ")
	}
	return msg
}

// Merge runs a merge on an open chain whose top is writable. ctx aborts it: the chain
// then stays as it was. It returns when the data is durable in the target and the
// chain has been re-linked (and c shows the shorter chain).
func Merge(ctx context.Context, c *chain.Chain, opts Options) (*Result, error) {
	if err := opts.Validate(c.Len()); err != nil {
		return nil, err
	}
	if opts.From == 0 {
		// Writes wait for the whole merge: the top is replaced at the end.
		unlock := c.WriteLock()
		defer unlock()
		if err := c.SyncLocked(); err != nil {
			return nil, err
		}
	}
	layers := c.Layers()
	target := layers[opts.From+opts.Depth]
	res := &Result{Target: target.Path}
	// A layer of another size would change the view: past a smaller layer's end the
	// chain reads zeros, past a smaller target's end the data has nowhere to go.
	// Growing a target is not supported.
	first := layers[opts.From]
	for _, l := range layers[opts.From+1 : opts.From+opts.Depth+1] {
		if l.Image.Size() != first.Image.Size() {
			return nil, fmt.Errorf("%s: virtual size %d differs from %s (%d); merging layers of different sizes is not supported: %w",
				l.Path, l.Image.Size(), first.Path, first.Image.Size(), ErrTooLarge)
		}
	}
	n, err := copyLayers(ctx, c, opts, target)
	res.Bytes = n
	if err != nil {
		return res, err
	}
	opts.Hook("copy-done")
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if opts.From == 0 {
		err = replaceTop(c, opts, layers, target, res)
	} else {
		err = relink(c, opts, layers, target, res)
	}
	return res, err
}

// copyLayers writes every sector held by layers [From, From+Depth) into the target,
// through a writable handle of its own. The chain's read-only handle of the target
// keeps its cached BAT meanwhile: everything it would now read differently is
// shadowed by a merged layer.
func copyLayers(ctx context.Context, c *chain.Chain, opts Options, target *chain.Layer) (int64, error) {
	from, to := opts.From, opts.From+opts.Depth
	size := c.SizeAt(from)
	total, err := presentBytes(c, from, to, size)
	if err != nil {
		return 0, err
	}
	opts.Progress(0, total)
	opts.Hook("copy-start")
	opts.Logf("merge: copying %d bytes from layers %d..%d into %s", total, from, to-1, target.Path)
	dst, err := vhd.Open(target.Path, true)
	if err != nil {
		return 0, err
	}
	layers := c.Layers()
	const chunk = 4 << 20
	buf := make([]byte, chunk)
	var done, sinceWriteback int64
	halfway := false
	for off := int64(0); off < size; off += chunk {
		if !halfway && done*2 >= total && done > 0 {
			halfway = true
			opts.Hook("copy-half")
		}
		if err := ctx.Err(); err != nil {
			dst.Close()
			return done, err
		}
		end := min(off+chunk, size)
		for pos := off; pos < end; {
			k, src, err := c.Source(from, to, pos, end-pos)
			if err != nil {
				dst.Close()
				return done, err
			}
			if src >= 0 {
				p := buf[:k]
				if _, err := layers[src].Image.ReadAt(p, pos); err != nil {
					dst.Close()
					return done, err
				}
				if _, err := dst.WriteAt(p, pos); err != nil {
					dst.Close()
					return done, err
				}
				done += k
				sinceWriteback += k
			}
			pos += k
		}
		// Get the disk busy now rather than all at the final fsync.
		if sinceWriteback >= vhd.WritebackEvery {
			dst.StartWriteback()
			sinceWriteback = 0
		}
		opts.Progress(done, total)
	}
	if !halfway {
		opts.Hook("copy-half")
	}
	if err := dst.Close(); err != nil {
		return done, err
	}
	opts.Logf("merge: %d bytes durable in %s", done, target.Path)
	return done, nil
}

// presentBytes counts the bytes layers [from, to) hold, for progress.
func presentBytes(c *chain.Chain, from, to int, size int64) (int64, error) {
	var total int64
	for pos := int64(0); pos < size; {
		k, src, err := c.Source(from, to, pos, size-pos)
		if err != nil {
			return 0, err
		}
		if src >= 0 {
			total += k
		}
		pos += k
	}
	return total, nil
}

// replaceTop swaps the top for a new empty differencing image at the same path
// whose parent is the target: written beside it, fsynced, renamed over it, and the
// folder fsynced. Until the rename the old chain is intact; after it, the new one.
// The caller holds the chain's write lock.
func replaceTop(c *chain.Chain, opts Options, layers []*chain.Layer, target *chain.Layer, res *Result) error {
	top := layers[0]
	fresh, err := vhd.Open(target.Path, false)
	if err != nil {
		return err
	}
	tmp := tempName(top.Path)
	os.Remove(tmp) // a leftover of an interrupted merge; the rename never happened
	err = vhd.Create(tmp, vhd.CreateOptions{Type: vhd.TypeDifferencing, Parent: fresh, ParentPath: target.Path,
		LocatorPath: top.Path, BlockSize: top.Image.BlockSize()})
	if err == nil {
		err = sameOwnerAndMode(tmp, top.Path)
	}
	var newTop *vhd.Image
	if err == nil {
		// Opened (and locked) before the rename: nothing can fail between the rename
		// and the swap that would leave the mount writing to the replaced file.
		newTop, err = vhd.Open(tmp, true)
	}
	if err != nil {
		fresh.Close()
		os.Remove(tmp)
		return err
	}
	opts.Hook("relink-before")
	if err := os.Rename(tmp, top.Path); err != nil {
		newTop.Close()
		fresh.Close()
		os.Remove(tmp)
		return fmt.Errorf("rename %s to %s: %w", tmp, top.Path, err)
	}
	newTop.SetName(top.Path)
	dirErr := syncDir(filepath.Dir(top.Path))
	opts.Hook("relink-after")
	opts.Logf("merge: %s replaced by an empty image on %s", top.Path, target.Path)
	newLayers := []*chain.Layer{{Image: newTop, Path: top.Path}, {Image: fresh, Path: target.Path, FoundBy: "W2ru"}}
	newLayers = append(newLayers, layers[opts.Depth+1:]...)
	c.Replace(newLayers)
	for _, l := range layers[:opts.Depth+1] {
		l.Image.Close()
	}
	for _, l := range layers[1:opts.Depth] {
		res.Detached = append(res.Detached, l.Path)
	}
	return dirErr
}

// sameOwnerAndMode gives path the permission bits and owner of like.
func sameOwnerAndMode(path, like string) error {
	st, err := os.Stat(like)
	if err != nil {
		return err
	}
	if err := os.Chmod(path, st.Mode().Perm()); err != nil {
		return err
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && (int(sys.Uid) != os.Getuid() || int(sys.Gid) != os.Getgid()) {
		if err := os.Chown(path, int(sys.Uid), int(sys.Gid)); err != nil {
			return err
		}
	}
	return nil
}

// relink points the layer above From at the target and drops the merged layers from
// the chain; the top stays and keeps taking writes.
func relink(c *chain.Chain, opts Options, layers []*chain.Layer, target *chain.Layer, res *Result) error {
	above := layers[opts.From-1]
	fresh, err := vhd.Open(target.Path, false)
	if err != nil {
		return err
	}
	var aboveNew *chain.Layer
	opts.Hook("relink-before")
	if opts.From == 1 {
		// The top is open for writing already; it re-links itself under its lock.
		if err := above.Image.SetParent(fresh, target.Path, above.Path); err != nil {
			fresh.Close()
			return err
		}
		aboveNew = above
	} else {
		w, err := vhd.Open(above.Path, true)
		if err != nil {
			fresh.Close()
			return err
		}
		err = w.SetParent(fresh, target.Path, above.Path)
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			fresh.Close()
			return err
		}
		ro, err := vhd.Open(above.Path, false)
		if err != nil {
			fresh.Close()
			return err
		}
		aboveNew = &chain.Layer{Image: ro, Path: above.Path, FoundBy: above.FoundBy}
	}
	opts.Hook("relink-after")
	opts.Logf("merge: %s re-linked to %s", above.Path, target.Path)
	newLayers := append([]*chain.Layer{}, layers[:opts.From-1]...)
	newLayers = append(newLayers, aboveNew, &chain.Layer{Image: fresh, Path: target.Path, FoundBy: "W2ru"})
	newLayers = append(newLayers, layers[opts.From+opts.Depth+1:]...)
	c.Replace(newLayers)
	if aboveNew != above {
		above.Image.Close()
	}
	for _, l := range layers[opts.From : opts.From+opts.Depth+1] {
		l.Image.Close()
		if l != target {
			res.Detached = append(res.Detached, l.Path)
		}
	}
	return nil
}

func tempName(path string) string {
	return filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".vhdfs-merge")
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
