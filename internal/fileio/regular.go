// Package fileio holds what every image format does with files alike: opening only
// regular files, zero tests, and pacing the writeback of long copies.
package fileio

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// ErrNotRegular: the name is not a regular file (nor a link to one), so it is no
// image: a device, a FIFO, a directory, a socket.
var ErrNotRegular = errors.New("not an image file")

// OpenRegular opens name, which must be a regular file or a symbolic link to one,
// with flag (os.OpenFile's). It never opens anything else: a device, a FIFO or a
// socket has effects on open (a watchdog arms, a tape rewinds, a FIFO's writer
// wakes), so the type is checked first with lstat, and the file is opened with
// O_NOFOLLOW (for a link, its target's resolved path), so that a swap of the last
// component between the check and the open fails instead of opening the newcomer.
// An fstat after the open confirms the file checked is the file opened. A refused
// file's error names it and its type and wraps ErrNotRegular.
func OpenRegular(name string, flag int) (*os.File, error) {
	open, st, err := checkRegular(name)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(open, flag|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	if fst, err := f.Stat(); err != nil || !os.SameFile(st, fst) {
		f.Close()
		return nil, fmt.Errorf("%s: replaced while being opened: %w", name, ErrNotRegular)
	}
	return f, nil
}

// CheckRegular returns an error, wrapping ErrNotRegular, if name is neither a regular
// file nor a symbolic link to one, and the error of lstat if there is nothing there.
// It opens nothing.
func CheckRegular(name string) error {
	_, _, err := checkRegular(name)
	return err
}

// checkRegular does the work of CheckRegular and returns the path to open with
// O_NOFOLLOW (a link's resolved target) and what lstat says of it.
func checkRegular(name string) (string, os.FileInfo, error) {
	st, err := os.Lstat(name)
	if err != nil {
		return "", nil, err
	}
	if st.Mode()&fs.ModeSymlink == 0 {
		if !st.Mode().IsRegular() {
			return "", nil, fmt.Errorf("%s: is %s, not a regular file: %w", name, fileKind(st.Mode()), ErrNotRegular)
		}
		return name, st, nil
	}
	target, err := filepath.EvalSymlinks(name)
	if err != nil {
		return "", nil, err
	}
	if st, err = os.Lstat(target); err != nil {
		return "", nil, err
	}
	if !st.Mode().IsRegular() {
		return "", nil, fmt.Errorf("%s: is a symbolic link to %s, not a regular file: %w", name, fileKind(st.Mode()), ErrNotRegular)
	}
	return target, st, nil
}

// fileKind names the type of a file that is not a regular file, with its article.
func fileKind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeDevice != 0:
		return "a block device"
	case m&fs.ModeNamedPipe != 0:
		return "a FIFO"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeSymlink != 0:
		return "a symbolic link"
	}
	return fmt.Sprintf("a file of type %v", m.Type())
}
