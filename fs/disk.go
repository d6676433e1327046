package fs

import (
	"context"
	"io"
	"slices"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/chain"
)

// diskNode is a raw view of the chain from depth down: disk.raw (depth 0, writable
// unless the mount is read-only), the files of layers/ (read-only) and those of
// partitions/ (a window of disk.raw, writable as disk.raw is).
type diskNode struct {
	fs.Inode
	root     *Root
	layer    *chain.Layer // the view's top layer; nil for disk.raw, which follows the chain's top
	part     *partView    // the window of disk.raw this view shows; nil for the whole view
	writable bool
}

// diskHandle exists so Setattr can tell ftruncate (which names a handle) from the
// size change the kernel sends for open(O_TRUNC) (which does not), and so Write
// knows an O_DIRECT open.
type diskHandle struct {
	// direct: opened with O_DIRECT. With ASYNC_DIO the kernel sends the requests of
	// such a write together and fails the whole write with EIO when one comes back
	// short, so a write of this handle that crosses the end is refused (ENOSPC)
	// before it writes anything, rather than written up to the end.
	direct bool
}

func (n *diskNode) chain() *chain.Chain { return n.root.chain }

// size of this view, or -1 if the layer left the chain (a merge shortened it).
func (n *diskNode) size() int64 {
	if n.part != nil {
		return max(min(n.part.length, n.chain().Size()-n.part.start), 0)
	}
	if n.layer != nil {
		if !n.chain().Contains(n.layer) {
			return -1
		}
		return n.layer.Image.Size()
	}
	return n.chain().Size()
}

// base is where the view starts in the chain's view.
func (n *diskNode) base() int64 {
	if n.part != nil {
		return n.part.start
	}
	return 0
}

// clip cuts a request of count bytes at off to the end of a partition's window; for
// other views it returns count.
func (n *diskNode) clip(off, count int64) int64 {
	if n.part == nil {
		return count
	}
	if off < 0 {
		return 0
	}
	return max(min(count, n.size()-off), 0)
}

func (n *diskNode) readAt(p []byte, off int64) (int, error) {
	if n.part != nil {
		p = p[:n.clip(off, int64(len(p)))]
		if len(p) == 0 {
			return 0, io.EOF
		}
		return n.chain().ReadAt(p, n.base()+off)
	}
	if n.layer == nil {
		return n.chain().ReadAt(p, off)
	}
	return n.chain().ReadAtLayer(n.layer, p, off)
}

func (n *diskNode) run(off, count int64) (int64, bool, error) {
	if n.layer == nil {
		return n.chain().Run(0, n.base()+off, n.clip(off, count))
	}
	return n.chain().RunLayer(n.layer, off, count)
}

var _ = (fs.NodeGetattrer)((*diskNode)(nil))

func (n *diskNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.root.fillAttr(&out.Attr, n.writable)
	out.Size = uint64(max(n.size(), 0))
	// A block size set keeps go-fuse from putting the size in Blocks.
	out.Blocks, out.Blksize = n.blocks(out.Size), 4096
	return 0
}

// blocks is what the view takes on disk, in 512-byte blocks, as du, ls -s and
// qemu-img info show it: the space of the image files of the view's layers (disk.raw:
// the whole chain; a layer's view: from its depth down), each a stat of a file, so a
// getattr costs one system call per layer whatever the image claims. A partition's
// view, a window of them, shows its size.
func (n *diskNode) blocks(size uint64) uint64 {
	if n.part != nil {
		return (size + 511) / 512
	}
	layers := n.chain().Layers()
	if n.layer != nil {
		i := slices.Index(layers, n.layer)
		if i < 0 {
			return 0 // gone from the chain
		}
		layers = layers[i:]
	}
	var b uint64
	for _, l := range layers {
		var st unix.Stat_t
		if unix.Stat(l.Path, &st) == nil {
			b += uint64(st.Blocks)
		}
	}
	return b
}

var _ = (fs.NodeOpener)((*diskNode)(nil))

func (n *diskNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.open(flags)
	if fh != nil {
		fh.direct = flags&syscall.O_DIRECT != 0
		return fh, fl, errno
	}
	return nil, fl, errno
}

func (n *diskNode) open(flags uint32) (*diskHandle, uint32, syscall.Errno) {
	if !n.root.enter() {
		return nil, 0, syscall.EIO
	}
	defer n.root.leave()
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY && !n.writable {
		return nil, 0, syscall.EROFS
	}
	if n.size() < 0 {
		return nil, 0, syscall.ENOENT
	}
	if n.part != nil {
		// Only a partition the table still has opens. The kernel caches nothing of
		// it: writes through disk.raw and the other partitions show at once.
		if errno := n.root.partitionExists(n.part); errno != 0 {
			return nil, 0, errno
		}
		return &diskHandle{}, fuse.FOPEN_DIRECT_IO, 0
	}
	// The kernel may keep pages of disk.raw across opens: every change to it goes
	// through this mount, and a merge leaves it byte-identical. A layer's view does
	// change when a merge writes into it, so its cache goes at each open.
	if n.layer != nil {
		return &diskHandle{}, 0, 0
	}
	if n.root.opts.DirectIO {
		return &diskHandle{}, fuse.FOPEN_DIRECT_IO, 0
	}
	return &diskHandle{}, fuse.FOPEN_KEEP_CACHE, 0
}

var _ = (fs.NodeReader)((*diskNode)(nil))

