package vhdx

import (
	"context"
	"fmt"

	"github.com/vhdfs/vhdfs/image"
)

// Compact is not there yet for VHDX: ErrUnsupported.
func (img *Image) Compact(ctx context.Context, o image.CompactOptions) (image.CompactResult, error) {
	return image.CompactResult{}, fmt.Errorf("%s: compact: %w", img.name, ErrUnsupported)
}
