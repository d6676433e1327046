// Package merge commits layers of a chain into an ancestor with the semantics of
// Windows' MergeVirtualDisk: a copy of every sector the merged layers hold into the
// target, the layer nearest the top winning. Every sector written to the target is
// still shadowed by a merged layer until the chain is re-linked, so the view through
// the top never changes, an interrupted merge leaves a usable chain, and running the
// same merge again completes it.
//
// Writes never wait for a merge. A merge from the top first puts a fresh, empty top
// above the old one, at the top's path (the old top moves beside it); writes go there
// while the old top and the layers below it are merged as a middle range. The re-link
// at the end is one journaled step (see chain.Journal): the target gets a new unique
// ID, so images merged away and siblings of the target refuse to open; the re-linked
// image records it; and for a merge from the top the fresh top takes the old top's
// unique ID, so the old top's own children stay valid.
package merge

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/faults"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/units"
	"github.com/vhdfs/vhdfs/probe"
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
	// Hook, if set, is called at each named point of the merge ("push" once the
	// fresh top is in place, "copy-start", "copy-half", "copy-done", "relink-before"
	// once the journal is written, "relink-parent", "relink-id", "relink-target",
	// "relink-after"); tests use it to stop or kill the process there.
	Hook func(point string)
	// Command names the merge in the journal and in messages; default from the options.
	Command string
	// NoKernelCopy copies by read and write only, never by copy_file_range (to
	// compare the two).
	NoKernelCopy bool
	// Delete removes the images the merge left invalid once it is complete (its
	// journal gone), as Merge-VHD deletes the merged child: see deleteDetached for
	// what it keeps. Hook is called at "deleted" after each removal.
	Delete bool
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
	if o.Command == "" {
		o.Command = fmt.Sprintf("merge depth=%d", o.Depth)
		if o.From > 0 {
			o.Command = fmt.Sprintf("merge from=%d depth=%d", o.From, o.Depth)
		}
		if o.Delete {
			o.Command += " delete"
		}
	}
	return nil
}

// Result of a finished merge.
type Result struct {
	Target   string   // the image that received the data
	Detached []string // images merged away: left on disk, no longer in the chain
	Bytes    int64    // bytes copied
	// With Options.Delete: the images merged away that were removed (no longer in
	// Detached), and why each of Detached was kept ("kept X: ...").
	Deleted []string
	Kept    []string

	detached []detachedImage // the images merged away, for deleteDetached
}

// Message is a line for people.
func (r *Result) Message() string {
	msg := fmt.Sprintf("merged %s into %s", units.Text(r.Bytes), r.Target)
	if len(r.Deleted) > 0 {
		msg += "; deleted the images it left invalid: " + strings.Join(r.Deleted, ", ")
	}
	if len(r.Detached) > 0 {
		msg += "; no longer in the chain (left on disk, now invalid): " + strings.Join(r.Detached, ", ")
	}
	for _, k := range r.Kept {
		msg += "; " + k
	}
	return msg
}

// Merge runs a merge on an open chain whose top is writable. ctx aborts it during the
// copy: the chain then shows the same data (see Result for its shape). It returns
// when the data is durable in the target and the chain has been re-linked (and c
// shows the shorter chain). Writes to c go on throughout.
func Merge(ctx context.Context, c *chain.Chain, opts Options) (*Result, error) {
	if err := opts.Validate(c.Len()); err != nil {
		return nil, err
	}
	top := c.Layers()[0]
	j, err := chain.ReadJournal(top.Path)
	if err != nil {
		return nil, err
	}
	if j != nil && j.Phase == chain.PhaseSnapshot {
		// A snapshot of this chain that could not remove its journal: what is on disk
		// is what c has open.
		if _, err := chain.RecoverSnapshot(j); err != nil {
			return nil, err
		}
		j = nil
	}
	if j != nil {
		return resume(ctx, c, opts, j)
	}
	if err := checkSizes(c.Layers(), opts.From, opts.Depth); err != nil {
		return nil, err
	}
	if opts.From > 0 {
		res, err := mergeRange(ctx, c, opts, opts.From, nil)
		return done(c, opts, res, err)
	}
	p, err := pushTop(c, opts)
	if err != nil {
		return nil, err
	}
	opts.Hook("push")
	res, err := mergeRange(ctx, c, opts, 1, p)
	if err != nil && !p.relinking {
		if uerr := p.undo(c); uerr != nil {
			err = fmt.Errorf("%w; the writes made since the merge began are in a new top image above the old one (%v): the chain shows the same data, and the same merge run again completes it", err, uerr)
		}
	}
	return done(c, opts, res, err)
}

