package chain

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/probe"
)

// candidate is one path a locator suggests for the parent.
type candidate struct {
	path, source string
}

// candidates lists where to look for child's parent, in the order its locators give
// (image.ParentHints). Relative paths are relative to the file the child is (as
// blktap resolves them, through realpath), then to the link that named it, if that
// is elsewhere.
func candidates(child image.Image, childPath string) ([]candidate, error) {
	hints, err := child.ParentHints()
	if err != nil {
		return nil, err
	}
	dirs := []string{filepath.Dir(childPath)}
	if real, err := filepath.EvalSymlinks(childPath); err == nil && filepath.Dir(real) != dirs[0] {
		dirs = []string{filepath.Dir(real), dirs[0]}
	}
	var out []candidate
	for _, h := range hints {
		p := h.Path
		switch {
		case p == "" || p == "." || p == "/":
		case filepath.IsAbs(p):
			out = append(out, candidate{filepath.Clean(p), h.Source})
		default:
			for _, dir := range dirs {
				out = append(out, candidate{filepath.Clean(filepath.Join(dir, p)), h.Source})
			}
		}
	}
	return out, nil
}

// FindParentAt opens (read-only) the image at parentPath as the parent of child,
// looking nowhere else, and fails, as a search of the locators does, if it is missing or its unique
// ID is not the one the child records.
func FindParentAt(child image.Image, childPath, parentPath string) (*Layer, error) {
	return findParent(child, childPath, parentPath, probe.ReadOnly)
}

// GivenBy is Layer.FoundBy for a parent given by hand (OpenOptions.Parents).
const GivenBy = "--parent"

// ParentError is a failed search for a parent: the child, the unique ID it records
// for its parent, and the paths tried, in order. Err says why and wraps
// image.ErrParentMissing, image.ErrParentMismatch or the error that opening a candidate
// gave.
type ParentError struct {
	Child    string
	UniqueID image.ID
	Tried    []string
	Err      error
}

func (e *ParentError) Error() string { return e.Err.Error() }
func (e *ParentError) Unwrap() error { return e.Err }

// findParent looks for the parent of child at given alone if it is not "", else
// where the locators say.
func findParent(child image.Image, childPath, given string, m probe.Mode) (*Layer, error) {
	want := child.ParentID()
	var cands []candidate
	if given != "" {
		cands = []candidate{{given, GivenBy}}
	} else {
		var err error
		if cands, err = candidates(child, childPath); err != nil {
			return nil, err
		}
	}
	var tried []string
	fail := func(err error) (*Layer, error) {
		return nil, &ParentError{Child: childPath, UniqueID: want, Tried: tried, Err: err}
	}
	var mismatches []string
	var openErr, formatErr error
	// Two locators may lead to one file by different paths (relative and absolute,
	// through a linked directory): each file is tried, and named, once.
	done := map[string]bool{}
	var seen []os.FileInfo
	for _, c := range cands {
		key := c.path
		if abs, err := filepath.Abs(c.path); err == nil {
			key = abs
		}
		if done[key] {
			continue
		}
		done[key] = true
		if st, err := os.Stat(c.path); err == nil {
			if slices.ContainsFunc(seen, func(fi os.FileInfo) bool { return os.SameFile(fi, st) }) {
				continue
			}
			seen = append(seen, st)
		}
		tried = append(tried, c.path)
		// A device or a FIFO is refused before anything opens it: opening one can
		// have effects (a watchdog arms, a tape rewinds).
		if err := fileio.CheckRegular(c.path); err != nil {
			if errors.Is(err, fileio.ErrNotRegular) && openErr == nil {
				openErr = err
			}
			continue
		}
		img, err := openImage(c.path, m)
		if errors.Is(err, image.ErrLocked) {
			// Locked: if it is the parent, that ends the search (a later locator may
			// name a copy elsewhere, which is not this chain's parent).
			if peek, perr := probe.Open(c.path, probe.ForceShare); perr == nil {
				same := child.AcceptsParent(peek.ID())
				peek.Close()
				if same {
					return fail(fmt.Errorf("%s: parent: %w", childPath, err))
				}
			}
		}
		if err != nil {
			if openErr == nil {
				openErr = err
			}
			continue
		}
		if img.Format() != child.Format() {
			img.Close()
			if formatErr == nil {
				formatErr = fmt.Errorf("%s: parent %s is a %s image, but a %s image's parent must be %s too: %w", childPath, c.path, strings.ToUpper(img.Format()), strings.ToUpper(child.Format()), strings.ToUpper(child.Format()), image.ErrMixedFormats)
			}
			continue
		}
		if got := img.ID(); !child.AcceptsParent(got) {
			img.Close()
			mismatches = append(mismatches, fmt.Sprintf("parent found at %s, but its unique ID changed (%s, this image expects %s): it was modified (merged into) or replaced after this image was made; this image is no longer valid", c.path, got, want))
			continue
		}
		return &Layer{Image: img, Path: c.path, FoundBy: c.source}, nil
	}
	switch {
	case formatErr != nil && len(mismatches) == 0:
		return fail(formatErr)
	case openErr != nil && len(mismatches) == 0:
		return fail(fmt.Errorf("%s: parent: %w", childPath, openErr))
	case len(mismatches) > 0:
		return fail(fmt.Errorf("%s: %s: %w", childPath, strings.Join(mismatches, "; "), image.ErrParentMismatch))
	case len(tried) == 0:
		return fail(fmt.Errorf("%s: no parent locator or parent name to find parent %s by: %w", childPath, want, image.ErrParentMissing))
	}
	return fail(fmt.Errorf("%s: parent %s not found (tried %s): %w", childPath, want, strings.Join(tried, ", "), image.ErrParentMissing))
}