// Read splices the replies large enough for a splice to win (see minSplice) from
// the image files; it copies the rest.
func (n *diskNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if !n.root.enter() {
		return nil, syscall.EIO
	}
	defer n.root.leave()
	dest = dest[:n.clip(off, int64(len(dest)))]
	if want := int64(len(dest)); want >= minSplice && want <= maxSplice && n.root.splice {
		if r, ok := n.spliceRead(want, off); ok {
			return r, 0
		}
	}
	k, err := n.readAt(dest, off)
	if err != nil && err != io.EOF {
		return nil, n.root.errno("read", err)
	}
	// A vector, not ReadResultData: go-fuse writes it with writev and does not
	// try (and fail) to splice it.
	return fuse.ReadResultVector([][]byte{dest[:k]}), 0
}

var _ = (fs.NodeWriter)((*diskNode)(nil))

// Write through a partition drops the pages of disk.raw it changed from the kernel's
// cache, once the write no longer holds the mount (see dropDiskCache).
func (n *diskNode) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	h, _ := fh.(*diskHandle)
	k, errno := n.write(data, off, h != nil && h.direct)
	if n.part != nil && k > 0 {
		n.root.dropDiskCache(n.base()+off, int64(k))
	}
	return k, errno
}

func (n *diskNode) write(data []byte, off int64, direct bool) (uint32, syscall.Errno) {
	if !n.root.enter() {
		return 0, syscall.EIO
	}
	defer n.root.leave()
	if !n.writable {
		return 0, syscall.EROFS
	}
	if direct && off+int64(len(data)) > n.size() {
		return 0, syscall.ENOSPC // see diskHandle
	}
	if n.part != nil {
		// Past the partition's end as past the disk's: what fits is written, the
		// rest fails with ENOSPC.
		if data = data[:n.clip(off, int64(len(data)))]; len(data) == 0 {
			return 0, syscall.ENOSPC
		}
	}
	k, err := n.chain().WriteAt(data, n.base()+off) // waits while a merge from the top runs
	if k > 0 {
		return uint32(k), 0
	}
	return 0, n.root.errno("write", err)
}

var _ = (fs.NodeAllocater)((*diskNode)(nil))

// Allocate answers fallocate: FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE and
// FALLOC_FL_ZERO_RANGE (with or without KEEP_SIZE) make the range read zeros
// (chain.Discard), which is how a loop device passes on its discards; a range past
// the end is cut there with KEEP_SIZE and refused without it, as a size change is.
// Every other mode is EOPNOTSUPP. In a partition, the range is cut at its end.
func (n *diskNode) Allocate(ctx context.Context, fh fs.FileHandle, off uint64, size uint64, mode uint32) syscall.Errno {
	errno := n.allocate(off, size, mode)
	if n.part != nil && errno == 0 {
		n.root.dropDiskCache(n.base()+int64(off), n.clip(int64(off), int64(size)))
	}
	return errno
}

func (n *diskNode) allocate(off uint64, size uint64, mode uint32) syscall.Errno {
	if !n.root.enter() {
		return syscall.EIO
	}
	defer n.root.leave()
	const (
		keepSize  = 0x01 // FALLOC_FL_KEEP_SIZE
		punchHole = 0x02 // FALLOC_FL_PUNCH_HOLE
		zeroRange = 0x10 // FALLOC_FL_ZERO_RANGE
	)
	switch mode {
	case punchHole | keepSize, zeroRange | keepSize:
	case zeroRange:
		if off+size > uint64(max(n.size(), 0)) {
			return syscall.EINVAL
		}
	default:
		return syscall.EOPNOTSUPP
	}
	if !n.writable {
		return syscall.EROFS
	}
	if int64(off) < 0 || int64(size) < 0 {
		return syscall.EINVAL
	}
	if n.part != nil {
		if size = uint64(n.clip(int64(off), int64(size))); size == 0 {
			return 0
		}
	}
	return n.root.errno("fallocate", n.chain().Discard(n.base()+int64(off), int64(size)))
}

var _ = (fs.NodeSetattrer)((*diskNode)(nil))

func (n *diskNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if e := setattrErrno(in); e != 0 {
		return e
	}
	if sz, ok := in.GetSize(); ok && int64(sz) != n.size() {
		// open(O_TRUNC) arrives as a size change with no handle: a block device
		// ignores O_TRUNC, and so do we. ftruncate and truncate to a size fail.
		if fh != nil || sz != 0 {
			return syscall.EINVAL
		}
		if !n.writable {
			return syscall.EROFS
		}
	}
	return n.Getattr(ctx, fh, out)
}

var _ = (fs.NodeFsyncer)((*diskNode)(nil))

func (n *diskNode) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	if !n.root.enter() {
		return syscall.EIO
	}
	defer n.root.leave()
	if !n.writable {
		return 0
	}
	return n.root.errno("fsync", n.chain().Sync())
}

var _ = (fs.NodeFlusher)((*diskNode)(nil))

// Flush on close does nothing: durability is fsync's job, as for a block device.
func (n *diskNode) Flush(ctx context.Context, fh fs.FileHandle) syscall.Errno { return 0 }

var _ = (fs.NodeLseeker)((*diskNode)(nil))

// Lseek answers SEEK_DATA and SEEK_HOLE from the chain's extents, so sparse-aware
// tools (cp --sparse, qemu-img) skip what no layer stores.
func (n *diskNode) Lseek(ctx context.Context, fh fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	if !n.root.enter() {
		return 0, syscall.EIO
	}
	defer n.root.leave()
	size := n.size()
	if int64(off) >= size {
		return 0, syscall.ENXIO
	}
	const seekData, seekHole = 3, 4
	want := whence == seekData
	for pos := int64(off); pos < size; {
		k, present, err := n.run(pos, size-pos)
		if err != nil {
			return 0, n.root.errno("lseek", err)
		}
		if present == want {
			return uint64(pos), 0
		}
		pos += k
	}
	if want {
		return 0, syscall.ENXIO
	}
	return uint64(size), 0
}
