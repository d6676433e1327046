package chain

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/probe"
)

// Scan states of an image (ScannedImage.State).
const (
	StateOK     = "ok"     // every link down to a base holds, by ID
	StateOrphan = "orphan" // a parent ID found among none of the scanned images
	StateStale  = "stale"  // a parent found by its locator, but with another ID now
)

// ScannedImage is one image a scan found, and how it links to the others.
type ScannedImage struct {
	Path     string `json:"path"`
	Format   string `json:"format"`
	Type     string `json:"type"`
	ID       string `json:"id"`
	ParentID string `json:"parent_id,omitempty"`
	// State is the state of the image's chain: ok, or the state of the first link
	// down from it that does not hold (BrokenAt names the child of that link).
	State    string `json:"state"`
	BrokenAt string `json:"broken_at,omitempty"`
	// Parent is the parent's path, found by ID (or, for a stale link, by its
	// locator: the file whose ID changed); ParentCurrentID is that file's ID now,
	// for a stale link.
	Parent          string `json:"parent,omitempty"`
	ParentCurrentID string `json:"parent_current_id,omitempty"`
	// Chain is the image and its ancestors as far as the links hold, top first.
	Chain    []string `json:"chain"`
	Children []string `json:"children,omitempty"`
	Siblings []string `json:"siblings,omitempty"`
	Note     string   `json:"note,omitempty"`
}

// ScanSkip is a file a scan did not take as an image, and why.
type ScanSkip struct {
	Path   string `json:"path"`
	Reason string `json:"reason"`
}

// ScanResult is what Scan found: the images, bases first and each tree together,
// and the files skipped.
type ScanResult struct {
	Images  []ScannedImage `json:"images"`
	Skipped []ScanSkip     `json:"skipped,omitempty"`
}

// ScanOptions says how Scan walks.
type ScanOptions struct {
	Recursive bool // descend into subdirectories
}

type scanned struct {
	img    image.Image
	path   string
	parent *scanned // by ID
	stale  *scanned // the file a locator names, whose ID is no longer the one recorded
	kids   []*scanned
}

// Scan opens every regular file in dirs (and below them, if o.Recursive) that is a
// VHD or VHDX, without any lock and read-only (probe.ForceShare, as qemu-img -U), and
// links each differencing image to its parent among them by the ID it records,
// never by name. A child whose recorded parent ID matches none of them is an
// orphan, unless a locator names one of them whose ID has changed (merged into,
// or written since): then it is stale. A file reached twice (a link) is scanned
// once. Files that are not images or cannot be read are skipped, with the reason.
func Scan(dirs []string, o ScanOptions) (ScanResult, error) {
	var res ScanResult
	var all []*scanned
	defer func() {
		for _, s := range all {
			s.img.Close()
		}
	}()
	seen := map[[2]uint64]bool{}
	var visit func(dir string, top bool) error
	visit = func(dir string, top bool) error {
		ents, err := os.ReadDir(dir)
		if err != nil {
			if top {
				return fmt.Errorf("scan %s: %w", dir, err)
			}
			res.Skipped = append(res.Skipped, ScanSkip{dir, err.Error()})
			return nil
		}
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			st, err := os.Stat(p)
			if err != nil {
				res.Skipped = append(res.Skipped, ScanSkip{p, err.Error()})
				continue
			}
			if st.IsDir() {
				if o.Recursive && e.Type()&os.ModeSymlink == 0 {
					if err := visit(p, false); err != nil {
						return err
					}
				}
				continue
			}
			if err := fileio.CheckRegular(p); err != nil {
				res.Skipped = append(res.Skipped, ScanSkip{p, "not a regular file"})
				continue
			}
			if sys, ok := st.Sys().(*syscall.Stat_t); ok {
				k := [2]uint64{uint64(sys.Dev), sys.Ino}
				if seen[k] {
					continue
				}
				seen[k] = true
			}
			img, err := probe.Open(p, probe.ForceShare)
			if err != nil {
				why := err.Error()
				if errors.Is(err, image.ErrUnknownFormat) {
					why = "not a VHD or VHDX image"
				}
				res.Skipped = append(res.Skipped, ScanSkip{p, why})
				continue
			}
			all = append(all, &scanned{img: img, path: p})
		}
		return nil
	}
	for _, d := range dirs {
		if err := visit(d, true); err != nil {
			return res, err
		}
	}
	link(all)
	res.Images = describeScan(all)
	return res, nil
}

