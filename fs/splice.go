package fs

import (
	"os"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/hanwen/go-fuse/v2/splice"
	"golang.org/x/sys/unix"
)

// Which READ replies vhdfs splices from the image files rather than copying. With
// splicing on in go-fuse, a reply only takes go-fuse's splice path if it is a pipe
// (ReadResultPipe); a reply of bytes goes as a ReadResultVector, which go-fuse writes
// with writev and never tries to splice.
var (
	// minSplice: below it, the splice's extra syscalls cost more than a copy. Server
	// CPU per GiB of O_DIRECT reads of a 2 GiB chain, copied / spliced: 64 KiB
	// 0.63 / 0.72 s, 128 KiB 0.56 / 0.43 s, 512 KiB 0.49 / 0.34 s.
	minSplice int64 = 128 << 10
	// maxSplice: go-fuse's own pipe holds the reply's header, the payload and a
	// page, and cannot grow past pipe-max-size; a larger reply would fail its
	// splice, log a line and fall back to a copy.
	maxSplice = int64(splice.MaxPipeSize() - os.Getpagesize() - 64)
	// maxPieces: a reply made of more pieces than this is copied (each piece takes
	// a syscall and at least one of the pipe's slots).
	maxPieces = 32
	// maxRequest is the largest READ vhdfs asks for when it splices: a power of
	// two, so requests stay aligned to the images' blocks.
	maxRequest int64 = 512 << 10
)

// replyBufs is how many pipe buffers a reply of size bytes may take so that go-fuse
// can pass it on whole. go-fuse writes the reply's header into a pipe of its own,
// grown to header + size + a page bytes, and moves ours into it with one pipe-to-pipe
// splice(2), which moves whole buffers and stops at a full pipe: ours must fit in the
// slots left beside the header, one a page, counted without the kernel's rounding up.
// A reply of more buffers (runs split at sector boundaries between layers, zeros
// between them, data at offsets in a file that are not page-aligned: a buffer for
// each page each piece touches) would be moved in part, and go-fuse would take
// the part for a short read at the end of the file and send it as the reply: the
// kernel would then shrink disk.raw's size to where the reply stopped, and a mapping
// of disk.raw past there would fault (SIGBUS).
func replyBufs(size int64) int {
	page := int64(os.Getpagesize())
	slots := (int64(unsafe.Sizeof(fuse.OutHeader{})) + size + page + page - 1) / page
	return int(slots - 1)
}

// spliceRead loads [off, off+size) of the view (which the caller cut to a partition's
// end) into a pipe (chain.SpliceRuns: the pipe
// then holds references to the image files' pages, so a merge may close the files
// before go-fuse sends the reply). It never waits for room: a full pipe, too many
// pieces, a layer not in a plain file or any error, which the copy path reports again,
// make ok false, and the caller copies.
func (n *diskNode) spliceRead(size, off int64) (fuse.ReadResult, bool) {
	pair, err := splice.Get()
	if err != nil {
		return nil, false
	}
	if err := pair.Grow(int(size) + os.Getpagesize()); err != nil {
		splice.Done(pair)
		return nil, false
	}
	total, err := n.chain().SpliceRuns(n.layer, n.base()+off, size, int(pair.WriteFd()), unix.SPLICE_F_NONBLOCK, maxPieces, replyBufs(size))
	if err != nil || total <= 0 {
		splice.Done(pair)
		return nil, false
	}
	return fuse.ReadResultPipe(pair, int(total)), true
}
