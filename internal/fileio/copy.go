package fileio

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/image"
)

// StartWriteback asks the kernel to begin writing f's dirty pages without waiting,
// so that a later Sync of a long sequence of writes (a merge) has less left to do.
func StartWriteback(f *os.File) {
	_ = unix.SyncFileRange(int(f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
}

// WritebackEvery is how many bytes a long copy (a merge, an export) writes between
// calls to StartWriteback: the disk gets busy during the copy, not all at the end.
const WritebackEvery = 64 << 20

// AllZero reports whether p holds only zero bytes.
func AllZero(p []byte) bool {
	for len(p) >= 8 {
		if binary.LittleEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

// CopyRange copies n bytes from src at srcOff to dst at dstOff with
// copy_file_range(2), so the kernel moves them (and XFS or btrfs share them), and
// returns how many whole sectors of sector bytes it copied. A file system that
// refuses gives an error wrapping image.ErrNoKernelCopy; name is dst's, for errors.
func CopyRange(src *os.File, srcOff int64, dst *os.File, dstOff, n, sector int64, name string) (int64, error) {
	var done int64
	for done < n {
		roff, woff := srcOff+done, dstOff+done
		k, err := unix.CopyFileRange(int(src.Fd()), &roff, int(dst.Fd()), &woff, int(n-done), 0)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EXDEV || err == unix.EINVAL || err == unix.EOPNOTSUPP || err == unix.ENOSYS:
			return done / sector * sector, fmt.Errorf("%s: copy_file_range to %d: %v: %w", name, woff, err, image.ErrNoKernelCopy)
		case err != nil:
			return done / sector * sector, fmt.Errorf("%s: copy_file_range to %d: %w", name, woff, err)
		case k == 0:
			return done / sector * sector, fmt.Errorf("%s: copy_file_range from %s at %d: %w", name, src.Name(), roff, io.ErrUnexpectedEOF)
		}
		done += int64(k)
	}
	return done, nil
}
