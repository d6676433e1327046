package vhdx

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/faults"
)

// createCases are images Create makes that other tools must read.
var createCases = []struct {
	name string
	o    CreateOptions
}{
	{"dynamic-512-default-block", CreateOptions{Type: TypeDynamic, Size: 100 * MiB}},
	{"dynamic-512-partial-block", CreateOptions{Type: TypeDynamic, Size: 8*MiB + 3*512, BlockSize: 2 * MiB}},
	{"dynamic-512-over-4G", CreateOptions{Type: TypeDynamic, Size: 4<<30 + 512*MiB + 512, BlockSize: MiB}},
	{"dynamic-512-1T", CreateOptions{Type: TypeDynamic, Size: 1 << 40, BlockSize: 256 * MiB, PhysicalSectorSize: 512}},
	{"dynamic-4096", CreateOptions{Type: TypeDynamic, Size: 40*MiB + 4096, BlockSize: MiB, LogicalSectorSize: 4096}},
	{"dynamic-4096-over-32G", CreateOptions{Type: TypeDynamic, Size: 33 << 30, BlockSize: MiB, LogicalSectorSize: 4096}},
	{"fixed-512", CreateOptions{Type: TypeFixed, Size: 20*MiB + 512, BlockSize: MiB}},
	{"fixed-512-default-block", CreateOptions{Type: TypeFixed, Size: 40 * MiB}},
	{"fixed-512-over-4G", CreateOptions{Type: TypeFixed, Size: 4<<30 + 64*MiB, BlockSize: MiB}},
	{"fixed-4096", CreateOptions{Type: TypeFixed, Size: 12 * MiB, BlockSize: 8 * MiB, LogicalSectorSize: 4096}},
}

// TestCreate makes fixed and dynamic images and checks what vhdx, qemu-img (info
// and check) and libvhdi's vhdiinfo read of them: the format, the type, the size
// and the sector size. qemu 7.2 refuses 4096-byte logical sectors: that refusal,
// and only that, is what it must say of those images.
func TestCreate(t *testing.T) {
	for _, tc := range createCases {
		t.Run(tc.name, func(t *testing.T) {
			if testing.Short() && tc.o.Type == TypeFixed && tc.o.Size > 1<<30 {
				t.Skip("allocates more than 4 GiB")
			}
			p := filepath.Join(t.TempDir(), "x.vhdx")
			if err := Create(p, tc.o); err != nil {
				t.Fatal(err)
			}
			ls := max(tc.o.LogicalSectorSize, 512)
			bs := tc.o.BlockSize
			if bs == 0 {
				bs = DefaultBlockSize
			}
			img, err := Open(p, false)
			if err != nil {
				t.Fatal(err)
			}
			h := img.Header()
			if img.Type() != tc.o.Type || img.Size() != tc.o.Size || img.BlockSize() != bs || img.LogicalSectorSize() != ls || h.SequenceNumber != 2 || !h.LogGuid.IsZero() {
				t.Errorf("type %v size %d block %d sector %d sequence %d log %v", img.Type(), img.Size(), img.BlockSize(), img.LogicalSectorSize(), h.SequenceNumber, h.LogGuid)
			}
			g := img.geo
			want := int64(0)
			if tc.o.Type == TypeFixed {
				want = g.blocks * bs
			}
			if a := img.AllocatedBytes(); a != want {
				t.Errorf("allocated %d bytes, want %d", a, want)
			}
			sample := make([]byte, 64*KiB)
			for _, off := range []int64{0, img.Size() - int64(len(sample))} {
				if _, err := img.ReadAt(sample, off); err != nil || !allZero(sample) {
					t.Errorf("ReadAt(%d) of a new image: %v, or not zeros", off, err)
				}
			}
			img.Close()
			checkQemu(t, p, tc.o.Size, ls)
			checkVhdiinfo(t, p, tc.o.Size, ls, tc.o.Type)
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			disk := st.Sys().(*syscall.Stat_t).Blocks * 512
			switch {
			// Headers, log, metadata and BAT are allocated (metadata writes never want
			// room), the payload not at all.
			case tc.o.Type == TypeDynamic && (st.Size() > newBATOff+g.entries*8+MiB || disk > st.Size()+4096):
				t.Errorf("a new dynamic image is %d bytes, %d on disk", st.Size(), disk)
			case tc.o.Type == TypeFixed && disk < g.blocks*bs:
				t.Errorf("a new fixed image has %d bytes on disk, want its %d payload bytes allocated", disk, g.blocks*bs)
			}
		})
	}
}

