package test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/vhdfs/vhdfs/chain"
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

// chainOptions describe a test chain: a base made by `vhdfs create Create... base.vhd`,
// then Depth-1 snapshots made by `vhdfs create --parent`, with random writes through
// the Go API into each image while it is the top.
type chainOptions struct {
	Depth  int      // images in the chain, the base included; at least 1
	Create []string // arguments for the base, e.g. {"--size", "32M", "--type", "fixed"}
	Writes int      // random writes into each image
	Align  int64    // granularity of the writes: 4096 (safe for libvhdi), 512 or 1; default 4096
	MaxLen int64    // longest write; default 256 KiB
	Seed   uint64
}

// testChain is a chain built for a test, with the expected contents of every view.
type testChain struct {
	Dir    string
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

// makeChain builds a chain in a new temporary directory: base.vhd, snap1.vhd, …
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
	c := &testChain{Dir: dir}
	base := filepath.Join(dir, "base.vhd")
	mustVhdfs(t, append(append([]string{"create"}, opts.Create...), base)...)
	c.Images = append(c.Images, base)
	c.Size = virtualSize(t, base)
	gen := newWriteGen(opts.Seed, c.Size, opts.Align, opts.MaxLen)
	model := make([]byte, c.Size)
	for i := 0; i < opts.Depth; i++ {
		if i > 0 {
			img := filepath.Join(dir, fmt.Sprintf("snap%d.vhd", i))
			mustVhdfs(t, "create", "--parent", c.Images[i-1], img)
			c.Images = append(c.Images, img)
			model = bytes.Clone(model)
		}
		if opts.Writes > 0 {
			applyWrites(t, c.Images[i], model, gen.writes(opts.Writes))
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