// done removes what the completed merge left invalid, if opts asks for it.
func done(c *chain.Chain, opts Options, res *Result, err error) (*Result, error) {
	if err == nil && opts.Delete {
		deleteDetached(c, opts, res)
	}
	return res, err
}

// resume continues the merge a journal in PhaseCopy records, when opts asks for it.
func resume(ctx context.Context, c *chain.Chain, opts Options, j *chain.Journal) (*Result, error) {
	layers := c.Layers()
	if j.Phase != chain.PhaseCopy {
		return nil, fmt.Errorf("%s: merge journal %s is in phase %s: %w", layers[0].Path, chain.JournalPath(layers[0].Path), j.Phase, chain.ErrJournal)
	}
	if opts.From != 0 || opts.Depth != j.Depth {
		return nil, fmt.Errorf("%s: %q is pending (journal %s); run it again to complete it before another merge: %w", layers[0].Path, j.Command, chain.JournalPath(layers[0].Path), chain.ErrPending)
	}
	if len(layers) < j.Depth+2 || filepath.Base(layers[1].Path) != filepath.Base(j.OldTop) {
		return nil, fmt.Errorf("%s: the chain does not match its merge journal %s (want the old top %s below it): %w", layers[0].Path, chain.JournalPath(layers[0].Path), j.OldTop, chain.ErrJournal)
	}
	if err := checkSizes(layers, 1, j.Depth); err != nil {
		return nil, err
	}
	target := layers[1+j.Depth]
	if err := sameFile(target, j.TargetF); err != nil {
		return nil, err
	}
	real, err := filepath.EvalSymlinks(layers[0].Path)
	if err != nil {
		return nil, err
	}
	oldID, err := image.ParseID(j.AboveID)
	if err != nil {
		return nil, fmt.Errorf("merge journal %s: %w", chain.JournalPath(layers[0].Path), err)
	}
	p := &pushed{real: real, oldTop: j.OldTop, oldTopID: oldID, journal: j}
	res, err := mergeRange(ctx, c, opts, 1, p)
	return done(c, opts, res, err)
}

func checkSizes(layers []*chain.Layer, from, depth int) error {
	// A layer of another size would change the view: past a smaller layer's end the
	// chain reads zeros, past a smaller target's end the data has nowhere to go.
	// Growing a target is not supported.
	first := layers[from]
	for _, l := range layers[from+1 : from+depth+1] {
		if l.Image.Size() != first.Image.Size() {
			return fmt.Errorf("%s: virtual size %d differs from %s (%d); merging layers of different sizes is not supported: %w",
				l.Path, l.Image.Size(), first.Path, first.Image.Size(), ErrTooLarge)
		}
	}
	return nil
}

func sameFile(l *chain.Layer, id chain.FileID) error {
	if got := fileID(l.Image); got != id {
		return fmt.Errorf("%s: is not the file the merge journal names (device/inode %d/%d, journal %d/%d): %w", l.Path, got.Dev, got.Ino, id.Dev, id.Ino, chain.ErrJournal)
	}
	return nil
}

func fileID(img image.Image) chain.FileID {
	dev, ino := img.FileID()
	return chain.FileID{Dev: dev, Ino: ino}
}

// pushed is a fresh top put above the old one by a merge from the top.
type pushed struct {
	real      string // the top's real path (symlinks followed): where the fresh top is
	oldTop    string // where the old top went
	oldTopID  image.ID
	journal   *chain.Journal
	relinking bool // past the point where the push can be undone
}