// checkQemu runs qemu-img info and check on p: a 512-byte image must show the
// format vhdx, size and no errors; a 4096-byte one must be refused for its sector
// size by both.
func checkQemu(t *testing.T, p string, size, ls int64) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Log("qemu-img not installed")
		return
	}
	info, ierr := exec.Command("qemu-img", "info", "--output=json", "-f", "vhdx", p).CombinedOutput()
	check, cerr := exec.Command("qemu-img", "check", "-f", "vhdx", p).CombinedOutput()
	if ls == 4096 {
		// qemu says only "Operation not supported": the same file with 512 in its
		// logical sector size item must then pass.
		for _, r := range []struct {
			out []byte
			err error
		}{{info, ierr}, {check, cerr}} {
			if r.err == nil || !strings.Contains(string(r.out), "Operation not supported") {
				t.Errorf("qemu-img on a 4096-byte-sector image: %v: %s; want it refused", r.err, r.out)
			}
		}
		p512 := filepath.Join(t.TempDir(), "512.vhdx")
		run(t, "cp", "--sparse=always", p, p512)
		setLogicalSectorSize(t, p512, 512)
		checkQemu(t, p512, size, 512)
		return
	}
	if ierr != nil {
		t.Fatalf("qemu-img info: %v\n%s", ierr, info)
	}
	var v struct {
		Format      string `json:"format"`
		VirtualSize int64  `json:"virtual-size"`
		Dirty       bool   `json:"dirty-flag"`
	}
	if err := json.Unmarshal(info, &v); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, info)
	}
	if v.Format != "vhdx" || v.VirtualSize != size || v.Dirty {
		t.Errorf("qemu-img info: %+v, want vhdx of %d bytes", v, size)
	}
	if cerr != nil || !strings.Contains(string(check), "No errors were found") {
		t.Errorf("qemu-img check: %v\n%s", cerr, check)
	}
}

var mediaSize = regexp.MustCompile(`Media size\s*:.*\((\d+) bytes\)`)

// checkVhdiinfo runs libvhdi's vhdiinfo on p: format VHDX, the type, media size
// and sector size; it returns the output.
func checkVhdiinfo(t *testing.T, p string, size, ls int64, typ DiskType) string {
	t.Helper()
	if _, err := exec.LookPath("vhdiinfo"); err != nil {
		t.Log("vhdiinfo not installed")
		return ""
	}
	out, err := exec.Command("vhdiinfo", p).CombinedOutput()
	if err != nil {
		t.Fatalf("vhdiinfo: %v\n%s", err, out)
	}
	s := string(out)
	m := mediaSize.FindStringSubmatch(s)
	kind := map[DiskType]string{TypeFixed: "Fixed", TypeDynamic: "Dynamic", TypeDifferencing: "Differential"}[typ]
	if !strings.Contains(s, "VHDX (version 2)") || m == nil || m[1] != strconv.FormatInt(size, 10) ||
		!regexp.MustCompile(`Disk type\s*:\s*`+kind).MatchString(s) ||
		!regexp.MustCompile(`Bytes per sector\s*:\s*`+strconv.FormatInt(ls, 10)+` bytes`).MatchString(s) {
		t.Errorf("vhdiinfo: want a %s VHDX of %d bytes, %d-byte sectors:\n%s", kind, size, ls, s)
	}
	return s
}

