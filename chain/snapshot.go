package chain

import (
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/probe"
)

// Snapshot creates name, a new empty differencing image on the current top, and makes
// it the top of a writable chain. Writes wait only for the swap: the top is synced,
// the new image opened (and locked) for writing, and the old top, now a parent, is
// opened read-only instead, so its lock becomes a reader's. Reads never wait.
//
// name must be a file in the directory that holds the top image (after symlinks) and
// must not exist (an error wrapping os.ErrExist). It is created through a descriptor
// of that directory, never through a symlink or over a file, owned like the top and
// with its mode: whoever may write control gets no file elsewhere and no other owner.
// Its locators name the old top by its path as the chain found it. The caller
// serialises Snapshot with merges.
func (c *Chain) Snapshot(name string) (*Layer, error) {
	top := c.Layers()[0]
	if !top.Image.Writable() {
		return nil, fmt.Errorf("snapshot of %s: %w", top.Path, ErrReadOnly)
	}
	if c.Len() >= MaxDepth {
		return nil, fmt.Errorf("snapshot of %s: the chain already holds %d images, the most a chain may: %w", top.Path, c.Len(), ErrTooDeep)
	}
	real, err := filepath.EvalSymlinks(top.Path)
	if err != nil {
		return nil, fmt.Errorf("snapshot of %s: %w", top.Path, err)
	}
	real = Abs(real)
	if j, err := ReadJournal(real); err != nil {
		return nil, err
	} else if j != nil {
		return nil, fmt.Errorf("snapshot of %s: %q is pending (journal %s); run it again first: %w", top.Path, j.Command, JournalPath(real), ErrPending)
	}
	dir, base := filepath.Split(name)
	dirFD, err := snapshotDir(dir, real, top.Image)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", name, err)
	}
	defer unix.Close(dirFD)
	via := fmt.Sprintf("/proc/self/fd/%d/%s", dirFD, base)
	parentPath := Abs(top.Path)
	// Created before the write lock, which holds writes off only for the swap (the
	// child's parent ID is checked again under it).
	if err := top.Image.CreateChild(via, image.ChildOptions{ParentPath: parentPath, LocatorPath: name}); err != nil {
		return nil, err
	}
	fail := func(err error) (*Layer, error) {
		unix.Unlinkat(dirFD, base, 0)
		return nil, err
	}
	dev, ino, err := fileio.OwnLike(via, real)
	if err != nil {
		return fail(fmt.Errorf("snapshot %s: %w", name, err))
	}
	img, err := probe.Open(name, probe.Writable)
	if err != nil {
		return fail(err)
	}
	if d, i := img.FileID(); d != dev || i != ino {
		img.Close()
		return fail(fmt.Errorf("snapshot %s: the file was replaced while it was made", name))
	}
	unlock := c.WriteLock()
	defer unlock()
	layers := c.Layers()
	old := layers[0]
	if old != top {
		img.Close()
		return fail(fmt.Errorf("snapshot of %s: the top changed meanwhile", top.Path))
	}
	if err := c.SyncLocked(); err != nil {
		img.Close()
		return fail(err)
	}
	// A write since the child was made may have given the top a new ID (a VHDX's
	// first change of data does): the child then records the one it has now.
	if id := old.Image.ID(); !img.AcceptsParent(id) {
		if err := img.SetParent(id, parentPath, name); err != nil {
			img.Close()
			return fail(err)
		}
	}
	ro, err := old.Image.Reopen(false)
	if err != nil {
		img.Close()
		return fail(err)
	}
	fresh := &Layer{Image: img, Path: name}
	c.Replace(append([]*Layer{fresh, {Image: ro, Path: old.Path, FoundBy: FirstLocator(img)}}, layers[1:]...))
	// The swap is done and synced: a failing close loses nothing written.
	if err := old.Image.Close(); err != nil {
		return fresh, fmt.Errorf("snapshot %s made; closing the old top's writable handle: %w", name, err)
	}
	return fresh, nil
}

// snapshotDir opens dir, which must be the directory that holds the top image (at
// real, open as img), for creating in it by descriptor.
func snapshotDir(dir, real string, img image.Image) (int, error) {
	if filepath.Clean(dir) != filepath.Dir(real) {
		return -1, fmt.Errorf("a snapshot is made in the directory of the top image, %s, not in %s: %w", filepath.Dir(real), dir, image.ErrInvalidArg)
	}
	fd, err := unix.Open(filepath.Dir(real), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", filepath.Dir(real), err)
	}
	var st unix.Stat_t
	dev, ino := img.FileID()
	if err := unix.Fstatat(fd, filepath.Base(real), &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || uint64(st.Dev) != dev || st.Ino != ino {
		unix.Close(fd)
		return -1, fmt.Errorf("%s no longer holds the top image %s", filepath.Dir(real), real)
	}
	return fd, nil
}
