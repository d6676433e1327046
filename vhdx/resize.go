package vhdx

import "fmt"

// Resize is not implemented for VHDX yet.
func (img *Image) Resize(size int64) error {
	return fmt.Errorf("%s: resize of a VHDX image is not supported yet: %w", img.name, ErrUnsupported)
}
