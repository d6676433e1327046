package merge

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/faults"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/imagelock"
	"github.com/vhdfs/vhdfs/probe"
)

// detachedImage is an image a completed merge took out of the chain, as the merge
// had it open: what its children record of it, and which file it is.
type detachedImage struct {
	path string
	id   image.ID
	file chain.FileID
}

// deleteDetached removes the images the completed merge res left invalid
// (res.Detached), with the authority of the owner of the chain's top image (see
// fileio.AsOwnerOf), and moves them to res.Deleted. It keeps, naming why in
// res.Kept:
//   - every one of them while the chain's merge journal is there (the merge is
//     then not complete on disk);
//   - one still in the chain (by device and inode);
//   - one whose ID an image in one of their directories records as its parent (a
//     sibling chain that still needs it), wherever in those directories either is;
//   - all of them when an image in one of their directories cannot be read, or a
//     directory cannot be listed (it may hold such a child);
//   - one whose name is now a symbolic link, another file or in use by another
//     process, or that cannot be removed;
//   - and below each one kept, the images the merge took out with it, each its
//     child's parent (they are removed in order, top first, so that one that fails
//     to go keeps those below it).
//
// Children in other directories are not looked for (see the README).
//
// Each is unlinked by name in the directory it was listed from, through that
// directory's descriptor, never through a symlink. A name already gone counts as
// removed. The list exists only in memory: after a crash between removals, the
// images left are merged away and invalid, as without Delete, and a re-run of the
// merge does another merge rather than remove them.
func deleteDetached(c *chain.Chain, opts Options, res *Result) {
	if len(res.detached) == 0 {
		return
	}
	top := c.Layers()[0].Path
	err := fileio.AsOwnerOf(top, func() error {
		d := &deleter{c: c, opts: opts, res: res, keep: make([]string, len(res.detached)), dirs: map[string]*os.File{}}
		defer d.close()
		d.run(top)
		return nil
	})
	if err != nil {
		// None was removed: AsOwnerOf failed before it ran anything.
		res.Kept = append(res.Kept, fmt.Sprintf("kept %v: %v", res.Detached, err))
	}
}

type deleter struct {
	c    *chain.Chain
	opts Options
	res  *Result
	keep []string            // per res.detached: why it stays ("" to remove it)
	dirs map[string]*os.File // the directories opened, by the name the paths give
}

func (d *deleter) close() {
	for _, f := range d.dirs {
		f.Close()
	}
}

func (d *deleter) keepAll(why func(x string) string) {
	for i, x := range d.res.detached {
		if d.keep[i] == "" {
			d.keep[i] = why(x.path)
		}
	}
}

func (d *deleter) run(top string) {
	res := d.res
	if j, err := chain.ReadJournal(top); err != nil || j != nil {
		why := fmt.Sprintf("the merge journal %s is still there", chain.JournalPath(top))
		if err != nil {
			why = fmt.Sprintf("the merge journal %s cannot be read (%v)", chain.JournalPath(top), err)
		}
		d.keepAll(func(x string) string { return fmt.Sprintf("kept %s: %s", x, why) })
	}
	live := map[chain.FileID]*chain.Layer{}
	for _, l := range d.c.Layers() {
		live[fileID(l.Image)] = l
	}
	ours := map[chain.FileID]bool{}
	for i, x := range res.detached {
		ours[x.file] = true
		if l := live[x.file]; l != nil && d.keep[i] == "" {
			d.keep[i] = fmt.Sprintf("kept %s: it is still in the chain (as %s)", x.path, l.Path)
		}
	}
	// Each directory once: who there records one of ours as its parent.
	for _, x := range res.detached {
		dir := filepath.Dir(x.path)
		if _, done := d.dirs[dir]; done {
			continue
		}
		f, err := openDir(dir)
		if err != nil {
			d.keepAll(func(x string) string {
				return fmt.Sprintf("kept %s: %s cannot be read, so an image there may record it as its parent (%v)", x, dir, err)
			})
			d.dirs[dir] = nil
			continue
		}
		d.dirs[dir] = f
		d.readSiblings(dir, f, live, ours)
	}
	var left []string
	var touched []string // directories a name was removed from, to sync
	for i, x := range res.detached {
		if d.keep[i] == "" {
			if why := d.remove(x); why != "" {
				d.keep[i] = why
			}
		}
		// A kept image keeps its parent: the merged layers are a chain, each the
		// child of the next (the last one's parent is the target). Decided here, after
		// this one's removal was tried, so that one that failed to go keeps it too.
		if d.keep[i] != "" && i+1 < len(res.detached) && d.keep[i+1] == "" {
			d.keep[i+1] = fmt.Sprintf("kept %s: %s records it as its parent", res.detached[i+1].path, x.path)
		}
		if d.keep[i] != "" {
			left = append(left, x.path)
			res.Kept = append(res.Kept, d.keep[i])
			continue
		}
		res.Deleted = append(res.Deleted, x.path)
		if dir := filepath.Dir(x.path); !slices.Contains(touched, dir) {
			touched = append(touched, dir)
		}
		d.opts.Hook("deleted")
	}
	for _, dir := range touched {
		if err := d.dirs[dir].Sync(); err != nil {
			res.Kept = append(res.Kept, fmt.Sprintf("sync %s after the deletion: %v", dir, err))
		}
	}
	res.Detached = left
}

