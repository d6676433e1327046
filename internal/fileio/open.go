package fileio

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/imagelock"
)

// writeProtectedOK is set by AllowWriteProtected.
var writeProtectedOK atomic.Bool

// AllowWriteProtected lets OpenImage open files with no write bits for writing, as
// --force-rw asks: for root the mode bits are the owner's word that a file is not to
// be written (as examiners keep evidence), so the process says so explicitly.
func AllowWriteProtected(ok bool) { writeProtectedOK.Store(ok) }

// RefuseWriteProtected returns an error wrapping image.ErrWriteProtected when st, the
// file name that is to be written, has no write bits and the process has not been
// told to write such files (AllowWriteProtected).
func RefuseWriteProtected(name string, st os.FileInfo) error {
	if st.Mode().Perm()&0o222 != 0 || writeProtectedOK.Load() {
		return nil
	}
	return fmt.Errorf("%s: mode %04o, no write bits: not written unless --force-rw (-o force_rw) says so: %w", name, st.Mode().Perm(), image.ErrWriteProtected)
}

// WriteProtected reports whether the file at path has no write bits and the process
// has not been told to write such files (AllowWriteProtected).
func WriteProtected(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().Perm()&0o222 == 0 && !writeProtectedOK.Load()
}

// Opened is an image file as OpenImage opened it.
type Opened struct {
	File     *os.File
	Lock     *imagelock.Handle // nil when opened without a lock
	Dev, Ino uint64
}

// OpenImage opens path, called name in errors, as every format opens its files:
// read-only unless writable, never anything but a regular file (OpenRegular), and
// locked with qemu's protocol (package imagelock) unless noLock: a writer shares
// with readers only, a reader with readers only; joint shares with the process's
// other handles of the file. A path other than name is a /proc/self/fd link of a
// reopen, a file already checked. A file that is not regular gives an error that
// wraps notMine, the format's "not an image of mine", as well as ErrNotRegular.
func OpenImage(path, name string, writable, joint, noLock bool, notMine error) (*Opened, error) {
	// O_NONBLOCK and O_NOCTTY: a parent locator may name a FIFO or a terminal; such
	// an open must neither hang nor take a controlling terminal, should one slip past
	// OpenRegular's check.
	flag := os.O_RDONLY | syscall.O_NONBLOCK | syscall.O_NOCTTY
	if writable {
		flag = os.O_RDWR | syscall.O_NONBLOCK | syscall.O_NOCTTY
	}
	var f *os.File
	var err error
	if path == name {
		if f, err = OpenRegular(path, flag); errors.Is(err, ErrNotRegular) {
			return nil, &notImage{err, notMine}
		} else if err != nil {
			return nil, err
		}
	} else if f, err = os.OpenFile(path, flag, 0); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, &notImage{fmt.Errorf("%s: is %s, not a regular file: %w", name, fileKind(st.Mode()), ErrNotRegular), notMine}
	}
	if writable {
		if err := RefuseWriteProtected(name, st); err != nil {
			f.Close()
			return nil, err
		}
	}
	o := &Opened{File: f}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		o.Dev, o.Ino = uint64(sys.Dev), sys.Ino
	}
	if !noLock {
		need := imagelock.Reader
		if writable {
			need = imagelock.Writer
		}
		need.Joint = joint
		if o.Lock, err = imagelock.Acquire(f, name, need); err != nil {
			f.Close()
			return nil, err
		}
	}
	return o, nil
}

// Close releases the lock and closes the file: for a format that refused it.
func (o *Opened) Close() {
	o.Lock.Release()
	o.File.Close()
}

// notImage is an open refused before any format looked at the file: it says why,
// and wraps the format's own refusal too, for callers that probe.
type notImage struct{ err, notMine error }

func (e *notImage) Error() string   { return e.err.Error() }
func (e *notImage) Unwrap() []error { return []error{e.err, e.notMine} }
