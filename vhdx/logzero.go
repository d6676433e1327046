package vhdx

import (
	"errors"

	"github.com/vhdfs/vhdfs/internal/faults"
	"golang.org/x/sys/unix"
)

// zeroRange makes [off, off+n) of f, which lies inside the file, read as zeros
// without writing them: it punches a hole (FALLOC_FL_PUNCH_HOLE), or, to keep the
// space of a fixed image allocated (keepAllocated), zeroes the range in place
// (FALLOC_FL_ZERO_RANGE) first. Only where the file system does neither does it
// write zeros, 64 KiB at a time. A log replay must not write a zero descriptor's
// range: one descriptor can claim terabytes.
func zeroRange(f File, off, n int64, keepAllocated bool) error {
	if _, ok := f.(faults.File); ok {
		if err := faults.Step(); err != nil {
			return err
		}
	}
	if osf, ok := faults.OSFile(f); ok {
		modes := []uint32{unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE}
		if keepAllocated {
			modes[0], modes[1] = modes[1], modes[0]
		}
		rc, err := osf.SyscallConn()
		if err != nil {
			return err
		}
		for _, mode := range modes {
			var ferr error
			if err := rc.Control(func(fd uintptr) {
				for ferr = unix.EINTR; ferr == unix.EINTR; {
					ferr = unix.Fallocate(int(fd), mode, off, n)
				}
			}); err != nil {
				return err
			}
			if ferr == nil {
				return nil
			}
			if !errors.Is(ferr, unix.EOPNOTSUPP) && !errors.Is(ferr, unix.ENOSYS) && !errors.Is(ferr, unix.EINVAL) {
				return ferr
			}
		}
	}
	zero := make([]byte, min(n, 64*KiB))
	for o := off; o < off+n; o += int64(len(zero)) {
		if _, err := f.WriteAt(zero[:min(int64(len(zero)), off+n-o)], o); err != nil {
			return err
		}
	}
	return nil
}
