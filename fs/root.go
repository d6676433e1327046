// Package fs serves a chain of virtual disks (VHD or VHDX) over FUSE: disk.raw (the whole chain), layers/ (the
// view from each depth down), partitions/ (a window of disk.raw per partition) and
// control (commands in, JSON state out). Nodes are
// thin: checks, locks, then a call into chain or merge.
package fs

import (
	"context"
	"fmt"
	"log"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/hanwen/go-fuse/v2/splice"
	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/chain"
)

// Options of a mount.
type Options struct {
	ReadOnly   bool
	AllowOther bool
	Debug      bool
	// Logger receives the debug lines and error details; default log.Default().
	Logger *log.Logger
	// MergeHook is passed to every merge as merge.Options.Hook, and to every
	// snapshot (chain.SnapshotWith).
	MergeHook func(point string)
	// Access gives the owner and mode of disk.raw and layers/ (the data); nil: the
	// mounting user, 0644.
	Access *Access
	// Control gives the owner and mode of control: the top image file's, never what
	// the uid=, gid= and umask= options give the data, for a command written there
	// acts with the mount process's authority. nil: the same as Access.
	Control *Access
	// FsName is the source the mount table shows; default: the top image's path.
	FsName string
	// ReadAheadKB is the read-ahead of the mount's backing device, set in sysfs after
	// mounting (root only); 0: DefaultReadAheadKB.
	ReadAheadKB int
	// DirectIO opens disk.raw without the page cache (FOPEN_DIRECT_IO): every read
	// reaches vhdfs in the reader's own request size, and nothing stays cached.
	DirectIO bool
}

// DefaultReadAheadKB is the read-ahead vhdfs sets on its mounts: the kernel gives a
// FUSE mount 128 KiB, which makes every sequential READ a round trip of 128 KiB.
const DefaultReadAheadKB = 1024

// Access is the owner and the permission bits of disk.raw and control. The files of
// layers/ (and all files of a read-only mount) lose the write bits; directories get
// x wherever r is set.
type Access struct {
	Uid, Gid uint32
	Perm     uint32 // 0o666 at most
}

// Root is the root directory of a mount and the state behind it.
type Root struct {
	fs.Inode
	chain *chain.Chain
	opts  Options
	mtime time.Time

	ctl *control
	// splice: large READ replies are spliced from the image files (see Read);
	// set at mount, where pipes can be resized to hold a whole request.
	splice bool

	controlIno atomic.Uint64 // inode numbers of control, one per lookup

	errMu  sync.Mutex
	errors []string // guarded by errMu: the latest I/O errors, for the status

	inoMu    sync.Mutex
	inos     map[*chain.Layer]uint64 // guarded by inoMu
	partInos map[partView]uint64     // guarded by inoMu
	nextIno  uint64                  // guarded by inoMu

	disk *fs.Inode // disk.raw, set in OnAdd

	// serving is read-held by each request that reaches the chain; Stop takes it to
	// wait for them. stopped is set (under serving) once no request may reach it.
	serving sync.RWMutex
	stopped atomic.Bool
}

// enter admits a request to the chain; false once the mount is stopped. A true
// return must be paired with leave.
func (r *Root) enter() bool {
	r.serving.RLock()
	if r.stopped.Load() {
		r.serving.RUnlock()
		return false
	}
	return true
}

func (r *Root) leave() { r.serving.RUnlock() }

// Stop ends the serving of the chain: requests on disk.raw, layers/ and new opens
// of control fail with EIO from now on, and Stop returns once those in flight have
// answered. It is for a mount process that must close its chain while the kernel
// still holds the mount (another mount namespace has it); abort a merge first, as a
// write waits for one.
func (r *Root) Stop() {
	r.stopped.Store(true)
	r.serving.Lock()
	defer r.serving.Unlock()
}

// layerIno gives each layer that ever appears under layers/ its own inode number, so
// the kernel never mixes the cache of one layer's view with another's.
func (r *Root) layerIno(l *chain.Layer) uint64 {
	r.inoMu.Lock()
	defer r.inoMu.Unlock()
	if ino, ok := r.inos[l]; ok {
		return ino
	}
	if r.inos == nil {
		r.inos = map[*chain.Layer]uint64{}
	}
	if r.nextIno == 0 {
		r.nextIno = 100
	}
	r.nextIno++
	r.inos[l] = r.nextIno
	return r.nextIno
}

// NewRoot returns the root node for serving c.
func NewRoot(c *chain.Chain, opts Options) *Root {
	if opts.Logger == nil {
		opts.Logger = log.Default()
	}
	if opts.Access == nil {
		opts.Access = &Access{Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid()), Perm: 0o644}
	}
	if opts.Control == nil {
		opts.Control = opts.Access
	}
	r := &Root{chain: c, opts: opts, mtime: time.Now()}
	r.ctl = newControl(r)
	return r
}

