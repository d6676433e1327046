package fileio

import (
	"path/filepath"
	"strings"
)

// ParentPaths returns where a parent is as a child's locators record it: relative to
// the folder of the child (starting with "./" or "../", slash-separated) and
// absolute.
func ParentPaths(parentPath, childPath string) (rel, abs string, err error) {
	abs, err = filepath.Abs(parentPath)
	if err != nil {
		return "", "", err
	}
	childAbs, err := filepath.Abs(childPath)
	if err != nil {
		return "", "", err
	}
	rel, err = filepath.Rel(filepath.Dir(childAbs), abs)
	if err != nil {
		return "", "", err
	}
	if !strings.HasPrefix(rel, "../") {
		rel = "./" + rel
	}
	return rel, abs, nil
}