// TestCreateWrite writes into created dynamic and fixed images with WriteAt and
// compares qemu-img convert's raw output with a model, byte for byte: across block
// boundaries, a whole block, the last sector, the chunk boundary at 4 GiB.
func TestCreateWrite(t *testing.T) {
	needTool(t, "qemu-img")
	for _, tc := range []struct {
		name   string
		o      CreateOptions
		writes []write
	}{
		{"dynamic", CreateOptions{Type: TypeDynamic, Size: 9*MiB + 1536, BlockSize: MiB},
			[]write{{0, 4096, 0x11}, {MiB - 512, 1024, 0x12}, {3 * MiB, MiB, 0x13}, {9*MiB + 1024, 512, 0x14}, {5*MiB + 512, 3 * MiB, 0x15}}},
		{"dynamic-chunks", CreateOptions{Type: TypeDynamic, Size: 4<<30 + 8*MiB, BlockSize: MiB},
			[]write{{4<<30 - 4096, 8192, 0x21}, {4<<30 + 8*MiB - 512, 512, 0x22}, {512, 512, 0x23}}},
		{"fixed", CreateOptions{Type: TypeFixed, Size: 6*MiB + 512, BlockSize: 2 * MiB},
			[]write{{0, 512, 0x31}, {2*MiB - 4096, 8192, 0x32}, {6 * MiB, 512, 0x33}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "x.vhdx")
			if err := Create(p, tc.o); err != nil {
				t.Fatal(err)
			}
			img, err := Open(p, true)
			if err != nil {
				t.Fatal(err)
			}
			type piece struct {
				off int64
				d   []byte
			}
			var model []piece
			for _, w := range tc.writes {
				d := pattern(w.n, w.c)
				if _, err := img.WriteAt(d, w.off); err != nil {
					t.Fatal(err)
				}
				model = append(model, piece{w.off, d})
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			run(t, "qemu-img", "check", "-f", "vhdx", p)
			raw := filepath.Join(dir, "x.raw")
			run(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", p, raw)
			f, err := os.Open(raw)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if st, _ := f.Stat(); st.Size() != tc.o.Size {
				t.Fatalf("raw is %d bytes, want %d", st.Size(), tc.o.Size)
			}
			// The model: zeros, with the writes laid over in order. Checked where
			// written, and everywhere the raw file has data (SEEK_DATA).
			want := func(off, n int64) []byte {
				b := make([]byte, n)
				for _, pc := range model {
					lo, hi := max(off, pc.off), min(off+n, pc.off+int64(len(pc.d)))
					if lo < hi {
						copy(b[lo-off:hi-off], pc.d[lo-pc.off:hi-pc.off])
					}
				}
				return b
			}
			const chunk = 4 * MiB
			got := make([]byte, chunk)
			for off := int64(0); off < tc.o.Size; off += chunk {
				n := min(chunk, tc.o.Size-off)
				written := false
				for _, pc := range model {
					written = written || overlaps(off, n, pc.off, int64(len(pc.d)))
				}
				if !written && !hasData(t, f, off, n) {
					continue
				}
				if _, err := f.ReadAt(got[:n], off); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got[:n], want(off, n)) {
					t.Fatalf("qemu-img convert differs from the model in %d+%d", off, n)
				}
			}
		})
	}
}

