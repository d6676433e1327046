package chain

import (
	"errors"
	"fmt"
	"strings"

	"github.com/vhdfs/vhdfs/vhd"
)

// LayerInfo describes one image of a chain for people and for JSON.
type LayerInfo struct {
	Depth           int    `json:"depth"`
	Path            string `json:"path"`
	Type            string `json:"type"`
	VirtualSize     int64  `json:"virtual_size"`
	BlockSize       int64  `json:"block_size,omitempty"`
	AllocatedBytes  int64  `json:"allocated_bytes"`
	Creator         string `json:"creator"`
	UniqueID        string `json:"unique_id"`
	ParentUniqueID  string `json:"parent_unique_id,omitempty"`
	ParentTimestamp string `json:"parent_timestamp,omitempty"`
	ParentName      string `json:"parent_name,omitempty"`
	FoundBy         string `json:"found_by,omitempty"`
	// Locators are the parent locators of a differencing image, in slot order.
	Locators []LocatorInfo `json:"locators,omitempty"`
}

// LocatorInfo is one parent locator: its platform code and the path it holds, and
// where its data lies in the file.
type LocatorInfo struct {
	Slot     int    `json:"slot"`
	Platform string `json:"platform"`
	Path     string `json:"path,omitempty"`
	Offset   uint64 `json:"offset"`
	Space    int64  `json:"space"`
	Length   uint32 `json:"length"`
}

// Info describes a chain.
type Info struct {
	VirtualSize int64       `json:"virtual_size"`
	Layers      []LayerInfo `json:"layers"`
	// Error is set when the chain could not be opened past the last of Layers.
	Error string `json:"error,omitempty"`
	// MissingParent is set when that was because a parent was not found or did not
	// match.
	MissingParent *MissingParent `json:"missing_parent,omitempty"`
}

// MissingParent is a parent that was not found (or whose unique ID did not match):
// whose parent it is, the unique ID the child records, and the paths tried, in order.
type MissingParent struct {
	Child    string   `json:"child"`
	UniqueID string   `json:"unique_id"`
	Tried    []string `json:"tried"`
}

// Inspect opens the chain at path read-only as OpenWith does, describes it and
// closes it. When the top opens but a parent does not, it returns the description
// of the layers it opened, with Error (and MissingParent, if it was the search that
// failed) set, and the error; when the top does not open, only the error.
func Inspect(path string, o OpenOptions) (Info, error) {
	if err := checkJournal(path); err != nil {
		return Info{}, err
	}
	top, err := openImage(path, false, o.ForceShare)
	if err != nil {
		return Info{}, err
	}
	layers, err := walkParents(&Layer{Image: top, Path: path}, o)
	defer func() {
		for _, l := range layers {
			l.Image.Close()
		}
	}()
	info := describe(layers)
	if err != nil {
		info.Error = err.Error()
		var pe *ParentError
		if errors.As(err, &pe) {
			info.MissingParent = &MissingParent{Child: pe.Child, UniqueID: pe.UniqueID.String(), Tried: append([]string{}, pe.Tried...)}
		}
	}
	return info, err
}

// Describe returns the description of every layer, top first.
func Describe(c *Chain) Info { return describe(c.Layers()) }

func describe(layers []*Layer) Info {
	info := Info{VirtualSize: layers[0].Image.Size()}
	for i, l := range layers {
		info.Layers = append(info.Layers, DescribeLayer(i, l))
	}
	return info
}

// DescribeLayer describes one layer at depth.
func DescribeLayer(depth int, l *Layer) LayerInfo {
	img := l.Image
	f := img.Footer()
	li := LayerInfo{
		Depth:          depth,
		Path:           l.Path,
		Type:           img.Type().String(),
		VirtualSize:    img.Size(),
		BlockSize:      img.BlockSize(),
		AllocatedBytes: img.AllocatedBytes(),
		Creator:        fmt.Sprintf("%s %d.%d", strings.TrimRight(string(f.CreatorApp[:]), "\x00 "), f.CreatorVersion>>16, f.CreatorVersion&0xffff),
		UniqueID:       f.UniqueID.String(),
		FoundBy:        l.FoundBy,
	}
	if h, ok := img.Header(); ok && img.Type() == vhd.TypeDifferencing {
		li.ParentUniqueID = h.ParentUniqueID.String()
		li.ParentName = h.ParentName()
		if h.ParentTimestamp != 0 {
			li.ParentTimestamp = vhd.Time(h.ParentTimestamp).Format("2006-01-02T15:04:05Z")
		}
		for i, l := range h.ParentLocators {
			if l.PlatformCode == vhd.PlatformNone {
				continue
			}
			sp, _ := l.SpaceBytes()
			li.Locators = append(li.Locators, LocatorInfo{Slot: i, Platform: vhd.PlatformName(l.PlatformCode), Path: img.LocatorPath(i),
				Offset: l.PlatformDataOffset, Space: sp, Length: l.PlatformDataLength})
		}
	}
	return li
}