var _ = (fs.NodeOnAdder)((*Root)(nil))

func (r *Root) OnAdd(ctx context.Context) {
	disk := r.NewPersistentInode(ctx, &diskNode{root: r, writable: !r.opts.ReadOnly}, fs.StableAttr{Ino: 2})
	r.AddChild("disk.raw", disk, false)
	r.disk = disk
	r.controlIno.Store(1 << 32)
	ctl := r.NewPersistentInode(ctx, &controlNode{root: r}, fs.StableAttr{Ino: 3})
	r.AddChild("control", ctl, false)
	layers := r.NewPersistentInode(ctx, &layersDir{root: r}, fs.StableAttr{Mode: syscall.S_IFDIR, Ino: 4})
	r.AddChild("layers", layers, false)
	parts := r.NewPersistentInode(ctx, &partitionsDir{root: r}, fs.StableAttr{Mode: syscall.S_IFDIR, Ino: 5})
	r.AddChild("partitions", parts, false)
}

var _ = (fs.NodeLookuper)((*Root)(nil))

// Lookup gives every lookup of control an inode of its own, never cached, so each
// open of control gets a fresh inode. The kernel holds a file's inode lock
// for the whole of a write, and a merge's write lasts as long as the merge: on a
// shared inode, `echo abort > control` (whose O_TRUNC takes that lock) would wait
// for the merge it is meant to stop.
func (r *Root) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if r.stopped.Load() {
		return nil, syscall.EIO
	}
	if name == "control" {
		node := &controlNode{root: r}
		ch := r.NewInode(ctx, node, fs.StableAttr{Ino: r.controlIno.Add(1)})
		var a fuse.AttrOut
		node.Getattr(ctx, nil, &a)
		out.Attr = a.Attr
		return ch, 0 // entry timeout 0: the kernel looks it up again at every open
	}
	ch := r.GetChild(name)
	if ch == nil {
		return nil, syscall.ENOENT
	}
	if ga, ok := ch.Operations().(fs.NodeGetattrer); ok {
		var a fuse.AttrOut
		ga.Getattr(ctx, nil, &a)
		out.Attr = a.Attr
	}
	out.SetEntryTimeout(entryTimeout)
	return ch, 0
}

// entryTimeout is how long the kernel may cache names other than control.
const entryTimeout = time.Second

var _ = (fs.NodeGetattrer)((*Root)(nil))

func (r *Root) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	r.fillDirAttr(&out.Attr, 4, !r.opts.ReadOnly)
	return 0
}

// fillAttr fills the attributes of a regular file: the mount's owner, its mode less
// the write bits unless writable, one link.
func (r *Root) fillAttr(a *fuse.Attr, writable bool) {
	fillAttrOf(a, r.opts.Access, writable && !r.opts.ReadOnly)
	a.SetTimes(nil, &r.mtime, &r.mtime)
}

// fillControlAttr fills the attributes of control: the top image's owner may write
// it (and root); others may at most read the status.
func (r *Root) fillControlAttr(a *fuse.Attr) {
	fillAttrOf(a, r.opts.Control, !r.opts.ReadOnly)
	a.Mode &^= 0o022
	if !r.opts.ReadOnly {
		a.Mode |= 0o200
	}
	a.SetTimes(nil, &r.mtime, &r.mtime)
}

func fillAttrOf(a *fuse.Attr, acc *Access, writable bool) {
	perm := acc.Perm & 0o666
	if !writable {
		perm &= 0o444
	}
	a.Mode = syscall.S_IFREG | perm
	a.Nlink = 1
	a.Owner = fuse.Owner{Uid: acc.Uid, Gid: acc.Gid}
}

// fillDirAttr fills the attributes of a directory with nlink links.
func (r *Root) fillDirAttr(a *fuse.Attr, nlink uint32, writable bool) {
	r.fillAttr(a, writable)
	perm := a.Mode & 0o777
	a.Mode = syscall.S_IFDIR | perm | (perm&0o444)>>2
	a.Nlink = nlink
}

// setattrErrno refuses chmod and chown: the owner and mode come from the image file
// or the mount options.
func setattrErrno(in *fuse.SetAttrIn) syscall.Errno {
	if in.Valid&(fuse.FATTR_MODE|fuse.FATTR_UID|fuse.FATTR_GID) != 0 {
		return syscall.EPERM
	}
	return 0
}

var _ = (fs.NodeSetattrer)((*Root)(nil))

