package chain

import (
	"context"
	"errors"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/probe"
)

// TestConvert flattens two-layer chains of each format (exportChain: stored zeros over
// data, a hole punched in a data block, a size that is not a whole number of chunks
// or granules) into a new image of each format and type, and reads it back: the
// model's bytes, zeros past them (a larger dst), a block stored in a dynamic dst
// exactly where the model has data, and a fixed dst's file taking space only for data.
func TestConvert(t *testing.T) {
	for _, src := range []string{"vhd", "vhdx"} {
		for _, tc := range []struct {
			format string
			typ    image.Type
			extra  int64 // dst larger than the chain by this much
		}{
			{"vhd", image.Dynamic, 0},
			{"vhd", image.Fixed, 0},
			{"vhdx", image.Dynamic, 0},
			{"vhdx", image.Fixed, 0},
			{"vhd", image.Fixed, 1<<20 - 512}, // --azure: rounded up to a MiB
		} {
			name := src + " to " + tc.format + " " + tc.typ.String()
			if tc.extra > 0 {
				name += ", larger"
			}
			t.Run(name, func(t *testing.T) {
				c, model := exportChain(t, src)
				defer closeChain(t, c)
				size := c.Size() + tc.extra
				path := filepath.Join(t.TempDir(), "out."+tc.format)
				if err := probe.Create(path, probe.CreateOptions{Format: tc.format, Type: tc.typ, Size: size,
					ExactSize: tc.format == "vhd", BlockSize: 1 << 20}); err != nil {
					t.Fatal(err)
				}
				dst, err := probe.Open(path, probe.Writable)
				if err != nil {
					t.Fatal(err)
				}
				var last atomic.Int64 // progress comes from every worker
				progress := func(done int64) {
					for v := last.Load(); done > v && !last.CompareAndSwap(v, done); v = last.Load() {
					}
				}
				if err := Convert(context.Background(), c, dst, progress); err != nil {
					dst.Close()
					t.Fatal(err)
				}
				if last.Load() != c.Size() {
					t.Errorf("progress ended at %d, want %d", last.Load(), c.Size())
				}
				if err := dst.Sync(); err != nil {
					t.Fatal(err)
				}
				if err := dst.Close(); err != nil {
					t.Fatal(err)
				}
				img, err := probe.Open(path, probe.ReadOnly)
				if err != nil {
					t.Fatal(err)
				}
				defer img.Close()
				if img.Size() != size {
					t.Fatalf("size %d, want %d", img.Size(), size)
				}
				got := make([]byte, size)
				if _, err := img.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(got[:len(model)], model); i >= 0 {
					t.Fatalf("first difference at %d", i)
				}
				if !fileio.AllZero(got[len(model):]) {
					t.Errorf("not zeros past the chain's %d bytes", len(model))
				}
				if p := serious(img.Check()); len(p) > 0 {
					t.Errorf("check: %v", p)
				}
				if tc.typ == image.Dynamic {
					bs := img.BlockSize()
					for off := int64(0); off < size; off += bs {
						_, present, err := img.Run(off, 1)
						if err != nil {
							t.Fatal(err)
						}
						want := off < int64(len(model)) && !fileio.AllZero(model[off:min(off+bs, int64(len(model)))])
						if present != want {
							t.Errorf("block at %d stored %v, want %v", off, present, want)
						}
					}
				}
				// The file takes the model's data and the metadata, no more: a fixed
				// dst's zeros are holes. VHDX's metadata (headers, log, region
				// tables, BAT) takes up to 5 MiB; VHD's a sector or a 4 KiB block
				// per block and the tables.
				var st syscall.Stat_t
				if err := syscall.Stat(path, &st); err != nil {
					t.Fatal(err)
				}
				meta := int64(256 << 10)
				if tc.format == "vhdx" {
					meta = 11 << 19
				}
				if got, data := st.Blocks*512, nonZeroBytes(model); got > data+meta {
					t.Errorf("%d bytes allocated, more than the data's %d and %d of metadata", got, data, meta)
				}
			})
		}
	}
}

// TestConvertRefuses: a dst smaller than the chain, and a done context, which stops
// the convert before its first chunk.
func TestConvertRefuses(t *testing.T) {
	c, _ := exportChain(t, "vhdx")
	defer closeChain(t, c)
	for _, tc := range []struct {
		name string
		size int64
		ctx  func() context.Context
		want error
	}{
		{"dst smaller than the chain", c.Size() - 512, context.Background, image.ErrInvalidArg},
		{"interrupted", c.Size(), func() context.Context {
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			return ctx
		}, context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "out.vhdx")
			if err := probe.Create(path, probe.CreateOptions{Format: "vhdx", Type: image.Dynamic, Size: tc.size}); err != nil {
				t.Fatal(err)
			}
			dst, err := probe.Open(path, probe.Writable)
			if err != nil {
				t.Fatal(err)
			}
			defer dst.Close()
			if err := Convert(tc.ctx(), c, dst, nil); !errors.Is(err, tc.want) {
				t.Fatalf("Convert: %v, want %v", err, tc.want)
			}
			if n := dst.AllocatedBytes(); n != 0 {
				t.Errorf("%d bytes of blocks allocated, want none", n)
			}
		})
	}
}

// serious drops the notes (such as blktap's view of an exact-size geometry) from ps.
func serious(ps []image.Problem) []image.Problem {
	var out []image.Problem
	for _, p := range ps {
		if p.Severity > image.Note {
			out = append(out, p)
		}
	}
	return out
}