// pushTop puts a fresh empty differencing image above the top, at the top's real
// path; the old top moves to a hidden name beside it (a hard link made first, then
// the fresh image renamed over the top's name, so every moment has a valid top).
// Writes wait only for this step.
func pushTop(c *chain.Chain, opts Options) (*pushed, error) {
	top := c.Layers()[0]
	real, err := filepath.EvalSymlinks(top.Path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", top.Path, err)
	}
	real = chain.Abs(real)
	if err := top.Image.SameFile(real); err != nil {
		return nil, err
	}
	dir, base := filepath.Dir(real), filepath.Base(real)
	p := &pushed{real: real, oldTop: filepath.Join(dir, "."+base+chain.MergingSuffix), oldTopID: top.Image.ID()}
	fresh := filepath.Join(dir, "."+base+chain.NewTopSuffix)
	for _, leftover := range []string{p.oldTop, fresh} {
		// No journal names them (Merge checked): leftovers of a merge that died before
		// it wrote its journal, or of nothing we know. Never the top itself.
		if top.Image.SameFile(leftover) == nil {
			return nil, fmt.Errorf("%s: is a second name of the top %s; remove it first", leftover, top.Path)
		}
		os.Remove(leftover)
	}
	layers := c.Layers()
	target := layers[opts.Depth]
	newID := image.NewID()
	p.journal = &chain.Journal{Version: 1, Phase: chain.PhaseCopy, Command: opts.Command, Top: real, OldTop: p.oldTop,
		NewTop: fresh, NewTopID: newID.String(), Depth: opts.Depth, Above: real, AboveID: p.oldTopID.String(),
		Target: target.Path, TargetF: fileID(target.Image), TargetOldID: target.Image.ID().String()}
	if err := p.journal.Write(real); err != nil {
		return nil, err
	}
	fail := func(err error) (*pushed, error) {
		faults.Durably(func() error { return os.Remove(fresh) })
		faults.Durably(func() error { return os.Remove(p.oldTop) })
		if jerr := chain.RemoveJournal(real); jerr != nil {
			err = fmt.Errorf("%w; %v", err, jerr)
		}
		return nil, err
	}
	err = top.Image.CreateChild(fresh, image.ChildOptions{ParentPath: p.oldTop, LocatorPath: real, ID: newID})
	var dev, ino uint64
	if err == nil {
		// Owned like the top, through a descriptor: a link put in fresh's place in
		// the top's directory is refused, never chmod'ed or chown'ed.
		dev, ino, err = fileio.OwnLike(fresh, real)
	}
	var img image.Image
	if err == nil {
		// Opened (and locked) before the rename: nothing can fail between the rename
		// and the swap that would leave the mount writing to the moved file.
		img, err = probe.Open(fresh, probe.Writable)
	}
	if err == nil {
		if d, i := img.FileID(); d != dev || i != ino {
			img.Close()
			err = fmt.Errorf("%s was replaced while it was made", fresh)
		}
	}
	if err != nil {
		return fail(err)
	}
	unlock := c.WriteLock()
	defer unlock()
	if err := c.SyncLocked(); err != nil {
		img.Close()
		return fail(err)
	}
	// A write since the fresh top was made may have given the top a new ID (a
	// VHDX's first change of data does; no write reaches the old top after the
	// swap): the journal and the fresh top take the one it has now.
	if id := top.Image.ID(); id != p.oldTopID {
		p.oldTopID, p.journal.AboveID = id, id.String()
		err := p.journal.Write(real)
		if err == nil {
			err = img.SetParent(id, p.oldTop, real)
		}
		if err != nil {
			img.Close()
			return fail(err)
		}
	}
	if err := faults.Durably(func() error { return os.Link(real, p.oldTop) }); err != nil {
		img.Close()
		return fail(fmt.Errorf("link %s to %s: %w", real, p.oldTop, err))
	}
	if err := faults.Durably(func() error { return os.Rename(fresh, real) }); err != nil {
		img.Close()
		return fail(fmt.Errorf("rename %s to %s: %w", fresh, real, err))
	}
	if err := chain.SyncDir(dir); err != nil {
		// The rename happened: the chain on disk is the new one; go on with it.
		opts.Logf("merge: %v", err)
	}
	img.SetName(real)
	newLayers := []*chain.Layer{{Image: img, Path: top.Path}, {Image: top.Image, Path: p.oldTop, FoundBy: chain.FirstLocator(img)}}
	c.Replace(append(newLayers, layers[1:]...))
	opts.Logf("merge: writes now go to a fresh top at %s; the old top is %s until the merge is done", real, p.oldTop)
	return p, nil
}

