package chain

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/probe"
)

// Snapshot creates name, a new empty differencing image on the current top, and makes
// it the top of a writable chain. Writes wait only for the swap: the top is synced,
// the new image opened (and locked) for writing, and the old top, now a parent, is
// opened read-only instead, so its lock becomes a reader's. Reads never wait.
//
// name must not exist (an error wrapping os.ErrExist). Its locators name the old top
// by its path as the chain found it. The caller serialises Snapshot with merges.
func (c *Chain) Snapshot(name string) (*Layer, error) {
	top := c.Layers()[0]
	if !top.Image.Writable() {
		return nil, fmt.Errorf("snapshot of %s: %w", top.Path, ErrReadOnly)
	}
	if c.Len() >= MaxDepth {
		return nil, fmt.Errorf("snapshot of %s: the chain already holds %d images, the most a chain may: %w", top.Path, c.Len(), ErrTooDeep)
	}
	if real, err := filepath.EvalSymlinks(top.Path); err == nil {
		if j, err := ReadJournal(Abs(real)); err != nil {
			return nil, err
		} else if j != nil {
			return nil, fmt.Errorf("snapshot of %s: %q is pending (journal %s); run it again first: %w", top.Path, j.Command, JournalPath(Abs(real)), ErrPending)
		}
	}
	parentPath := Abs(top.Path)
	// Created before the write lock, which holds writes off only for the swap (the
	// child's parent ID is checked again under it).
	err := top.Image.CreateChild(name, image.ChildOptions{ParentPath: parentPath})
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Layer, error) {
		os.Remove(name)
		return nil, err
	}
	if err := SameOwnerAndMode(name, top.Path); err != nil {
		return fail(fmt.Errorf("snapshot %s: %w", name, err))
	}
	img, err := probe.Open(name, probe.Writable)
	if err != nil {
		return fail(err)
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

// SameOwnerAndMode gives path the permission bits and owner of like: an image that
// takes another's place or role (a new top) is accessible to the same people.
func SameOwnerAndMode(path, like string) error {
	st, err := os.Stat(like)
	if err != nil {
		return err
	}
	if err := os.Chmod(path, st.Mode().Perm()); err != nil {
		return err
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && (int(sys.Uid) != os.Getuid() || int(sys.Gid) != os.Getgid()) {
		return os.Chown(path, int(sys.Uid), int(sys.Gid))
	}
	return nil
}
