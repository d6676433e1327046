package merge

import (
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/probe"
	"github.com/vhdfs/vhdfs/vhd"
	"github.com/vhdfs/vhdfs/vhdx"
)

// testFormats are the formats the merge tests build their chains in: every test that
// builds a chain runs once per format, from the same table (test/chain_test.go keeps
// the same list for the end-to-end tests).
var testFormats = []string{"vhd", "vhdx"}

// forEachFormat runs f as a subtest named after each format of testFormats.
func forEachFormat(t *testing.T, f func(t *testing.T, format string)) {
	t.Helper()
	for _, format := range testFormats {
		t.Run(format, func(t *testing.T) { f(t, format) })
	}
}

// imageName is the file name of an image called name in format: name.vhd; for VHDX
// name.vhdx for a base and name.avhdx for a differencing image, as Hyper-V names them.
func imageName(format, name string, differencing bool) string {
	switch {
	case format == "vhd":
		return name + ".vhd"
	case format == "vhdx" && differencing:
		return name + ".avhdx"
	case format == "vhdx":
		return name + ".vhdx"
	}
	panic("merge test: unknown format " + format)
}

// blockSizes returns the block sizes of a test chain, base first, for format: vhd as
// given; VHDX blocks are 1 MiB to 256 MiB, so there the base keeps its size if it is
// one (zeroRegion is a block of it) and every other image gets its own size of at
// least 1 MiB (a block 16 times the VHD one, at most 32 MiB), so that a merge still
// copies between layers of different block sizes.
func blockSizes(format string, vhdSizes ...int64) []int64 {
	if format == "vhd" {
		return vhdSizes
	}
	out := make([]int64, len(vhdSizes))
	for i, s := range vhdSizes {
		switch {
		case i == 0:
			out[i] = max(s, mib)
		default:
			out[i] = min(max(16*s, mib), 32*mib)
		}
	}
	return out
}

// createBase makes an empty fixed or dynamic image of format at path, of exactly size
// bytes, with blockSize (which a fixed image ignores).
func createBase(t *testing.T, format, path string, typ image.Type, size, blockSize int64) {
	t.Helper()
	var err error
	switch format {
	case "vhd":
		err = vhd.Create(path, vhd.CreateOptions{Type: typ, Size: size, ExactSize: true, BlockSize: blockSize})
	case "vhdx":
		o := vhdx.CreateOptions{Type: typ, Size: size}
		if typ != image.Fixed {
			o.BlockSize = blockSize
		}
		err = vhdx.Create(path, o)
	default:
		t.Fatalf("the merge tests cannot create %s images yet: add a case to createBase", format)
	}
	if err != nil {
		t.Fatalf("create %s: %v", path, err)
	}
}

// createChild makes an empty differencing image at path on parent, in the parent's
// format, with blockSize (0 for the parent's), through image.Image.CreateChild.
func createChild(t *testing.T, parent, path string, blockSize int64) {
	t.Helper()
	p := openImage(t, parent)
	defer p.Close()
	if err := p.CreateChild(path, image.ChildOptions{ParentPath: parent, BlockSize: blockSize}); err != nil {
		t.Fatalf("create %s on %s: %v", path, parent, err)
	}
}

// openImage opens one image read-only, whatever its format.
func openImage(t *testing.T, path string) image.Image {
	t.Helper()
	img, err := probe.Open(path, probe.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	return img
}
