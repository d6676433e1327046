package probe

import (
	"fmt"

	"github.com/vhdfs/vhdfs/vhd"
	"github.com/vhdfs/vhdfs/vhdx"
)

// Repair repairs what can be repaired in the image at path by itself, and says what
// it did ("" if nothing): a VHD whose footer survives only as its copy at offset 0
// gets it back at the end; a VHDX has its log replayed into the file. A file that
// does not open is left as it is, "" and no error: a check says why.
func Repair(path string) (string, error) {
	img, err := Open(path, ForceShare)
	if err != nil {
		return "", nil
	}
	format := img.Format()
	var copyOnly bool
	if v, ok := img.(*vhd.Image); ok {
		st, _ := v.FooterState()
		copyOnly = st == vhd.FooterCopyOnly
	}
	img.Close()
	switch {
	case format == "vhd" && copyOnly:
		fixed, err := vhd.RepairFooter(path)
		if err != nil || !fixed {
			return "", err
		}
		return "footer at the end restored from the copy at offset 0", nil
	case format == "vhdx":
		n, err := vhdx.Repair(path)
		if err != nil || n == 0 {
			return "", err
		}
		return fmt.Sprintf("replayed %d log entries into the file", n), nil
	}
	return "", nil
}
