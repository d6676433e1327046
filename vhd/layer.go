package vhd

import (
	"cmp"
	"fmt"
	"path"
	"strings"

	"github.com/vhdfs/vhdfs/image"
)

// What package image asks of a format; the methods that only name another of
// Image's are here, the rest beside what they work on.

var _ image.Image = (*Image)(nil)

// Format is "vhd".
func (img *Image) Format() string { return "vhd" }

// SectorSize is 512: VHD has no other.
func (img *Image) SectorSize() int64 { return SectorSize }

// ID is the footer's unique ID, which a child records as its parent's.
func (img *Image) ID() image.ID { return img.footer.UniqueID }

// ParentID is the dynamic header's parent unique ID; zero unless differencing.
func (img *Image) ParentID() image.ID {
	if h, ok := img.Header(); ok && img.Type() == TypeDifferencing {
		return h.ParentUniqueID
	}
	return image.ID{}
}

// AcceptsParent reports whether id is the parent unique ID the image records.
func (img *Image) AcceptsParent(id image.ID) bool {
	return img.Type() == TypeDifferencing && img.ParentID() == id
}

// SetID is SetUniqueID.
func (img *Image) SetID(id image.ID) error { return img.SetUniqueID(id) }

// ParentHints turns the parent locators into places to look, in the order of the
// specification: W2ru relative to the child, W2ku as an absolute path and then its
// file name beside the child, MacX, then the header's parent name beside the child.
func (img *Image) ParentHints() ([]image.ParentHint, error) {
	locs, err := img.ParentLocations()
	if err != nil {
		return nil, err
	}
	var out []image.ParentHint
	for _, l := range locs {
		switch l.Source {
		case "W2ru":
			out = append(out, image.ParentHint{Path: WindowsToSlash(l.Path), Source: l.Source})
		case "W2ku":
			p := WindowsToSlash(l.Path)
			if strings.HasPrefix(p, "/") {
				out = append(out, image.ParentHint{Path: p, Source: l.Source})
			}
			out = append(out, image.ParentHint{Path: path.Base(p), Source: l.Source})
		case "MacX":
			out = append(out, image.ParentHint{Path: MacXToPath(l.Path), Source: l.Source})
		case "name":
			out = append(out, image.ParentHint{Path: path.Base(WindowsToSlash(l.Path)), Source: l.Source})
		}
	}
	return out, nil
}

// CreateChild makes an empty differencing image at name whose parent is img, with
// img's block size unless o says another.
func (img *Image) CreateChild(name string, o image.ChildOptions) error {
	parentPath := o.ParentPath
	if parentPath == "" {
		parentPath = img.name
	}
	return Create(name, CreateOptions{Type: TypeDifferencing, Parent: img, ParentPath: parentPath,
		LocatorPath: o.LocatorPath, BlockSize: cmp.Or(o.BlockSize, img.BlockSize()), UniqueID: o.ID})
}

// Reopen is ReopenImage for callers that know images by their interface.
func (img *Image) Reopen(writable bool) (image.Image, error) {
	r, err := img.ReopenImage(writable)
	if err != nil {
		return nil, err
	}
	return r, nil
}

// Describe says what the footer and the dynamic header record.
func (img *Image) Describe() image.Description {
	f := img.footer
	d := image.Description{
		Creator: fmt.Sprintf("%s %d.%d", strings.TrimRight(string(f.CreatorApp[:]), "\x00 "), f.CreatorVersion>>16, f.CreatorVersion&0xffff),
	}
	h, ok := img.Header()
	if !ok || img.Type() != TypeDifferencing {
		return d
	}
	d.ParentName = h.ParentName()
	if h.ParentTimestamp != 0 {
		d.ParentTimestamp = Time(h.ParentTimestamp)
	}
	for i, l := range h.ParentLocators {
		if l.PlatformCode == PlatformNone {
			continue
		}
		sp, _ := l.SpaceBytes()
		d.Locators = append(d.Locators, image.Locator{Slot: i, Platform: PlatformName(l.PlatformCode), Path: img.LocatorPath(i),
			Offset: l.PlatformDataOffset, Space: sp, Length: l.PlatformDataLength})
	}
	return d
}
