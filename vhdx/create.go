package vhdx

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math/bits"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/faults"
)

// CreatorName is what Create writes into the file identifier's Creator field.
const CreatorName = "vhdfs"

// Block sizes Hyper-V gives new images when none is asked for.
const (
	DefaultBlockSize             = 32 * MiB // fixed and dynamic
	DefaultDifferencingBlockSize = 2 * MiB
)

// The layout of a new file, as Hyper-V and qemu lay it out: the header section, a
// 1 MiB log, the 1 MiB metadata region, the BAT, then the payload blocks, each
// 1 MiB-aligned.
const (
	newLogOff  = 1 * MiB
	newLogLen  = 1 * MiB
	newMetaOff = 2 * MiB
	newMetaLen = 1 * MiB
	newBATOff  = 3 * MiB
)

// CreateOptions describe a new image.
type CreateOptions struct {
	// Type is TypeFixed, TypeDynamic or TypeDifferencing.
	Type DiskType
	// Size is the virtual size: a positive multiple of the logical sector size, at
	// most 64 TiB. A differencing image takes its parent's; Size is then 0 or that.
	Size int64
	// BlockSize is a power of two from 1 MiB to 256 MiB; 0 means Hyper-V's default,
	// DefaultBlockSize or DefaultDifferencingBlockSize.
	BlockSize int64
	// LogicalSectorSize is 512 (0 means 512) or 4096; a differencing image takes its
	// parent's. PhysicalSectorSize is 512 or 4096; 0 means 4096, or the parent's.
	LogicalSectorSize, PhysicalSectorSize int64
	// Parent of a differencing image, open: its size, sector sizes and page 83 data
	// are copied, and parent_linkage names its current DataWriteGuid.
	Parent *Image
	// ParentPath is where the locator says the parent is (default Parent.Name());
	// LocatorPath is where the new image will be read from, for relative_path, when
	// it is made elsewhere first (default: the name given to Create).
	ParentPath, LocatorPath string
	// ID is the new image's DataWriteGuid, what its children will name; zero means a
	// random one.
	ID image.ID
}

// Create makes a new image at name, which must not exist: the header section, an
// empty log, the metadata, and the BAT; a fixed image gets every payload block
// allocated (fallocate) and FULLY_PRESENT, reading as zeros; a dynamic or
// differencing image gets an all-NOT_PRESENT BAT, a hole the file is extended over
// (it takes no room and no time, whatever the size), and no blocks. Bad options return
// an error wrapping ErrInvalidArg before anything is made. The file identifier and
// the headers are written last, behind an fsync, so that a file cut short by a crash
// is no VHDX at all; then the file and its folder are synced. On any failure Create
// removes the file it made.
func Create(name string, o CreateOptions) error {
	if o.LocatorPath == "" {
		o.LocatorPath = name
	}
	l, err := planCreate(o)
	if err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	if err := faults.Step(); err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("create %s: the file exists, and Create only makes new files: %w", name, err)
	}
	if err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	err = l.write(f)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err == nil {
		err = faults.SyncDir(filepath.Dir(name))
	}
	if err != nil {
		os.Remove(name)
		return fmt.Errorf("create %s: %w", name, err)
	}
	return nil
}

// CreateChild makes a new, empty differencing image at path whose parent is img,
// with img's block size (a merge's fresh top keeps its parent's), and the locator
// paths and ID of o.
func (img *Image) CreateChild(path string, o image.ChildOptions) error {
	return Create(path, CreateOptions{Type: TypeDifferencing, BlockSize: cmp.Or(o.BlockSize, img.BlockSize()), Parent: img,
		ParentPath: o.ParentPath, LocatorPath: o.LocatorPath, ID: o.ID})
}

// newFile is a planned new file.
type newFile struct {
	header  Header
	regions []RegionEntry
	meta    []byte // the metadata table and items, from the region's start
	geo     geometry
	batLen  int64
	dataOff int64 // where the payload blocks start: past the BAT
	end     int64 // the file's size
	fixed   bool
}

