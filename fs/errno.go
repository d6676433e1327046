package fs

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
)

// errno maps an error of chain, an image format or merge to the errno a FUSE request returns.
// It is the only place errors become errnos; unknown errors are EIO, logged, and
// kept for the control file's status (a background mount has no stderr).
func (r *Root) errno(op string, err error) syscall.Errno {
	var en syscall.Errno
	switch {
	case err == nil:
		return 0
	case errors.Is(err, chain.ErrNoSpace), errors.Is(err, image.ErrOutOfRange):
		return syscall.ENOSPC
	case errors.Is(err, chain.ErrReadOnly), errors.Is(err, image.ErrReadOnly):
		return syscall.EROFS
	case errors.Is(err, image.ErrInvalidArg), errors.Is(err, errInvalid):
		return syscall.EINVAL
	case errors.Is(err, errBusy):
		return syscall.EBUSY
	case errors.Is(err, os.ErrExist):
		return syscall.EEXIST
	case errors.Is(err, chain.ErrGone):
		return syscall.ESTALE
	case errors.As(err, &en) && (en == syscall.ENOSPC || en == syscall.EDQUOT || en == syscall.EINTR || en == syscall.EACCES || en == syscall.EPERM):
		return en
	}
	r.logError(fmt.Sprintf("%s: %v", op, err))
	return syscall.EIO
}

var (
	errInvalid = errors.New("invalid command")
	errBusy    = errors.New("a merge is running")
)
