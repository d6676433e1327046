package test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/probe"
)

// write is one write into a disk: Data at Off.
type write struct {
	Off  int64
	Data []byte
}

func (w write) String() string { return fmt.Sprintf("%d bytes at %d", len(w.Data), w.Off) }

// applyWrites writes ws through the Go API into the top of the chain at path (opened
// with chain.Open(path, true)), closes it, and applies the same writes to model.
func applyWrites(t testing.TB, path string, model []byte, ws []write) {
	t.Helper()
	c, err := chain.Open(path, true)
	if err != nil {
		t.Fatalf("open %s for writing: %v", path, err)
	}
	for _, w := range ws {
		if n, err := c.WriteAt(w.Data, w.Off); err != nil || n != len(w.Data) {
			c.Close()
			t.Fatalf("%s: write %v: wrote %d: %v", path, w, n, err)
		}
		copy(model[w.Off:], w.Data)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("close %s: %v", path, err)
	}
}

// writeGen makes random writes for a disk of a given size.
type writeGen struct {
	rng    *rand.Rand
	data   *rand.ChaCha8 // the bytes written: fast to make, even under -race
	size   int64
	align  int64 // offsets and lengths are multiples of align: 4096, 512 or 1
	maxLen int64
}

func newWriteGen(seed uint64, size, align, maxLen int64) *writeGen {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	return &writeGen{rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), data: rand.NewChaCha8(key), size: size, align: align, maxLen: maxLen}
}

// next returns a random write. About one in four starts just before a 512 KiB boundary
// so it crosses a block boundary (for 512 KiB and 2 MiB blocks alike), one in six is
// all zeros (which must still hide a parent's data), the rest are random bytes.
func (g *writeGen) next() write {
	n := (1 + g.rng.Int64N(max(g.maxLen/g.align, 1))) * g.align
	n = min(n, g.size/g.align*g.align)
	var off int64
	if g.rng.IntN(4) == 0 {
		b := (1 + g.rng.Int64N(max(g.size/(512<<10)-1, 1))) * (512 << 10)
		off = b - (1+g.rng.Int64N(max(n/g.align, 1)))*g.align
	} else {
		off = g.rng.Int64N((g.size-n)/g.align+1) * g.align
	}
	off = max(0, min(off, (g.size-n)/g.align*g.align))
	data := make([]byte, n)
	if g.rng.IntN(6) != 0 {
		_, _ = g.data.Read(data)
	}
	return write{off, data}
}

// writes returns n random writes plus one into the last granule of the disk.
func (g *writeGen) writes(n int) []write {
	ws := make([]write, 0, n+1)
	for range n {
		ws = append(ws, g.next())
	}
	last := bytes.Repeat([]byte{byte(0xa0 + g.rng.IntN(16))}, int(g.align))
	return append(ws, write{g.size/g.align*g.align - g.align, last})
}

// testFormats are the formats every table-driven end-to-end test runs on: each test
// that mounts, writes, merges or kills runs once per format, from the same table.
var testFormats = []string{"vhd", "vhdx"}

// forEachFormat runs f as a subtest named after each format of testFormats.
func forEachFormat(t *testing.T, f func(t *testing.T, format string)) {
	t.Helper()
	for _, format := range testFormats {
		t.Run(format, func(t *testing.T) { f(t, format) })
	}
}

// imageName is the file name of an image called name in format: name.vhd for VHD;
// for VHDX, name.vhdx for a base and name.avhdx for a differencing image, as Hyper-V
// names its checkpoints.
func imageName(format, name string, differencing bool) string {
	switch {
	case format == "" || format == "vhd":
		return name + ".vhd"
	case format == "vhdx" && differencing:
		return name + ".avhdx"
	case format == "vhdx":
		return name + ".vhdx"
	}
	panic("test: unknown format " + format)
}

// formatArgs are the `vhdfs create` flags that choose format for a new base: none for
// VHD (the default, and what older builds understand), --format and --logical-sector
// for VHDX (sector 0 means 512).
func formatArgs(format string, sector int64) []string {
	if format == "" || format == "vhd" {
		return nil
	}
	if sector == 0 {
		sector = 512
	}
	return []string{"--format", format, "--logical-sector", fmt.Sprint(sector)}
}

// createBase runs `vhdfs create` for a new base image of format called name in dir,
// with the given arguments (size, type…), and returns its path.
//
// VHDX blocks are 1 MiB at least: for VHDX a smaller --block-size (the VHD tables use
// 4K to 512K to put many block boundaries in a small disk) becomes 1M; --exact-size,
// which keeps a VHD from rounding up to a CHS geometry, is dropped: VHDX sizes are
// exact.
func createBase(t testing.TB, dir, format string, sector int64, name string, args ...string) string {
	t.Helper()
	if format == "vhdx" {
		args = slices.DeleteFunc(slices.Clone(args), func(a string) bool { return a == "--exact-size" })
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "--block-size" && parseSize(t, args[i+1]) < 1<<20 {
				args[i+1] = "1M"
			}
		}
	}
	p := filepath.Join(dir, imageName(format, name, false))
	mustVhdfs(t, append(append(append([]string{"create"}, formatArgs(format, sector)...), args...), p)...)
	return p
}