// undo takes the fresh top away again after a merge from the top failed or was
// aborted, if nothing was written to it: the old top goes back to its name. If
// writes went there, the deeper chain stays (it shows the same data) with its journal.
func (p *pushed) undo(c *chain.Chain) error {
	unlock := c.WriteLock()
	defer unlock()
	layers := c.Layers()
	fresh, old := layers[0], layers[1]
	if filepath.Base(old.Path) != filepath.Base(p.oldTop) {
		return fmt.Errorf("the chain no longer has %s below its top", p.oldTop)
	}
	if n := fresh.Image.AllocatedBytes(); n > 0 {
		return fmt.Errorf("%d bytes were written", n)
	}
	if err := faults.Durably(func() error { return os.Rename(p.oldTop, p.real) }); err != nil {
		return err
	}
	if err := chain.SyncDir(filepath.Dir(p.real)); err != nil {
		return err
	}
	if err := chain.RemoveJournal(p.real); err != nil {
		return err
	}
	c.Replace(append([]*chain.Layer{{Image: old.Image, Path: fresh.Path}}, layers[2:]...))
	fresh.Image.Close()
	return nil
}

// mergeRange merges layers [from, from+Depth) into the layer below them and re-links
// the layer above them to it. p is the push of a merge from the top (from is then 1).
func mergeRange(ctx context.Context, c *chain.Chain, opts Options, from int, p *pushed) (*Result, error) {
	layers := c.Layers()
	to := from + opts.Depth
	target := layers[to]
	res := &Result{Target: target.Path}
	// Identity, not paths: the merge writes the file the chain has open, and only
	// while the target's path still names it (else the re-link would point elsewhere).
	if err := target.Image.SameFile(target.Path); err != nil {
		return res, err
	}
	dst, err := target.Image.Reopen(true)
	if err != nil {
		return res, err
	}
	// The merge fails as a whole on ENOSPC, at a write or at its Sync: no need to
	// reserve each block's space ahead.
	dst.NoReservation()
	if dst.ID() != target.Image.ID() {
		dst.Close()
		return res, fmt.Errorf("%s: unique ID changed since the chain was opened: %w", target.Path, image.ErrReplaced)
	}
	if err := prepare(c, opts, from, to, dst, p); err != nil {
		dst.Close()
		return res, err
	}
	n, err := copyLayers(ctx, c, opts, from, to, dst)
	res.Bytes = n
	if err == nil {
		opts.Hook("copy-done")
		err = ctx.Err()
	}
	if err != nil {
		dst.Close()
		return res, err
	}
	if p != nil {
		p.relinking = true
	}
	err = relink(c, opts, from, dst, p, res)
	return res, err
}

// prepare gives the target an interim unique ID before the copy changes a byte of
// it, and points the last merged layer at that ID: from then on the target's
// siblings, whose view the copy changes, refuse to open, while the chain stays whole
// (it shows the same data throughout: what the copy writes is shadowed). The two
// writes are journaled; Recover completes them if they are cut apart. The chain gets
// fresh read-only handles of both files.
func prepare(c *chain.Chain, opts Options, from, to int, dst image.Image, p *pushed) error {
	layers := c.Layers()
	last, target := layers[to-1], layers[to]
	lastReal, err := realPath(last.Path)
	if err != nil {
		return err
	}
	if err := last.Image.SameFile(lastReal); err != nil {
		return err
	}
	topReal, err := realPath(layers[0].Path)
	if err != nil {
		return err
	}
	midID := image.NewID()
	j := &chain.Journal{Version: 1, Command: opts.Command, Top: topReal, Depth: opts.Depth}
	if p != nil {
		j = p.journal
	}
	j.Phase, j.Last, j.LastF = chain.PhasePrepare, lastReal, fileID(last.Image)
	j.Target, j.TargetF, j.TargetOldID, j.TargetMidID = target.Path, fileID(target.Image), dst.ID().String(), midID.String()
	if err := j.Write(topReal); err != nil {
		return err
	}
	opts.Hook("prepare")
	// The old top of a merge from the top is still open for writing in the chain (an
	// undone merge puts it back on top): it writes through that handle, so its cached
	// layout stays true. Another layer is written through a joint handle of its own,
	// and the chain gets a fresh read-only one.
	w := last.Image
	if !w.Writable() {
		if w, err = last.Image.Reopen(true); err != nil {
			return err
		}
		defer w.Close()
	}
	if err := w.SetParent(midID, target.Path, lastReal); err != nil {
		return err
	}
	opts.Hook("prepare-parent")
	if err := dst.SetID(midID); err != nil {
		return err
	}
	tro, err := dst.Reopen(false)
	if err != nil {
		return err
	}
	newLayers := slices.Clone(layers)
	newLayers[to] = &chain.Layer{Image: tro, Path: target.Path, FoundBy: target.FoundBy}
	if w != last.Image {
		lro, err := w.Reopen(false)
		if err != nil {
			tro.Close()
			return err
		}
		newLayers[to-1] = &chain.Layer{Image: lro, Path: last.Path, FoundBy: last.FoundBy}
	}
	c.Replace(newLayers)
	if w != last.Image {
		last.Image.Close()
	}
	target.Image.Close()
	if p != nil {
		j.Phase = chain.PhaseCopy
		err = j.Write(topReal)
	} else {
		err = chain.RemoveJournal(topReal)
	}
	if err != nil {
		return err
	}
	opts.Logf("merge: %s has the interim unique ID %s; its other children are no longer valid", target.Path, midID)
	return nil
}

