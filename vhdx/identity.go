package vhdx

import (
	"fmt"
	"path"
	"strings"

	"github.com/vhdfs/vhdfs/image"
)

// Parent locator keys of a VHDX parent (MS-VHDX §2.6.2.6.3).
const (
	keyParentLinkage  = "parent_linkage"
	keyParentLinkage2 = "parent_linkage2"
	keyRelativePath   = "relative_path"
	keyVolumePath     = "volume_path"
	keyAbsolutePath   = "absolute_win32_path"
)

// ID is the current header's DataWriteGuid: what a child's parent_linkage names.
func (img *Image) ID() image.ID { return img.DataWriteGuid().ID() }

// ParentID is the parent locator's parent_linkage: the DataWriteGuid the parent had
// when this image was made or last linked. Zero for an image without a parent, or
// when the linkage is missing or not a GUID (Check reports that).
func (img *Image) ParentID() image.ID {
	id, _ := img.linkage(keyParentLinkage)
	return id
}

// linkage parses the locator's value of key; zero and false if absent or bad.
func (img *Image) linkage(key string) (image.ID, bool) {
	if !img.meta.Load().HasParent {
		return image.ID{}, false
	}
	v, ok := img.ParentLocator()[key]
	if !ok {
		return image.ID{}, false
	}
	id, err := image.ParseID(v)
	return id, err == nil
}

// AcceptsParent reports whether an image whose ID (DataWriteGuid) is id is this
// image's parent: id is parent_linkage, or a parent_linkage2 that is not zero
// (§2.6.2.6.3; Windows writes parent_linkage2 as zeros, which names no parent).
func (img *Image) AcceptsParent(id image.ID) bool {
	if id.IsZero() {
		return false
	}
	if l, ok := img.linkage(keyParentLinkage); ok && l == id {
		return true
	}
	l2, ok := img.linkage(keyParentLinkage2)
	return ok && !l2.IsZero() && l2 == id
}

// ParentHints lists where the parent locator says the parent is, in the order to
// try them (§2.6.2.6.3): relative_path, relative to this image; then the file names
// of volume_path and absolute_win32_path, to be looked for beside this image (their
// volume and drive mean nothing here). Backslashes become slashes; a path that
// repeats an earlier one is left out. Nil for an image without a parent; a locator
// of another type than VHDX's is an error wrapping ErrUnsupported.
func (img *Image) ParentHints() ([]image.ParentHint, error) {
	if !img.meta.Load().HasParent {
		return nil, nil
	}
	if img.meta.Load().LocatorType != LocatorTypeVHDX {
		return nil, fmt.Errorf("%s: parent locator type %v is not the VHDX type %v: %w", img.name, img.meta.Load().LocatorType, LocatorTypeVHDX, ErrUnsupported)
	}
	kv := img.ParentLocator()
	var hints []image.ParentHint
	add := func(p, source string) {
		if p == "" || p == "." || p == "/" {
			return
		}
		for _, h := range hints {
			if h.Path == p {
				return
			}
		}
		hints = append(hints, image.ParentHint{Path: p, Source: source})
	}
	if v := kv[keyRelativePath]; v != "" {
		add(path.Clean(windowsToSlash(v)), keyRelativePath)
	}
	for _, k := range []string{keyVolumePath, keyAbsolutePath} {
		if v := kv[k]; v != "" {
			add(path.Base(windowsToSlash(v)), k)
		}
	}
	return hints, nil
}

// windowsToSlash turns a Windows path's separators into slashes and drops the
// \\?\ prefix of a long path.
func windowsToSlash(p string) string {
	p = strings.TrimPrefix(p, `\\?\`)
	return strings.ReplaceAll(p, `\`, "/")
}

// SetID gives the image a new DataWriteGuid, durably, through a header update: a
// crash leaves the old header current or the new one. Children that name the old one
// stop accepting this image. Later writes through this handle keep id (a merge sets
// the target's ID first, then writes into it); the FileWriteGuid changes with it
// unless it already did since the open (§2.2.2.1).
func (img *Image) SetID(id image.ID) error {
	if !img.writable {
		return fmt.Errorf("%s: set ID: %w", img.name, ErrReadOnly)
	}
	if id.IsZero() {
		return fmt.Errorf("%s: set ID to zero: %w", img.name, ErrInvalidArg)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.usableLocked(0); err != nil {
		return err
	}
	// The writes made before the new ID are durable under the old one first.
	if err := img.flushPendingLocked(); err != nil {
		return err
	}
	newFile := !img.fileWriteGuidSet
	if err := img.updateHeader(func(h *Header) {
		h.DataWriteGuid = GUIDOf(id)
		if newFile {
			h.FileWriteGuid = NewGUID()
		}
	}); err != nil {
		return err
	}
	img.fileWriteGuidSet, img.dataWriteGuidSet = true, true
	return nil
}

// beginWriteLocked gives the header a new FileWriteGuid and DataWriteGuid before the
// first change of the disk's data through this handle (§2.2.2.1), unless SetID or an
// earlier write did. The caller holds mu for writing.
func (img *Image) beginWriteLocked() error {
	if img.dataWriteGuidSet {
		return nil
	}
	if err := img.updateHeader(func(h *Header) { h.FileWriteGuid, h.DataWriteGuid = NewGUID(), NewGUID() }); err != nil {
		return err
	}
	img.fileWriteGuidSet, img.dataWriteGuidSet = true, true
	return nil
}

var _ image.Image = (*Image)(nil)