// link finds each differencing image's parent among all by ID, and, failing that,
// the scanned file its locators name (a stale link).
func link(all []*scanned) {
	byFile := map[[2]uint64]*scanned{}
	for _, s := range all {
		dev, ino := s.img.FileID()
		byFile[[2]uint64{dev, ino}] = s
	}
	for _, c := range all {
		if c.img.Type() != image.Differencing {
			continue
		}
		var named []*scanned // what the locators name, in their order
		if cands, err := candidates(c.img, c.path); err == nil {
			for _, cd := range cands {
				if st, err := os.Stat(cd.path); err == nil {
					if sys, ok := st.Sys().(*syscall.Stat_t); ok {
						if p := byFile[[2]uint64{uint64(sys.Dev), sys.Ino}]; p != nil && p != c && !slices.Contains(named, p) {
							named = append(named, p)
						}
					}
				}
			}
		}
		// By ID; among copies of one parent, the one the locators name.
		var byID []*scanned
		for _, p := range all {
			if p != c && p.img.Format() == c.img.Format() && c.img.AcceptsParent(p.img.ID()) {
				byID = append(byID, p)
			}
		}
		switch {
		case len(byID) > 0:
			c.parent = byID[0]
			for _, n := range named {
				if slices.Contains(byID, n) {
					c.parent = n
					break
				}
			}
			c.parent.kids = append(c.parent.kids, c)
		case len(named) > 0:
			c.stale = named[0]
		}
	}
}

func describeScan(all []*scanned) []ScannedImage {
	// Bases first, each tree together: order by the chain read from the base up.
	order := func(s *scanned) string {
		var parts []string
		for x, n := s, 0; x != nil && n <= MaxDepth; x, n = x.parent, n+1 {
			parts = append(parts, x.path)
		}
		slices.Reverse(parts)
		return strings.Join(parts, "\x00")
	}
	sorted := slices.Clone(all)
	sort.SliceStable(sorted, func(i, j int) bool { return order(sorted[i]) < order(sorted[j]) })
	out := make([]ScannedImage, 0, len(sorted))
	for _, s := range sorted {
		im := ScannedImage{Path: s.path, Format: s.img.Format(), Type: s.img.Type().String(), ID: s.img.ID().String(), State: StateOK}
		if pid := s.img.ParentID(); !pid.IsZero() {
			im.ParentID = pid.String()
		}
		switch {
		case s.parent != nil:
			im.Parent = s.parent.path
			for _, k := range s.parent.kids {
				if k != s {
					im.Siblings = append(im.Siblings, k.path)
				}
			}
		case s.stale != nil:
			im.Parent = s.stale.path
			im.ParentCurrentID = s.stale.img.ID().String()
		}
		for _, k := range s.kids {
			im.Children = append(im.Children, k.path)
		}
		x := s
		for n := 0; ; n++ {
			im.Chain = append(im.Chain, x.path)
			if x.img.Type() != image.Differencing {
				break
			}
			if n >= MaxDepth || x.parent == nil {
				im.BrokenAt = x.path
				im.State = StateOrphan
				if x.stale != nil {
					im.State = StateStale
				}
				break
			}
			x = x.parent
		}
		switch {
		case im.State == StateStale && im.BrokenAt == s.path:
			im.Note = fmt.Sprintf("parent %s has ID %s now, this image expects %s: it was merged into or changed after this image was made", s.stale.path, im.ParentCurrentID, im.ParentID)
		case im.State == StateOrphan && im.BrokenAt == s.path:
			im.Note = fmt.Sprintf("no scanned image has parent ID %s", im.ParentID)
		case im.BrokenAt != "":
			im.Note = fmt.Sprintf("its chain breaks below %s (%s)", im.BrokenAt, im.State)
		}
		out = append(out, im)
	}
	return out
}