// createChild runs `vhdfs create --parent parent` for a new differencing image called
// name beside parent, in parent's format, and returns its path.
func createChild(t testing.TB, parent, name string) string {
	t.Helper()
	format := formatOf(parent)
	p := filepath.Join(filepath.Dir(parent), imageName(format, name, true))
	mustVhdfs(t, append([]string{"create", "--parent", parent}, childFormatArgs(format, p)...)...)
	return p
}

// childFormatArgs ends the arguments of `vhdfs create --parent PARENT` for a child
// at path in format: --format for VHDX (the extension says it too), then path.
func childFormatArgs(format, path string) []string {
	if format == "" || format == "vhd" {
		return []string{path}
	}
	return []string{"--format", format, path}
}

// parseSize reads a size as `vhdfs create` takes it: a number with an optional K, M
// or G suffix.
func parseSize(t testing.TB, s string) int64 {
	t.Helper()
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult = 1 << 10
	case strings.HasSuffix(s, "M"):
		mult = 1 << 20
	case strings.HasSuffix(s, "G"):
		mult = 1 << 30
	}
	n, err := strconv.ParseInt(strings.TrimRight(s, "KMG"), 10, 64)
	if err != nil {
		t.Fatalf("size %q: %v", s, err)
	}
	return n * mult
}

// formatOf is the format of a test image, from its extension.
func formatOf(path string) string {
	switch filepath.Ext(path) {
	case ".vhdx", ".avhdx":
		return "vhdx"
	}
	return "vhd"
}

// chainOptions describe a test chain: a base made by `vhdfs create Create... base.vhd`
// (base.vhdx for VHDX), then Depth-1 snapshots made by `vhdfs create --parent`
// (snap1.vhd…, or snap1.avhdx…), with random writes through the Go API into each image
// while it is the top.
type chainOptions struct {
	Format     string   // "vhd" (the default) or "vhdx"
	SectorSize int64    // VHDX logical sector size: 512 (the default) or 4096; VHD is always 512
	Depth      int      // images in the chain, the base included; at least 1
	Create     []string // arguments for the base, e.g. {"--size", "32M", "--type", "fixed"}
	Writes     int      // random writes into each image
	Align      int64    // granularity of the writes: 4096 (safe for libvhdi), 512 or 1; default 4096
	MaxLen     int64    // longest write; default 256 KiB
	Seed       uint64
	// LayerWrites, if set, gives writes into image i (0 = the base) made after the
	// random ones, while it is the top: a test that wants given data in given layers
	// says so here, because a write into an image that already has a child changes
	// a VHDX's DataWriteGuid and leaves the child invalid.
	LayerWrites func(i int) []write
}

// testChain is a chain built for a test, with the expected contents of every view.
type testChain struct {
	Dir    string
	Format string   // "vhd" or "vhdx"
	Images []string // Images[0] is the base, Images[len-1] the top
	Size   int64
	// Views[i] is what the disk holds seen from Images[i] down (Views[len-1] is the
	// whole chain). Tests that write further keep it current with applyWrites.
	Views [][]byte
}

// Top is the path of the top image.
func (c *testChain) Top() string { return c.Images[len(c.Images)-1] }

// Model is the expected contents of the whole chain.
func (c *testChain) Model() []byte { return c.Views[len(c.Views)-1] }

// Files lists every image of the chain, for snapshotFiles.
func (c *testChain) Files() []string { return append([]string(nil), c.Images...) }

// makeChain builds a chain in a new temporary directory: base.vhd, snap1.vhd, … (or
// base.vhdx, snap1.avhdx, …).
func makeChain(t testing.TB, opts chainOptions) *testChain {
	t.Helper()
	return makeChainIn(t, t.TempDir(), opts)
}

// makeChainIn builds a chain in dir.
func makeChainIn(t testing.TB, dir string, opts chainOptions) *testChain {
	t.Helper()
	if opts.Depth < 1 {
		opts.Depth = 1
	}
	if opts.Align == 0 {
		opts.Align = 4096
	}
	if opts.MaxLen == 0 {
		opts.MaxLen = 256 << 10
	}
	if opts.Format == "" {
		opts.Format = "vhd"
	}
	c := &testChain{Dir: dir, Format: opts.Format}
	base := createBase(t, dir, opts.Format, opts.SectorSize, "base", opts.Create...)
	c.Images = append(c.Images, base)
	c.Size = virtualSize(t, base)
	gen := newWriteGen(opts.Seed, c.Size, opts.Align, opts.MaxLen)
	model := make([]byte, c.Size)
	for i := 0; i < opts.Depth; i++ {
		if i > 0 {
			img := createChild(t, c.Images[i-1], fmt.Sprintf("snap%d", i))
			c.Images = append(c.Images, img)
			model = bytes.Clone(model)
		}
		if opts.Writes > 0 {
			applyWrites(t, c.Images[i], model, gen.writes(opts.Writes))
		}
		if opts.LayerWrites != nil {
			applyWrites(t, c.Images[i], model, opts.LayerWrites(i))
		}
		c.Views = append(c.Views, model)
	}
	return c
}

