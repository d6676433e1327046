package fileio

import (
	"errors"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Puncher is a file that can punch holes itself. *os.File needs no such method:
// Punch calls fallocate on it.
type Puncher interface {
	Punch(off, n int64) error
}

// Punch makes [off, off+n) of f, which lies inside the file, read as zeros and gives
// its space back where the file system can (fallocate PUNCH_HOLE|KEEP_SIZE); where it
// cannot, it writes the zeros, 64 KiB at a time. The file's size never changes.
func Punch(f io.WriterAt, off, n int64) error {
	if n <= 0 {
		return nil
	}
	err := punch(f, off, n)
	if !errors.Is(err, errors.ErrUnsupported) {
		return err
	}
	zero := make([]byte, min(n, 64<<10))
	for o := off; o < off+n; o += int64(len(zero)) {
		if _, err := f.WriteAt(zero[:min(int64(len(zero)), off+n-o)], o); err != nil {
			return err
		}
	}
	return nil
}

func punch(f any, off, n int64) error {
	switch f := f.(type) {
	case Puncher:
		return f.Punch(off, n)
	case *os.File:
		return PunchFile(f, off, n)
	}
	return errors.ErrUnsupported
}

// PunchFile punches [off, off+n) of f with fallocate, keeping its size; it returns
// errors.ErrUnsupported where the file system cannot.
func PunchFile(f *os.File, off, n int64) error {
	rc, err := f.SyscallConn()
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
