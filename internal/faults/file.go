package faults

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// File is the file of an image opened while the package is armed: each write,
// fsync and truncate spends a step, so a test can cut them as a power loss would.
type File struct{ *os.File }

// Wrap returns f as it should be used now: a File while armed, else f itself.
func Wrap(f *os.File) interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Close() error
	Sync() error
	Stat() (os.FileInfo, error)
	Truncate(size int64) error
} {
	if Armed() {
		return File{f}
	}
	return f
}

func (f File) WriteAt(p []byte, off int64) (int, error) {
	if err := Step(); err != nil {
		return 0, err
	}
	return f.File.WriteAt(p, off)
}

func (f File) Sync() error {
	if err := Step(); err != nil {
		return err
	}
	return f.File.Sync()
}

// Punch punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE): a step, as a write is.
func (f File) Punch(off, n int64) error {
	if err := Step(); err != nil {
		return err
	}
	rc, err := f.File.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) {
		for ferr = unix.EINTR; ferr == unix.EINTR; {
			ferr = unix.Fallocate(int(fd), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		}
	}); err != nil {
		return err
	}
	if ferr == unix.EOPNOTSUPP || ferr == unix.ENOSYS {
		return errors.ErrUnsupported
	}
	return ferr
}

func (f File) Truncate(size int64) error {
	if err := Step(); err != nil {
		return err
	}
	return f.File.Truncate(size)
}

// OSFile returns the *os.File under f, if there is one: f itself or a File's.
func OSFile(f any) (*os.File, bool) {
	switch f := f.(type) {
	case *os.File:
		return f, true
	case File:
		return f.File, true
	}
	return nil, false
}

// SyncDir makes the entries of a folder (a rename, a new or removed file) durable;
// a step of its own.
func SyncDir(dir string) error {
	if err := Step(); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