// infoJSON is what `vhdfs info --json` prints.
type infoJSON struct {
	VirtualSize int64 `json:"virtual_size"`
	Layers      []struct {
		Depth          int               `json:"depth"`
		Path           string            `json:"path"`
		Type           string            `json:"type"`
		VirtualSize    int64             `json:"virtual_size"`
		BlockSize      int64             `json:"block_size"`
		AllocatedBytes int64             `json:"allocated_bytes"`
		Creator        string            `json:"creator"`
		UniqueID       string            `json:"unique_id"`
		ParentUniqueID string            `json:"parent_unique_id"`
		ParentName     string            `json:"parent_name"`
		FoundBy        string            `json:"found_by"`
		Details        map[string]string `json:"details"`
		Locators       []struct {
			Platform string `json:"platform"`
			Path     string `json:"path"`
		} `json:"locators"`
	} `json:"layers"`
}

// vhdfsInfo runs `vhdfs info --json` on image.
func vhdfsInfo(t testing.TB, image string) infoJSON {
	t.Helper()
	var info infoJSON
	out := mustVhdfs(t, "info", "--json", image)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("vhdfs info --json %s: %v\n%s", image, err, out)
	}
	return info
}

// virtualSize is the size `vhdfs info --json` reports.
func virtualSize(t testing.TB, image string) int64 {
	t.Helper()
	return vhdfsInfo(t, image).VirtualSize
}

// exportImage runs `vhdfs export image` into a new file in a temporary directory and
// returns its path.
// sharedInfo is vhdfsInfo with --force-share, for an image a mount has open.
func sharedInfo(t testing.TB, image string) infoJSON {
	t.Helper()
	var info infoJSON
	out := mustVhdfs(t, "info", "-U", "--json", image)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("vhdfs info -U --json %s: %v\n%s", image, err, out)
	}
	return info
}

func exportImage(t testing.TB, image string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), filepath.Base(image)+".raw")
	mustVhdfs(t, "export", image, out)
	return out
}

// exportShared is exportImage with --force-share, for an image a mount has open.
func exportShared(t testing.TB, image string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), filepath.Base(image)+".raw")
	mustVhdfs(t, "export", "-U", image, out)
	return out
}

// assertSameBytes compares got with want and names the first differing offset.
func assertSameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	if len(got) != len(want) {
		t.Errorf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	for i := range min(len(got), len(want)) {
		if got[i] != want[i] {
			j := i
			for j < min(len(got), len(want)) && got[j] != want[j] {
				j++
			}
			t.Errorf("%s: first difference at %d (sector %d): got %#02x, want %#02x; %d bytes differ there",
				what, i, i/512, got[i], want[i], j-i)
			return
		}
	}
}

// assertFileEquals compares a file's contents with want.
func assertFileEquals(t testing.TB, path string, want []byte) {
	t.Helper()
	assertSameBytes(t, path, fileBytes(t, path), want)
}

// allocatedBytes is the space a file takes on disk (st_blocks × 512).
func allocatedBytes(t testing.TB, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}

// blockStored returns a function that reports whether some image of images (any
// format, opened through probe without a lock, so a mount may hold them) stores the
// block holding off: a fixed image stores everything, a dynamic or differencing one
// the blocks with any byte present. The images are read once, up front.
func blockStored(t testing.TB, images []string) func(off int64) bool {
	t.Helper()
	type layer struct {
		fixed bool
		bs    int64
		has   map[int64]bool // block index → some byte of it is present
	}
	var layers []layer
	for _, p := range images {
		img, err := probe.Open(p, probe.ForceShare)
		if err != nil {
			t.Fatalf("open %s: %v", p, err)
		}
		l := layer{fixed: img.Type() == image.Fixed, bs: img.BlockSize(), has: map[int64]bool{}}
		for off := int64(0); !l.fixed && off < img.Size(); {
			k, present, err := img.Run(off, img.Size()-off)
			if err != nil || k <= 0 {
				img.Close()
				t.Fatalf("%s: Run(%d): %d, %v", p, off, k, err)
			}
			if present {
				for b := off / l.bs; b <= (off+k-1)/l.bs; b++ {
					l.has[b] = true
				}
			}
			off += k
		}
		img.Close()
		layers = append(layers, l)
	}
	return func(off int64) bool {
		for _, l := range layers {
			if l.fixed || l.has[off/l.bs] {
				return true
			}
		}
		return false
	}
}
