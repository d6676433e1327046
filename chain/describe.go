package chain

import (
	"errors"

	"github.com/vhdfs/vhdfs/image"
)

// LayerInfo describes one image of a chain for people and for JSON.
type LayerInfo struct {
	Depth           int    `json:"depth"`
	Path            string `json:"path"`
	Format          string `json:"format"`
	Type            string `json:"type"`
	VirtualSize     int64  `json:"virtual_size"`
	BlockSize       int64  `json:"block_size,omitempty"`
	SectorSize      int64  `json:"logical_sector_size"`
	AllocatedBytes  int64  `json:"allocated_bytes"`
	Creator         string `json:"creator"`
	UniqueID        string `json:"unique_id"`
	ParentUniqueID  string `json:"parent_unique_id,omitempty"`
	ParentTimestamp string `json:"parent_timestamp,omitempty"`
	ParentName      string `json:"parent_name,omitempty"`
	FoundBy         string `json:"found_by,omitempty"`
	// Locators are the parent locators of a differencing image, in slot order.
	Locators []image.Locator `json:"locators,omitempty"`
	// Fields are what only this layer's format records, for the text output.
	Fields [][2]string `json:"-"`
	// Details are the Fields for JSON.
	Details map[string]string `json:"details,omitempty"`
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
	// Notes says what the open did that a sound chain would not need (Chain.Notes).
	Notes []string `json:"notes,omitempty"`
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
	top, err := openImage(path, o.mode())
	if err != nil {
		return Info{}, err
	}
	var notes []string
	layers, err := walkParents(&Layer{Image: top, Path: path}, o, &notes)
	defer func() {
		for _, l := range layers {
			l.Image.Close()
		}
	}()
	info := describe(layers)
	info.Notes = layerNotes(layers, notes)
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
	d := img.Describe()
	li := LayerInfo{
		Depth:          depth,
		Path:           l.Path,
		Format:         img.Format(),
		Type:           img.Type().String(),
		VirtualSize:    img.Size(),
		BlockSize:      img.BlockSize(),
		SectorSize:     img.SectorSize(),
		AllocatedBytes: img.AllocatedBytes(),
		Creator:        d.Creator,
		UniqueID:       img.ID().String(),
		FoundBy:        l.FoundBy,
		Locators:       d.Locators,
		Fields:         d.Fields,
	}
	for _, f := range d.Fields {
		if li.Details == nil {
			li.Details = map[string]string{}
		}
		li.Details[f[0]] = f[1]
	}
	if img.Type() == image.Differencing {
		li.ParentUniqueID = img.ParentID().String()
		li.ParentName = d.ParentName
		if !d.ParentTimestamp.IsZero() {
			li.ParentTimestamp = d.ParentTimestamp.UTC().Format("2006-01-02T15:04:05Z")
		}
	}
	return li
}
