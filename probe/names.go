package probe

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vhdfs/vhdfs/image"
)

// FormatOfName is the format a file's name asks for: Hyper-V names VHDX images
// .vhdx and their checkpoints .avhdx; anything else is taken for a VHD.
func FormatOfName(name string) string {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".vhdx", ".avhdx":
		return "vhdx"
	}
	return "vhd"
}

// ChildName suggests a name like name for a child of the given format: Hyper-V's
// .avhdx for a VHDX checkpoint.
func ChildName(name, format string) string {
	base := strings.TrimSuffix(name, filepath.Ext(name))
	if format == "vhdx" {
		return base + ".avhdx"
	}
	return base + ".vhd"
}

// CheckChildName refuses a name for a new image in a chain of the given format
// ("vhd" or "vhdx") when its extension names the other format: a chain is one
// format throughout, and a VHD named x.vhdx misleads every tool that trusts names.
// A name with no known extension is accepted.
func CheckChildName(name, format string) error {
	ext := strings.ToLower(filepath.Ext(name))
	if !slices.Contains([]string{".vhd", ".vhdx", ".avhdx"}, ext) || FormatOfName(name) == format {
		return nil
	}
	return fmt.Errorf("%s: the name says %s, but the chain is %s, and a chain is one format throughout: name it %s: %w",
		name, strings.ToUpper(FormatOfName(name)), strings.ToUpper(format), ChildName(name, format), image.ErrInvalidArg)
}
