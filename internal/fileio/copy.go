package fileio

import (
	"encoding/binary"
	"os"

	"golang.org/x/sys/unix"
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