func openDir(dir string) (*os.File, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	return os.NewFile(uintptr(fd), dir), nil
}

// readSiblings reads the parent IDs the images in dir (open as f) record, through
// image and probe, and keeps each image of ours one of them records, in whichever
// directory it is (a locator may lead elsewhere). An image that cannot be read keeps
// all of ours; a file no format claims is no image.
func (d *deleter) readSiblings(dir string, f *os.File, live map[chain.FileID]*chain.Layer, ours map[chain.FileID]bool) {
	ents, err := f.ReadDir(-1)
	if err != nil {
		d.keepAll(func(x string) string {
			return fmt.Sprintf("kept %s: %s cannot be listed, so an image there may record it as its parent (%v)", x, dir, err)
		})
		return
	}
	for _, e := range ents {
		if e.IsDir() {
			continue
		}
		name := filepath.Join(dir, e.Name())
		var st unix.Stat_t
		if err := unix.Fstatat(int(f.Fd()), e.Name(), &st, 0); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
			continue // a dangling link, a device, a FIFO: not an image
		}
		id := chain.FileID{Dev: uint64(st.Dev), Ino: st.Ino}
		if ours[id] {
			continue // the merged layers: each records the next, dealt with in run
		}
		if l := live[id]; l != nil {
			d.keepChildrenOf(name, l.Image)
			continue
		}
		// Through the descriptor: the directory listed, whatever its path names now.
		via := fmt.Sprintf("/proc/self/fd/%d/%s", f.Fd(), e.Name())
		img, err := probe.Open(via, probe.ForceShare)
		if err != nil {
			// No image unless a format's signature says it is one; one that says so
			// but does not open (or a file that cannot be read at all) may be a child.
			signed, serr := probe.Signed(via)
			if serr == nil && !signed {
				continue
			}
			why := strings.ReplaceAll(err.Error(), via, name)
			if serr != nil {
				why = strings.ReplaceAll(serr.Error(), via, name)
			}
			d.keepAll(func(x string) string {
				return fmt.Sprintf("kept %s: %s cannot be read, so it may record it as its parent (%s)", x, name, why)
			})
			continue
		}
		d.keepChildrenOf(name, img)
		img.Close()
	}
}

// keepChildrenOf keeps each image of ours that img, at name, records as its parent,
// whatever directory either is in.
func (d *deleter) keepChildrenOf(name string, img image.Image) {
	for i, x := range d.res.detached {
		if d.keep[i] == "" && img.AcceptsParent(x.id) {
			d.keep[i] = fmt.Sprintf("kept %s: %s records it as its parent", x.path, name)
		}
	}
}

// remove unlinks x by name in its directory's descriptor if that name is still the
// file the merge took out of the chain and no other process uses it; it returns why
// not, or "" (also when the name is already gone).
func (d *deleter) remove(x detachedImage) string {
	dir := d.dirs[filepath.Dir(x.path)]
	base := filepath.Base(x.path)
	fd := int(dir.Fd())
	var st unix.Stat_t
	err := unix.Fstatat(fd, base, &st, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case errors.Is(err, unix.ENOENT):
		return ""
	case err != nil:
		return fmt.Sprintf("kept %s: %v", x.path, err)
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return fmt.Sprintf("kept %s: it is a symbolic link, not followed: remove it and the image it names yourself", x.path)
	case !sameRegularFile(&st, x.file):
		return fmt.Sprintf("kept %s: it is no longer the file the merge took out of the chain", x.path)
	}
	// Another process that has it open with a lock (a reader of the old chain) keeps it.
	ofd, err := unix.Openat(fd, base, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Sprintf("kept %s: %v", x.path, err)
	}
	of := os.NewFile(uintptr(ofd), x.path)
	defer of.Close()
	// The name may have changed between the stat and the open: the file locked must
	// be the one the merge took out.
	if err := unix.Fstat(ofd, &st); err != nil {
		return fmt.Sprintf("kept %s: %v", x.path, err)
	}
	if !sameRegularFile(&st, x.file) {
		return fmt.Sprintf("kept %s: it is no longer the file the merge took out of the chain", x.path)
	}
	h, err := imagelock.Acquire(of, x.path, imagelock.Writer)
	if err != nil {
		return fmt.Sprintf("kept %s: %v", x.path, err)
	}
	defer h.Release()
	// And the name must still be that file right before it goes (held locked meanwhile).
	err = unix.Fstatat(fd, base, &st, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case errors.Is(err, unix.ENOENT):
		return ""
	case err != nil:
		return fmt.Sprintf("kept %s: %v", x.path, err)
	case !sameRegularFile(&st, x.file):
		return fmt.Sprintf("kept %s: it is no longer the file the merge took out of the chain", x.path)
	}
	if err := faults.Durably(func() error { return unix.Unlinkat(fd, base, 0) }); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Sprintf("kept %s: unlink: %v", x.path, err)
	}
	return ""
}

// sameRegularFile says whether st is of a regular file with the device and inode of id.
func sameRegularFile(st *unix.Stat_t, id chain.FileID) bool {
	return st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Dev) == id.Dev && st.Ino == id.Ino
}