// realPath follows symlinks to the file path names, as an absolute path.
func realPath(path string) (string, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return chain.Abs(real), nil
}

// copyLayers writes every sector held by layers [from, to) into dst, a writable
// handle of the target. The chain's read-only handle of the target keeps its cached
// BAT meanwhile: everything it would now read differently is shadowed by a merged
// layer. It returns when the data is durable.
func copyLayers(ctx context.Context, c *chain.Chain, opts Options, from, to int, dst image.Image) (int64, error) {
	size := c.SizeAt(from)
	total, err := presentBytes(c, from, to, size)
	if err != nil {
		return 0, err
	}
	opts.Progress(0, total)
	opts.Hook("copy-start")
	opts.Logf("merge: copying %d bytes from layers %d..%d into %s", total, from, to-1, dst.Name())
	layers := c.Layers()
	const chunk = 4 << 20
	cp := &copier{dst: dst, buf: make([]byte, chunk), kernel: !opts.NoKernelCopy}
	var done, sinceWriteback int64
	halfway := false
	for off := int64(0); off < size; off += chunk {
		if !halfway && done*2 >= total && done > 0 {
			halfway = true
			opts.Hook("copy-half")
		}
		if err := ctx.Err(); err != nil {
			return done, err
		}
		end := min(off+chunk, size)
		for pos := off; pos < end; {
			k, src, err := c.Source(from, to, pos, end-pos)
			if err != nil {
				return done, err
			}
			if src >= 0 {
				if k, err = cp.piece(layers[src].Image, pos, k); err != nil {
					return done, err
				}
				done += k
				sinceWriteback += k
			}
			pos += k
		}
		// Get the disk busy now rather than all at the final fsync.
		if sinceWriteback >= fileio.WritebackEvery {
			dst.StartWriteback()
			sinceWriteback = 0
		}
		opts.Progress(done, total)
	}
	if !halfway {
		opts.Hook("copy-half")
	}
	if err := dst.Sync(); err != nil {
		return done, err
	}
	opts.Logf("merge: %d bytes durable in %s, %d of them copied by copy_file_range", done, dst.Name(), cp.kernelBytes)
	return done, nil
}

// copier copies the pieces of a merge into dst: by copy_file_range where the source
// stores a piece in one run of its file and the target stores it in place (a fixed
// target, an allocated block), else by ReadAt and WriteAt.
type copier struct {
	dst         image.Image
	buf         []byte
	kernel      bool  // false once the file system refused copy_file_range
	kernelBytes int64 // copied by copy_file_range
}

