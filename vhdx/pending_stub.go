package vhdx

// TEMPORARY: delete this file when branch vhdx-create (create.go, locator.go,
// relink.go) is merged; it brings the real SetParent and CreateChild.

import (
	"fmt"

	"github.com/vhdfs/vhdfs/image"
)

var _ image.Image = (*Image)(nil)

// SetParent is not written yet (branch vhdx-create).
func (img *Image) SetParent(parentID image.ID, parentPath, childPath string) error {
	return fmt.Errorf("%s: set parent: not implemented yet: %w", img.name, ErrUnsupported)
}

// CreateChild is not written yet (branch vhdx-create).
func (img *Image) CreateChild(path string, o image.ChildOptions) error {
	return fmt.Errorf("%s: create child %s: not implemented yet: %w", img.name, path, ErrUnsupported)
}