func (r *Root) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if e := setattrErrno(in); e != 0 {
		return e
	}
	return r.Getattr(ctx, fh, out)
}

// maxErrors is how many error lines the status keeps.
const maxErrors = 16

func (r *Root) logError(line string) {
	r.opts.Logger.Print(line)
	r.errMu.Lock()
	defer r.errMu.Unlock()
	r.errors = append(r.errors, time.Now().UTC().Format(time.RFC3339)+" "+line)
	if len(r.errors) > maxErrors {
		r.errors = r.errors[len(r.errors)-maxErrors:]
	}
}

func (r *Root) recentErrors() []string {
	r.errMu.Lock()
	defer r.errMu.Unlock()
	return append([]string(nil), r.errors...)
}

func (r *Root) debugf(format string, args ...any) {
	if r.opts.Debug {
		r.opts.Logger.Printf(format, args...)
	}
}

// Mount serves c at dir and returns once the kernel has the mount.
func Mount(dir string, c *chain.Chain, opts Options) (*fuse.Server, *Root, error) {
	root := NewRoot(c, opts)
	// Splice where pipes can hold a whole 512 KiB request (pipe-max-size is 1 MiB
	// unless someone lowered it).
	root.splice = splice.Resizable() && maxSplice >= maxRequest
	// 1 MiB: the largest request the kernel's default max_pages (256) allows.
	// go-fuse asks for max_pages from MaxWrite, and makes it max_read too. When
	// replies are spliced, 512 KiB: go-fuse's pipe must hold a reply and a page
	// more (see maxSplice). Measured on a cold read of a 2 GiB chain, 512 KiB
	// spliced beat 1 MiB copied by a third, with a quarter less server CPU.
	mw := 1 << 20
	if root.splice {
		mw = int(maxRequest)
	}
	sec := time.Second
	top := c.Layers()[0].Path
	fsname := opts.FsName
	if fsname == "" {
		fsname = chain.Abs(top)
	}
	// The kernel checks the mode bits (the only access control there is), which
	// matters with allow_other; ro sets the kernel's read-only flag.
	kopts := []string{"default_permissions"}
	if opts.ReadOnly {
		kopts = append(kopts, "ro")
	}
	fsopts := &fs.Options{
		// No default entry timeout: the lookups set theirs, control's is zero.
		AttrTimeout: &sec,
		MountOptions: fuse.MountOptions{
			AllowOther:   opts.AllowOther,
			FsName:       strings.ReplaceAll(fsname, ",", "_"),
			Name:         "vhdfs",
			MaxWrite:     mw,
			MaxReadAhead: 1 << 20,
			// One program's O_DIRECT requests in flight (libaio, io_uring: a VM's
			// disk queue) reach vhdfs at once, not one at a time: the kernel waits for
			// each FUSE request of a direct I/O before it sends the next unless the
			// file system takes ASYNC_DIO, as qemu's FUSE export does.
			ExtraCapabilities: fuse.CAP_ASYNC_DIO,
			// Replies of bytes go as vectors, which go-fuse never tries to splice;
			// only the replies that name an image file do (see Read).
			DisableSplice: !root.splice,
			Debug:         opts.Debug,
			DisableXAttrs: true,
			Options:       kopts,
		},
		Logger: opts.Logger,
	}
	srv, err := fs.Mount(dir, root, fsopts)
	if err != nil {
		return nil, nil, fmt.Errorf("mount %s on %s: %w", top, dir, err)
	}
	ra := opts.ReadAheadKB
	if ra == 0 {
		ra = DefaultReadAheadKB
	}
	if err := SetReadAhead(dir, ra); err != nil {
		opts.Logger.Printf("%v; to raise it, run as root: echo %d > %s", err, ra, bdiReadAheadPath(dir))
	}
	return srv, root, nil
}

// bdiReadAheadPath is the sysfs file of the read-ahead of the mount at dir, or a
// placeholder when dir cannot be stat'ed.
func bdiReadAheadPath(dir string) string {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return "/sys/class/bdi/MAJOR:MINOR/read_ahead_kb"
	}
	return fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
}

// SetReadAhead sets the read-ahead of the backing device of the mount at dir to kb
// KiB. Only root may write the sysfs file.
func SetReadAhead(dir string, kb int) error {
	p := bdiReadAheadPath(dir)
	if err := os.WriteFile(p, []byte(strconv.Itoa(kb)+"\n"), 0); err != nil {
		return fmt.Errorf("set read-ahead of %s to %d KiB: %w", dir, kb, err)
	}
	return nil
}

// Abort stops a running merge, if any, and waits for it (for shutdown). It returns
// the command of the merge it stopped, or "" when none ran.
func (r *Root) Abort() string { return r.ctl.abortAll() }