// piece copies the start of [pos, pos+n) from src into dst, n at most len(buf), and
// returns how many bytes it copied (all of them unless a kernel copy stopped early:
// the caller goes on from there).
func (cp *copier) piece(src image.Image, pos, n int64) (int64, error) {
	if cp.kernel {
		if f, foff, m, ok := src.FileRun(pos, n); ok {
			k, err := cp.dst.CopyFrom(f, foff, pos, m)
			cp.kernelBytes += k
			switch {
			case errors.Is(err, image.ErrNoKernelCopy):
				cp.kernel = false
			case errors.Is(err, image.ErrNotInPlace):
			case err != nil:
				return k, err
			}
			if k > 0 {
				return k, nil
			}
		}
	}
	p := cp.buf[:n]
	if _, err := src.ReadAt(p, pos); err != nil {
		return 0, err
	}
	if _, err := cp.dst.WriteAt(p, pos); err != nil {
		return 0, err
	}
	return n, nil
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

// relink is the journaled last step: the layer above the merged range gets the
// target as its parent under the target's new unique ID (and, after a push, the old
// top's ID), then the target takes that ID. The journal, written first, lets the next
// writer finish these steps after a crash (Recover). dst is the merge's writable
// handle of the target; relink closes it.
func relink(c *chain.Chain, opts Options, from int, dst image.Image, p *pushed, res *Result) error {
	defer dst.Close()
	layers := c.Layers()
	to := from + opts.Depth
	above, target := layers[from-1], layers[to]
	aboveReal, err := filepath.EvalSymlinks(above.Path)
	if err != nil {
		return fmt.Errorf("%s: %w", above.Path, err)
	}
	aboveReal = chain.Abs(aboveReal)
	for _, l := range []*chain.Layer{above, target} {
		if err := l.Image.SameFile(l.Path); err != nil {
			return err
		}
	}
	topReal := chain.JournalPath(layers[0].Path)
	topReal = topReal[:len(topReal)-len(chain.JournalSuffix)]
	newID := image.NewID()
	aboveID := above.Image.ID()
	j := &chain.Journal{Version: 1, Phase: chain.PhaseRelink, Command: opts.Command, Top: topReal, Depth: opts.Depth,
		Above: aboveReal, AboveF: fileID(above.Image), AboveID: aboveID.String(),
		Target: target.Path, TargetF: fileID(target.Image), TargetOldID: dst.ID().String(), TargetNewID: newID.String()}
	if p != nil {
		j.OldTop, j.NewTopID, j.AboveID = p.oldTop, aboveID.String(), p.oldTopID.String()
	}
	if err := j.Write(topReal); err != nil {
		return err
	}
	opts.Hook("relink-before")

	// The layer above: the top re-links itself under its own lock; another layer
	// through a joint writable handle, then a fresh read-only one.
	aboveNew := above
	w := above.Image
	if from > 1 || !above.Image.Writable() {
		if w, err = above.Image.Reopen(true); err != nil {
			return err
		}
		defer w.Close()
	}
	if err := w.SetParent(newID, target.Path, aboveReal); err != nil {
		return err
	}
	opts.Hook("relink-parent")
	if p != nil {
		if err := w.SetID(p.oldTopID); err != nil {
			return err
		}
	}
	opts.Hook("relink-id")
	if err := dst.SetID(newID); err != nil {
		return err
	}
	opts.Hook("relink-target")
	fresh, err := dst.Reopen(false)
	if err != nil {
		return err
	}
	if w != above.Image {
		ro, err := w.Reopen(false)
		if err != nil {
			fresh.Close()
			return err
		}
		aboveNew = &chain.Layer{Image: ro, Path: above.Path, FoundBy: above.FoundBy}
	}
	if p != nil {
		if err := faults.Durably(func() error { return os.Remove(p.oldTop) }); err != nil && !errors.Is(err, os.ErrNotExist) {
			opts.Logf("merge: remove %s: %v", p.oldTop, err)
		}
	}
	if err := chain.RemoveJournal(topReal); err != nil {
		opts.Logf("merge: %v", err)
	}
	opts.Hook("relink-after")
	opts.Logf("merge: %s re-linked to %s, which now has unique ID %s", above.Path, target.Path, newID)
	newLayers := append([]*chain.Layer{}, layers[:from-1]...)
	newLayers = append(newLayers, aboveNew, &chain.Layer{Image: fresh, Path: target.Path, FoundBy: chain.FirstLocator(aboveNew.Image)})
	newLayers = append(newLayers, layers[to+1:]...)
	c.Replace(newLayers)
	if aboveNew != above {
		above.Image.Close()
	}
	for _, l := range layers[from : to+1] {
		if p != nil && l == layers[1] {
			// The old top of a push, unlinked above: its last close frees its
			// blocks (half a second per GiB on ext4), which nobody waits for.
			go l.Image.Close()
			continue
		}
		if l != target {
			res.Detached = append(res.Detached, l.Path)
			res.detached = append(res.detached, detachedImage{path: l.Path, id: l.Image.ID(), file: fileID(l.Image)})
		}
		l.Image.Close()
	}
	return nil
}