// planCreate checks o and lays the file out.
func planCreate(o CreateOptions) (*newFile, error) {
	size, bs, ls, ps := o.Size, o.BlockSize, o.LogicalSectorSize, o.PhysicalSectorSize
	var page83 GUID
	var locator []byte
	var flags uint32
	switch o.Type {
	case TypeDifferencing:
		p := o.Parent
		if p == nil {
			return nil, fmt.Errorf("a differencing image needs a parent: %w", ErrInvalidArg)
		}
		if size != 0 && size != p.Size() {
			return nil, fmt.Errorf("size %d differs from the parent's %d: %w", size, p.Size(), ErrInvalidArg)
		}
		if ls != 0 && ls != p.LogicalSectorSize() {
			return nil, fmt.Errorf("logical sector size %d differs from the parent's %d: %w", ls, p.LogicalSectorSize(), ErrInvalidArg)
		}
		size, ls = p.Size(), p.LogicalSectorSize()
		if ps == 0 {
			ps = p.PhysicalSectorSize()
		}
		if bs == 0 {
			bs = DefaultDifferencingBlockSize
		}
		// Windows copies the VirtualDiskId to every child: the guest sees one disk.
		page83 = p.VirtualDiskID()
		parentPath := o.ParentPath
		if parentPath == "" {
			parentPath = p.Name()
		}
		kvs, err := newLocator(p.DataWriteGuid().String(), parentPath, o.LocatorPath)
		if err != nil {
			return nil, err
		}
		if locator, err = marshalParentLocator(kvs); err != nil {
			return nil, err
		}
		flags = 2 // HasParent
	case TypeFixed, TypeDynamic:
		if o.Parent != nil {
			return nil, fmt.Errorf("a %v image has no parent: %w", o.Type, ErrInvalidArg)
		}
		if bs == 0 {
			bs = DefaultBlockSize
		}
		page83 = NewGUID()
		if o.Type == TypeFixed {
			flags = 1 // LeaveBlockAllocated
		}
	default:
		return nil, fmt.Errorf("disk type %d: %w", int(o.Type), ErrInvalidArg)
	}
	if ls == 0 {
		ls = 512
	}
	if ps == 0 {
		ps = 4096
	}
	if ls != 512 && ls != 4096 || ps != 512 && ps != 4096 {
		return nil, fmt.Errorf("logical sector size %d, physical %d: each must be 512 or 4096: %w", ls, ps, ErrInvalidArg)
	}
	if size <= 0 || size > maxVirtualSize || size%ls != 0 {
		return nil, fmt.Errorf("size %d is not a positive multiple of the %d-byte logical sector up to 64 TiB: %w", size, ls, ErrInvalidArg)
	}
	if bs < minBlockSize || bs > maxBlockSize || bits.OnesCount64(uint64(bs)) != 1 {
		return nil, fmt.Errorf("block size %d is not a power of two from 1 MiB to 256 MiB: %w", bs, ErrInvalidArg)
	}
	dataWrite := NewGUID()
	if !o.ID.IsZero() {
		var err error
		if dataWrite, err = ParseGUID(o.ID.String()); err != nil {
			return nil, err
		}
	}
	n := &newFile{fixed: o.Type == TypeFixed}
	n.geo = newGeometry(size, bs, ls, o.Type == TypeDifferencing)
	n.batLen = (n.geo.entries*8 + MiB - 1) / MiB * MiB
	n.dataOff = newBATOff + n.batLen
	n.end = n.dataOff
	if n.fixed {
		n.end += n.geo.blocks * bs
	}
	n.header = Header{SequenceNumber: 1, FileWriteGuid: NewGUID(), DataWriteGuid: dataWrite,
		Version: 1, LogLength: newLogLen, LogOffset: newLogOff}
	n.regions = []RegionEntry{
		{Guid: RegionBAT, FileOffset: newBATOff, Length: uint32(n.batLen), Flags: 1},
		{Guid: RegionMetadata, FileOffset: newMetaOff, Length: newMetaLen, Flags: 1},
	}
	n.meta = newMetadata(uint32(bs), flags, uint64(size), page83, uint32(ls), uint32(ps), locator)
	return n, nil
}

