package fs

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vhdfs/vhdfs/chain"
)

// layersDir lists N-NAME.raw for every depth N of the current chain; the list
// shrinks when a merge shortens the chain.
type layersDir struct {
	fs.Inode
	root *Root
}

type layerEntry struct {
	name  string
	layer *chain.Layer
	ino   uint64
}

func (d *layersDir) entries() []layerEntry {
	var out []layerEntry
	for i, l := range d.root.chain.Layers() {
		base := strings.TrimSuffix(filepath.Base(l.Path), filepath.Ext(l.Path))
		out = append(out, layerEntry{fmt.Sprintf("%d-%s.raw", i, base), l, d.root.layerIno(l)})
	}
	return out
}

var _ = (fs.NodeReaddirer)((*layersDir)(nil))

func (d *layersDir) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	if !d.root.enter() {
		return nil, syscall.EIO
	}
	defer d.root.leave()
	var ents []fuse.DirEntry
	for _, e := range d.entries() {
		ents = append(ents, fuse.DirEntry{Name: e.name, Mode: syscall.S_IFREG, Ino: e.ino})
	}
	return fs.NewListDirStream(ents), 0
}

var _ = (fs.NodeLookuper)((*layersDir)(nil))

func (d *layersDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if !d.root.enter() {
		return nil, syscall.EIO
	}
	defer d.root.leave()
	for _, e := range d.entries() {
		if e.name != name {
			continue
		}
		node := &diskNode{root: d.root, layer: e.layer}
		ch := d.NewInode(ctx, node, fs.StableAttr{Mode: syscall.S_IFREG, Ino: e.ino})
		var a fuse.AttrOut
		node.Getattr(ctx, nil, &a)
		out.Attr = a.Attr
		out.SetEntryTimeout(entryTimeout)
		return ch, 0
	}
	return nil, syscall.ENOENT
}

var _ = (fs.NodeGetattrer)((*layersDir)(nil))

func (d *layersDir) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.root.fillDirAttr(&out.Attr, 2, false)
	return 0
}

var _ = (fs.NodeSetattrer)((*layersDir)(nil))

func (d *layersDir) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if e := setattrErrno(in); e != 0 {
		return e
	}
	return d.Getattr(ctx, fh, out)
}