// TestCreateDifferencing makes a dynamic parent with data, a differencing child
// with CreateChild and data in it, and checks the child's metadata (HasParent, the
// locator keys, the parent's sizes) and that libvhdi (vhdiinfo, vhdimount) finds
// the parent through the locator and shows parent and child data as the model.
func TestCreateDifferencing(t *testing.T) {
	for _, ls := range []int64{512, 4096} {
		t.Run(fmt.Sprint(ls), func(t *testing.T) {
			dir := t.TempDir()
			pp, cp := filepath.Join(dir, "parent.vhdx"), filepath.Join(dir, "child.avhdx")
			size := int64(10*MiB + 2*4096)
			if err := Create(pp, CreateOptions{Type: TypeDynamic, Size: size, BlockSize: MiB, LogicalSectorSize: ls, PhysicalSectorSize: 512}); err != nil {
				t.Fatal(err)
			}
			model := make([]byte, size)
			parent, err := Open(pp, true)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range []write{{0, 2 * MiB, 0x41}, {5 * MiB, 4096, 0x42}, {size - 8192, 8192, 0x43}} {
				d := pattern(w.n, w.c)
				if _, err := parent.WriteAt(d, w.off); err != nil {
					t.Fatal(err)
				}
				copy(model[w.off:], d)
			}
			parent.Close()
			if parent, err = Open(pp, false); err != nil {
				t.Fatal(err)
			}
			defer parent.Close()
			id := image.NewID()
			if err := parent.CreateChild(cp, image.ChildOptions{ID: id}); err != nil {
				t.Fatal(err)
			}
			child, err := Open(cp, true)
			if err != nil {
				t.Fatal(err)
			}
			m := child.Metadata()
			if !child.HasParent() || child.Type() != TypeDifferencing || child.Size() != size || child.LogicalSectorSize() != ls ||
				child.PhysicalSectorSize() != 512 || child.BlockSize() != MiB || m.LeaveBlockAllocated ||
				child.VirtualDiskID() != parent.VirtualDiskID() || child.DataWriteGuid().String() != id.String() {
				t.Errorf("child: parent %v type %v size %d sectors %d/%d block %d leave %v page83 same %v ID %v want %v", child.HasParent(), child.Type(), child.Size(),
					child.LogicalSectorSize(), child.PhysicalSectorSize(), child.BlockSize(), m.LeaveBlockAllocated, child.VirtualDiskID() == parent.VirtualDiskID(), child.DataWriteGuid(), id)
			}
			want := map[string]string{
				"parent_linkage":      "{" + parent.DataWriteGuid().String() + "}",
				"relative_path":       `.\parent.vhdx`,
				"absolute_win32_path": strings.ReplaceAll(pp, "/", `\`),
			}
			if got := child.ParentLocator(); fmt.Sprint(got) != fmt.Sprint(want) || m.LocatorType != LocatorTypeVHDX {
				t.Errorf("locator %v type %v, want %v", got, m.LocatorType, want)
			}
			for _, w := range []write{{4096, 4096, 0x51}, {MiB - 4096, 8192, 0x52}, {3 * MiB, MiB, 0x53}, {5*MiB + 4096, 4096, 0x54}, {size - 4096, 4096, 0x55}} {
				d := pattern(w.n, w.c)
				if _, err := child.WriteAt(d, w.off); err != nil {
					t.Fatal(err)
				}
				copy(model[w.off:], d)
			}
			if err := child.Close(); err != nil {
				t.Fatal(err)
			}
			info := checkVhdiinfo(t, cp, size, ls, TypeDifferencing)
			if info != "" && !strings.Contains(info, parent.DataWriteGuid().String()) {
				t.Errorf("vhdiinfo does not show the parent identifier %v:\n%s", parent.DataWriteGuid(), info)
			}
			got := vhdimount(t, cp, size)
			if got != nil && !bytes.Equal(got, model) {
				i := 0
				for got[i] == model[i] {
					i++
				}
				t.Errorf("vhdimount of the child differs from the model at byte %d: %#x, want %#x", i, got[i], model[i])
			}
		})
	}
}

// vhdimount mounts the image at p with libvhdi's vhdimount, which opens the parents
// through their locators (absolute_win32_path first, its last component beside the
// child), and returns the chain's n bytes; nil if it cannot run here.
func vhdimount(t *testing.T, p string, n int64) []byte {
	t.Helper()
	if _, err := exec.LookPath("vhdimount"); err != nil {
		t.Log("vhdimount not installed")
		return nil
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Log("no /dev/fuse")
		return nil
	}
	mnt := t.TempDir()
	if out, err := exec.Command("vhdimount", p, mnt).CombinedOutput(); err != nil {
		t.Fatalf("vhdimount: %v\n%s", err, out)
	}
	defer func() {
		if out, err := exec.Command("fusermount", "-u", mnt).CombinedOutput(); err != nil {
			t.Errorf("fusermount -u: %v\n%s", err, out)
		}
	}()
	// One file per layer, vhdi1 the base: the last shows the whole chain.
	ls, _ := os.ReadDir(mnt)
	b, err := os.ReadFile(filepath.Join(mnt, fmt.Sprintf("vhdi%d", len(ls))))
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != n {
		t.Fatalf("vhdimount shows %d bytes, want %d", len(b), n)
	}
	return b
}

// TestCreateBadInput checks that every bad option is refused with ErrInvalidArg,
// leaving no file, and that an existing file is refused and left as it was.
func TestCreateBadInput(t *testing.T) {
	dir := t.TempDir()
	pp := filepath.Join(dir, "parent.vhdx")
	if err := Create(pp, CreateOptions{Type: TypeDynamic, Size: 8 * MiB}); err != nil {
		t.Fatal(err)
	}
	parent, err := Open(pp, false)
	if err != nil {
		t.Fatal(err)
	}
	defer parent.Close()
	for _, tc := range []struct {
		name string
		o    CreateOptions
	}{
		{"zero size", CreateOptions{Type: TypeDynamic}},
		{"negative size", CreateOptions{Type: TypeDynamic, Size: -512}},
		{"size not whole sectors", CreateOptions{Type: TypeDynamic, Size: MiB + 100}},
		{"size not whole 4096-byte sectors", CreateOptions{Type: TypeDynamic, Size: MiB + 512, LogicalSectorSize: 4096}},
		{"size past 64 TiB", CreateOptions{Type: TypeDynamic, Size: 64<<40 + 512}},
		{"block size not a power of two", CreateOptions{Type: TypeDynamic, Size: 8 * MiB, BlockSize: 3 * MiB}},
		{"block size under 1 MiB", CreateOptions{Type: TypeDynamic, Size: 8 * MiB, BlockSize: 512 * KiB}},
		{"block size over 256 MiB", CreateOptions{Type: TypeFixed, Size: 8 * MiB, BlockSize: 512 * MiB}},
		{"logical sector 1024", CreateOptions{Type: TypeDynamic, Size: 8 * MiB, LogicalSectorSize: 1024}},
		{"physical sector 2048", CreateOptions{Type: TypeDynamic, Size: 8 * MiB, PhysicalSectorSize: 2048}},
		{"unknown type", CreateOptions{Type: DiskType(9), Size: 8 * MiB}},
		{"differencing without a parent", CreateOptions{Type: TypeDifferencing}},
		{"differencing of another size", CreateOptions{Type: TypeDifferencing, Parent: parent, Size: 16 * MiB}},
		{"differencing of another sector size", CreateOptions{Type: TypeDifferencing, Parent: parent, LogicalSectorSize: 4096}},
		{"dynamic with a parent", CreateOptions{Type: TypeDynamic, Size: 8 * MiB, Parent: parent}},
		{"parent path with a backslash", CreateOptions{Type: TypeDifferencing, Parent: parent, ParentPath: dir + `/a\b.vhdx`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, "x.vhdx")
			err := Create(p, tc.o)
			if !errors.Is(err, ErrInvalidArg) || !strings.Contains(err.Error(), p) {
				t.Errorf("Create: %v, want ErrInvalidArg naming the file", err)
			}
			if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("a refused Create left a file: %v", err)
			}
		})
	}
	before := fileSum(t, pp)
	if err := Create(pp, CreateOptions{Type: TypeDynamic, Size: 16 * MiB}); !errors.Is(err, fs.ErrExist) {
		t.Errorf("Create over an existing file: %v, want ErrExist", err)
	}
	if fileSum(t, pp) != before {
		t.Error("Create over an existing file changed it")
	}
}

// TestCreateCut fails Create at every step (faults): it returns the error and
// leaves no file; uncut, the image opens.
func TestCreateCut(t *testing.T) {
	dir := t.TempDir()
	for _, o := range []CreateOptions{{Type: TypeFixed, Size: 4 * MiB, BlockSize: MiB}, {Type: TypeDynamic, Size: 4 * MiB}} {
		for k := 0; ; k++ {
			p := filepath.Join(dir, fmt.Sprintf("%v-%d.vhdx", o.Type, k))
			faults.Arm(k)
			err := Create(p, o)
			faults.Disarm()
			if err == nil {
				img, err := Open(p, false)
				if err != nil {
					t.Fatalf("%v uncut after %d steps: %v", o.Type, k, err)
				}
				img.Close()
				t.Logf("%v: %d steps", o.Type, k)
				break
			}
			if !errors.Is(err, faults.ErrPowerLost) {
				t.Fatalf("%v cut after %d: %v", o.Type, k, err)
			}
			if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("%v cut after %d: a failed Create left a file: %v", o.Type, k, err)
			}
		}
	}
}

// setLogicalSectorSize rewrites the logical sector size item of the file at p, made
// by Create, in place.
func setLogicalSectorSize(t *testing.T, p string, ls uint32) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tbl := make([]byte, metadataTableSize)
	if _, err := f.ReadAt(tbl, newMetaOff); err != nil {
		t.Fatal(err)
	}
	entries := make([]MetadataEntry, binary.LittleEndian.Uint16(tbl[10:]))
	if _, err := binary.Decode(tbl[metadataHeaderLen:], binary.LittleEndian, entries); err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.ItemID == ItemLogicalSectorSize {
			if _, err := f.WriteAt(binary.LittleEndian.AppendUint32(nil, ls), newMetaOff+int64(e.Offset)); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
	t.Fatal("no logical sector size item")
}

// writeCreatedSeeds writes FuzzOpen seeds (testdata/*.sparse) of images Create makes,
// with the writes TestSeeds expects (0x5a over 4096+4096, 0xa5 at 3 MiB): a dynamic
// image with 4096-byte logical sectors, and a differencing image over a dynamic
// parent (the child alone: vhdx does not open parents).
func writeCreatedSeeds(t *testing.T, dir string) {
	t.Helper()
	parent := filepath.Join(dir, "created-parent.vhdx")
	if err := Create(parent, CreateOptions{Type: TypeDynamic, Size: 8 * MiB, BlockSize: MiB}); err != nil {
		t.Fatal(err)
	}
	pi, err := Open(parent, false)
	if err != nil {
		t.Fatal(err)
	}
	defer pi.Close()
	seeds := map[string]func(p string) error{
		"created-dynamic-4096": func(p string) error {
			return Create(p, CreateOptions{Type: TypeDynamic, Size: 8 * MiB, BlockSize: MiB, LogicalSectorSize: 4096})
		},
		"created-differencing": func(p string) error { return pi.CreateChild(p, image.ChildOptions{}) },
	}
	for name, create := range seeds {
		p := filepath.Join(dir, name)
		if err := create(p); err != nil {
			t.Fatal(err)
		}
		img, err := Open(p, true)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range []write{{4096, 4096, 0x5a}, {3 * MiB, img.LogicalSectorSize(), 0xa5}} {
			if _, err := img.WriteAt(fill(w.n, w.c), w.off); err != nil {
				t.Fatal(err)
			}
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join("testdata", name+".sparse"), encodeSparse(b), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
