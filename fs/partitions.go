package fs

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vhdfs/vhdfs/internal/parttable"
)

// partitionsDir lists pN.raw for every partition of disk.raw's current table (MBR
// with its logical partitions, or GPT), numbered as Linux numbers them. The table is
// read again at every listing, lookup and open: the list follows a table rewritten
// through disk.raw within the entry timeout.
type partitionsDir struct {
	fs.Inode
	root *Root
}

// partView is one partition as a window of disk.raw: bytes [start, start+length).
// Its inode number stands for (index, start, length), so the kernel never takes a
// changed partition for the one it cached.
type partView struct {
	index         int
	start, length int64
}

func (v partView) name() string { return fmt.Sprintf("p%d.raw", v.index) }

// partitions reads the table of disk.raw. A disk without a table, or with a damaged
// one (both GPTs, when GPT), has no partitions; an error reading the chain is the
// errno of the read. The caller holds enter.
func (r *Root) partitions() ([]partView, syscall.Errno) {
	size := r.chain.Size()
	tab, err := parttable.Read(r.chain, size, r.chain.Layers()[0].Image.SectorSize())
	if errors.Is(err, parttable.ErrBadTable) {
		r.debugf("partitions: %v", err)
		return nil, 0
	}
	if err != nil {
		return nil, r.errno("partitions", err)
	}
	var out []partView
	for _, p := range tab.Devices(size) {
		out = append(out, partView{p.Index, p.Start, p.End - p.Start})
	}
	return out, 0
}

// partitionExists answers an open of v: 0 while the table still has it, ENOENT once
// it changed. The caller holds enter.
func (r *Root) partitionExists(v *partView) syscall.Errno {
	parts, errno := r.partitions()
	if errno != 0 {
		return errno
	}
	for _, p := range parts {
		if p == *v {
			return 0
		}
	}
	return syscall.ENOENT
}

// partIno gives each partition (index, start, length) ever shown its own inode
// number, from the same counter as layers/.
func (r *Root) partIno(v partView) uint64 {
	r.inoMu.Lock()
	defer r.inoMu.Unlock()
	if ino, ok := r.partInos[v]; ok {
		return ino
	}
	if r.partInos == nil {
		r.partInos = map[partView]uint64{}
	}
	if r.nextIno == 0 {
		r.nextIno = 100
	}
	r.nextIno++
	r.partInos[v] = r.nextIno
	return r.nextIno
}

// dropDiskCache drops the kernel's cached pages of disk.raw in [off, off+n), which a
// write through a partition changed. The kernel may not know disk.raw: nothing to do.
// The caller must not hold enter: the kernel waits for the pages' locks, which a read
// of disk.raw may hold while its request waits to enter behind a Stop.
func (r *Root) dropDiskCache(off, n int64) {
	if n > 0 && r.disk != nil {
		r.disk.NotifyContent(off, n)
	}
}

var _ = (fs.NodeReaddirer)((*partitionsDir)(nil))

func (d *partitionsDir) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	if !d.root.enter() {
		return nil, syscall.EIO
	}
	defer d.root.leave()
	parts, errno := d.root.partitions()
	if errno != 0 {
		return nil, errno
	}
	var ents []fuse.DirEntry
	for _, p := range parts {
		ents = append(ents, fuse.DirEntry{Name: p.name(), Mode: syscall.S_IFREG, Ino: d.root.partIno(p)})
	}
	return fs.NewListDirStream(ents), 0
}

var _ = (fs.NodeLookuper)((*partitionsDir)(nil))

func (d *partitionsDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if !d.root.enter() {
		return nil, syscall.EIO
	}
	defer d.root.leave()
	parts, errno := d.root.partitions()
	if errno != 0 {
		return nil, errno
	}
	for _, p := range parts {
		if p.name() != name {
			continue
		}
		node := &diskNode{root: d.root, part: &p, writable: !d.root.opts.ReadOnly}
		ch := d.NewInode(ctx, node, fs.StableAttr{Mode: syscall.S_IFREG, Ino: d.root.partIno(p)})
		var a fuse.AttrOut
		node.Getattr(ctx, nil, &a)
		out.Attr = a.Attr
		out.SetEntryTimeout(entryTimeout)
		return ch, 0
	}
	return nil, syscall.ENOENT
}

var _ = (fs.NodeGetattrer)((*partitionsDir)(nil))

func (d *partitionsDir) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.root.fillDirAttr(&out.Attr, 2, false)
	return 0
}

var _ = (fs.NodeSetattrer)((*partitionsDir)(nil))

func (d *partitionsDir) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if e := setattrErrno(in); e != 0 {
		return e
	}
	return d.Getattr(ctx, fh, out)
}
