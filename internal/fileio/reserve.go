package fileio

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// Reserver is a file that can reserve the disk space of a range without writing it,
// as fallocate(2) does. *os.File needs no such method: Reserve calls fallocate on it.
type Reserver interface {
	Reserve(off, n int64) error
}

// Reserve makes the file system set aside the space of [off, off+n), which lies
// inside the file, so that writes there later cannot fail for want of room. The
// range reads as it did (zeros, for a hole). It fails with ENOSPC when there is no
// room, and with errors.ErrUnsupported when f or its file system cannot reserve.
func Reserve(f any, off, n int64) error {
	switch f := f.(type) {
	case Reserver:
		return f.Reserve(off, n)
	case *os.File:
		rc, err := f.SyscallConn()
		if err != nil {
			return err
		}
		var ferr error
		if err := rc.Control(func(fd uintptr) {
			for {
				if ferr = unix.Fallocate(int(fd), 0, off, n); ferr != unix.EINTR {
					return
				}
			}
		}); err != nil {
			return err
		}
		if ferr == unix.EOPNOTSUPP {
			return errors.ErrUnsupported
		}
		return ferr
	}
	return errors.ErrUnsupported
}