// newMetadata returns the metadata table and its items (§2.6), packed from 64 KiB
// as qemu packs them, the parent locator last so that it can grow in place.
func newMetadata(blockSize, flags uint32, size uint64, page83 GUID, ls, ps uint32, locator []byte) []byte {
	u32 := func(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
	const vd = itemIsRequired | itemIsVirtualDisk
	type item struct {
		id    GUID
		flags uint32
		data  []byte
	}
	items := []item{
		{ItemFileParameters, itemIsRequired, append(u32(blockSize), u32(flags)...)},
		{ItemVirtualDiskSize, vd, binary.LittleEndian.AppendUint64(nil, size)},
		{ItemPage83Data, vd, page83[:]},
		{ItemLogicalSectorSize, vd, u32(ls)},
		{ItemPhysicalSectorSize, vd, u32(ps)},
	}
	if locator != nil {
		items = append(items, item{ItemParentLocator, itemIsRequired, locator})
	}
	b := make([]byte, metadataTableSize)
	h := metadataTableHeader{EntryCount: uint16(len(items))}
	copy(h.Signature[:], "metadata")
	if _, err := binary.Encode(b, binary.LittleEndian, h); err != nil {
		panic(err)
	}
	for i, it := range items {
		e := MetadataEntry{ItemID: it.id, Offset: uint32(len(b)), Length: uint32(len(it.data)), Flags: it.flags}
		if _, err := binary.Encode(b[metadataHeaderLen+i*metadataEntryLen:], binary.LittleEndian, e); err != nil {
			panic(err)
		}
		b = append(b, it.data...)
	}
	return b
}

// write lays the planned file out in f, an empty file.
func (n *newFile) write(f *os.File) error {
	// The headers, log and metadata are allocated now: a write acknowledged by fsync
	// must never fail later for want of room for its log entry. A dynamic or
	// differencing image's BAT stays a hole, all NOT_PRESENT entries (a 64 TiB disk
	// of 1 MiB blocks has a 512 MiB table): a write reserves the sector of each entry
	// it adds (reserveBATLocked). A fixed image's is written whole.
	alloc := int64(newBATOff)
	if n.fixed {
		alloc = n.dataOff
	}
	err := unix.Fallocate(int(f.Fd()), 0, 0, alloc)
	if err != nil && !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("allocate %d bytes at 0: %w", alloc, err)
	}
	if n.fixed {
		// Allocated and reading as zeros, without writing them; a file system
		// without fallocate gets a sparse file.
		err := unix.Fallocate(int(f.Fd()), 0, n.dataOff, n.end-n.dataOff)
		if err != nil && !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("allocate %d bytes at %d: %w", n.end-n.dataOff, n.dataOff, err)
		}
	}
	if err := faults.Step(); err != nil {
		return err
	}
	if err := f.Truncate(n.end); err != nil {
		return fmt.Errorf("extend to %d: %w", n.end, err)
	}
	rt := marshalRegionTable(n.regions)
	for _, w := range []struct {
		b   []byte
		off int64
	}{{rt, regionTable1Off}, {rt, regionTable2Off}, {n.meta, newMetaOff}} {
		if err := faults.Step(); err != nil {
			return err
		}
		if _, err := f.WriteAt(w.b, w.off); err != nil {
			return fmt.Errorf("write %d bytes at %d: %w", len(w.b), w.off, err)
		}
	}
	if n.fixed {
		if err := n.writeFixedBAT(f); err != nil {
			return err
		}
	}
	if err := faults.Step(); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	// The headers (sequence numbers 1 and 2, otherwise the same) and the file
	// identifier make the file a VHDX: last.
	id := make([]byte, 8+512)
	copy(id, "vhdxfile")
	copy(id[8:], utf16LE(CreatorName))
	h1, h2 := n.header, n.header
	h2.SequenceNumber++
	for _, w := range []struct {
		b   []byte
		off int64
	}{{h1.Marshal(), header1Off}, {h2.Marshal(), header2Off}, {id, fileIDOff}} {
		if err := faults.Step(); err != nil {
			return err
		}
		if _, err := f.WriteAt(w.b, w.off); err != nil {
			return fmt.Errorf("write %d bytes at %d: %w", len(w.b), w.off, err)
		}
	}
	if err := faults.Step(); err != nil {
		return err
	}
	return f.Sync()
}

// writeFixedBAT writes a fixed image's BAT: payload block p FULLY_PRESENT at
// dataOff + p·BlockSize, the sector bitmap entries NOT_PRESENT. It writes 1 MiB of
// entries at a time.
func (n *newFile) writeFixedBAT(f *os.File) error {
	g := n.geo
	buf := make([]byte, MiB)
	per := int64(len(buf)) / 8
	for base := int64(0); base < g.entries; base += per {
		k := min(per, g.entries-base)
		clear(buf)
		for i := range k {
			idx := base + i
			if (idx+1)%(g.chunkRatio+1) == 0 {
				continue // a sector bitmap entry
			}
			p := idx - idx/(g.chunkRatio+1)
			binary.LittleEndian.PutUint64(buf[8*i:], uint64(makeEntry(FullyPresent, n.dataOff+p*g.blockSize)))
		}
		if err := faults.Step(); err != nil {
			return err
		}
		if _, err := f.WriteAt(buf[:8*k], newBATOff+8*base); err != nil {
			return fmt.Errorf("write BAT at %d: %w", newBATOff+8*base, err)
		}
	}
	return nil
}
