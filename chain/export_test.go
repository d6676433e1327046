package chain

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/probe"
	"github.com/vhdfs/vhdfs/vhd"
	"github.com/vhdfs/vhdfs/vhdx"
)

// TestExportKernelCopy exports two-layer chains of each format to a sparse file and
// compares its bytes with the model and its holes with the model's all-zero granules;
// with the file system sharing blocks (every non-zero byte must be shared, and no more
// than the non-zero granules), sharing only some ranges (the rest are written),
// refusing (the rest is written from the buffer) or failing (each chunk is read
// through the chain instead).
func TestExportKernelCopy(t *testing.T) {
	realClone := cloneRange
	for _, format := range []string{"vhd", "vhdx"} {
		for _, tc := range []struct {
			name string
			// clone stands for FICLONERANGE; wantKernel says whether it moves the
			// model's non-zero bytes, someShared that it shares some, maxCalls
			// bounds its calls (0: no bound).
			clone      func(src *os.File, srcOff int64, dst *os.File, dstOff, n int64) error
			wantKernel bool
			someShared bool
			maxCalls   int
		}{
			// ext4 (the test's file system) shares no blocks: copy_file_range
			// stands in for a clone that works, in whole blocks only, as
			// FICLONERANGE does.
			{"kernel shares", wholeBlockClone, true, true, 0},
			{"some ranges refused: written, and the next one tried", func(src *os.File, srcOff int64, dst *os.File, dstOff, n int64) error {
				if dstOff%(8<<10) != 0 {
					return errUnaligned
				}
				return wholeBlockClone(src, srcOff, dst, dstOff, n)
			}, false, true, 0},
			{"kernel refuses: WriteAt from then on", func(*os.File, int64, *os.File, int64, int64) error {
				return fmt.Errorf("test: %w", image.ErrNoKernelCopy)
			}, false, false, 8}, // at most one per worker, which may all try at once
			{"copy fails: each chunk through the chain", func(*os.File, int64, *os.File, int64, int64) error {
				return errors.New("test: copy failed")
			}, false, false, 0},
		} {
			t.Run(format+"/"+tc.name, func(t *testing.T) {
				c, model := exportChain(t, format)
				var mu sync.Mutex // Export's workers call cloneRange and progress
				var calls int
				var kernelBytes, last int64
				copied := make([]bool, len(model))
				offered := make([]bool, len(model)) // given to the clone, shared or not
				cloneRange = func(src *os.File, srcOff int64, dst *os.File, dstOff, n int64) error {
					err := tc.clone(src, srcOff, dst, dstOff, n)
					mu.Lock()
					defer mu.Unlock()
					calls++
					for i := dstOff; i < dstOff+n; i++ {
						offered[i] = true
					}
					if err == nil {
						kernelBytes += n
						for i := dstOff; i < dstOff+n; i++ {
							copied[i] = true
						}
					}
					return err
				}
				t.Cleanup(func() { cloneRange = realClone })
				out, err := os.Create(filepath.Join(t.TempDir(), "out.raw"))
				if err != nil {
					t.Fatal(err)
				}
				defer out.Close()
				if err := Export(c, out, func(done int64) { mu.Lock(); last = max(last, done); mu.Unlock() }); err != nil {
					t.Fatalf("Export: %v", err)
				}
				if last != int64(len(model)) {
					t.Errorf("progress ended at %d, want %d", last, len(model))
				}
				if got := readFile(t, out.Name()); !bytes.Equal(got, model) {
					t.Fatalf("exported image differs from the model at %d (len %d)", firstDiff(got, model), len(got))
				}
				checkHoles(t, out, model)
				share := shareable(t, c, model)
				if tc.wantKernel {
					for i := range model {
						if share[i/sparseGranule] && !copied[i] {
							t.Fatalf("byte %d, in a whole non-zero granule at the same offset within a block of its file, was not shared by the clone", i)
						}
					}
					// Less where a granule is split between pieces and one holds only zeros.
					if most := nonZeroBytes(model); kernelBytes > most {
						t.Errorf("the clone shared %d bytes, more than the %d of the non-zero granules", kernelBytes, most)
					}
				}
				if tc.someShared {
					if kernelBytes == 0 {
						t.Errorf("the clone shared nothing")
					}
					for i := range model {
						if share[i/sparseGranule] && !offered[i] {
							t.Fatalf("byte %d, in a whole non-zero granule at the same offset within a block of its file, was never given to the clone", i)
						}
					}
				}
				if tc.maxCalls > 0 && (calls == 0 || calls > tc.maxCalls) {
					t.Errorf("the clone was tried %d times, want 1 to %d", calls, tc.maxCalls)
				}
			})
		}
	}
}

// exportChain makes a two-layer chain of format and its model: random data in both
// layers, zeros written over data (stored all-zero granules), a hole punched in a
// data block of the base's file, a size that is not a whole number of export chunks
// and, for VHD, a top larger than its base.
func exportChain(t *testing.T, format string) (*Chain, []byte) {
	t.Helper()
	dir := t.TempDir()
	r := newRand(t, 21)
	const baseSize = 9*mib + 512
	topSize, baseBS, topBS := int64(baseSize), int64(mib), int64(mib)
	base := filepath.Join(dir, "base."+format)
	if format == "vhd" {
		topSize, baseBS, topBS = 13*mib+512, 64*kib, 4*kib
		createBase(t, dir, "base.vhd", vhd.TypeDynamic, baseSize, baseBS)
	} else if err := vhdx.Create(base, vhdx.CreateOptions{Type: vhdx.TypeDynamic, Size: baseSize, BlockSize: baseBS}); err != nil {
		t.Fatal(err)
	}
	model := make([]byte, topSize)
	c := openChain(t, base, true)
	write := func(off int64, p []byte) {
		t.Helper()
		if _, err := c.WriteAt(p, off); err != nil {
			t.Fatalf("WriteAt(%d bytes at %d): %v", len(p), off, err)
		}
		copy(model[off:], p)
	}
	write(0, randBytes(r, 3*mib))
	write(mib+4*kib, make([]byte, 36*kib))   // zeros in a stored block, over data
	write(5*mib, make([]byte, 64*kib))       // zeros into an empty block
	write(baseSize-5000, randBytes(r, 5000)) // the base's last, partial granule
	writeRandom(t, r, c, model[:baseSize], 30, baseBS)
	closeChain(t, c)
	punchData(t, base, model, 256*kib, 64*kib)

	top := filepath.Join(dir, "top."+format)
	if format == "vhd" {
		createSizedChild(t, dir, "top.vhd", base, topSize, topBS)
	} else {
		img, err := probe.Open(base, probe.ReadOnly)
		if err != nil {
			t.Fatal(err)
		}
		if err := img.CreateChild(top, image.ChildOptions{}); err != nil {
			t.Fatal(err)
		}
		img.Close()
	}
	c = openChain(t, top, true)
	write(2*mib+3, randBytes(r, 100*kib))
	write(0, make([]byte, 8*kib+100)) // zeros in the top over the base's data
	if topSize > baseSize {
		write(baseSize+1000, randBytes(r, 70000)) // past the base's end
	}
	writeRandom(t, r, c, model, 30, topBS)
	return c, model
}

// punchData punches a hole in the file of the image at path where it stores [off,
// off+n) of its view (off and n multiples of 4 KiB inside one block), checks that
// the file system made a hole, and zeros the model there.
func punchData(t *testing.T, path string, model []byte, off, n int64) {
	t.Helper()
	img, err := probe.Open(path, probe.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	f, fileOff, k, ok := img.FileRun(off, n)
	img.Close()
	if !ok || k != n || fileOff%sparseGranule != 0 {
		t.Fatalf("%s: FileRun(%d, %d) = %d, %d, %v: not a stored, aligned run", path, off, n, fileOff, k, ok)
	}
	f, err = os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, fileOff, n); err != nil {
		t.Fatalf("punch %d bytes at %d of %s: %v", n, fileOff, path, err)
	}
	if h, err := unix.Seek(int(f.Fd()), fileOff, unix.SEEK_HOLE); err != nil || h != fileOff {
		t.Fatalf("%s: SEEK_HOLE from %d = %d, %v: the file system made no hole", path, fileOff, h, err)
	}
	clear(model[off : off+n])
}

// checkHoles compares the data and holes of out (SEEK_DATA, SEEK_HOLE, after an
// fsync) granule by granule with model: a granule is a hole if and only if it is all
// zeros in model.
func checkHoles(t *testing.T, out *os.File, model []byte) {
	t.Helper()
	if err := out.Sync(); err != nil {
		t.Fatal(err)
	}
	size := int64(len(model))
	fd := int(out.Fd())
	data := make([]bool, (size+sparseGranule-1)/sparseGranule)
	for off := int64(0); off < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			break
		}
		if err != nil {
			t.Fatalf("SEEK_DATA from %d: %v", off, err)
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			t.Fatalf("SEEK_HOLE from %d: %v", d, err)
		}
		for g := d / sparseGranule; g*sparseGranule < h; g++ {
			data[g] = true
		}
		off = h
	}
	bad := 0
	for g := range data {
		p := model[int64(g)*sparseGranule : min(int64(g+1)*sparseGranule, size)]
		if want := !fileio.AllZero(p); data[g] != want && bad < 5 {
			t.Errorf("granule at %d: data %v, want %v", int64(g)*sparseGranule, data[g], want)
			bad++
		}
	}
}

// nonZeroBytes counts the bytes of model in granules that are not all zeros.
func nonZeroBytes(model []byte) int64 {
	var n int64
	for off := 0; off < len(model); off += sparseGranule {
		if p := model[off:min(off+sparseGranule, len(model))]; !fileio.AllZero(p) {
			n += int64(len(p))
		}
	}
	return n
}

// TestExportStreamPipe: ExportStream into a pipe splices the stored runs and writes
// the zeros, in order, every byte, as the model says; os.Pipe is non-blocking, so a
// full pipe waits through the poller. A closed reader ends it with EPIPE, not a hang.
func TestExportStreamPipe(t *testing.T) {
	for _, format := range []string{"vhd", "vhdx"} {
		t.Run(format, func(t *testing.T) {
			c, model := exportChain(t, format)
			pr, pw, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			got := make(chan []byte)
			go func() {
				b, _ := io.ReadAll(pr)
				pr.Close()
				got <- b
			}()
			var last int64
			err = ExportStream(c, pw, func(done int64) { last = done })
			pw.Close()
			if err != nil {
				t.Fatalf("ExportStream: %v", err)
			}
			if b := <-got; !bytes.Equal(b, model) {
				t.Fatalf("streamed image differs from the model at %d (len %d)", firstDiff(b, model), len(b))
			}
			if last != int64(len(model)) {
				t.Errorf("progress ended at %d, want %d", last, len(model))
			}

			pr, pw, err = os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			pr.Close()
			if err := ExportStream(c, pw, nil); !errors.Is(err, syscall.EPIPE) {
				t.Errorf("ExportStream to a pipe without a reader: %v, want EPIPE", err)
			}
			pw.Close()
		})
	}
}

// wholeBlockClone is a clone that works in whole 4 KiB blocks only, as FICLONERANGE
// does, by copy_file_range (the test's ext4 shares no blocks).
func wholeBlockClone(src *os.File, srcOff int64, dst *os.File, dstOff, n int64) error {
	if srcOff%4096 != 0 || dstOff%4096 != 0 || n%4096 != 0 {
		return errUnaligned
	}
	_, err := fileio.CopyRange(src, srcOff, dst, dstOff, n, 1, dst.Name())
	return err
}

// shareable marks the output granules an export must give to the clone: whole, not
// all zeros, and inside one run of an image file that sits at the same offset within
// a 4 KiB block as in the output.
func shareable(t *testing.T, c *Chain, model []byte) []bool {
	t.Helper()
	share := make([]bool, (len(model)+sparseGranule-1)/sparseGranule)
	var pos int64
	if _, err := c.FileRuns(nil, 0, int64(len(model)), func(p Piece) error {
		if p.File != nil && (p.FileOff-pos)%sparseGranule == 0 {
			for g := (pos + sparseGranule - 1) / sparseGranule * sparseGranule; g+sparseGranule <= pos+p.N; g += sparseGranule {
				share[g/sparseGranule] = !fileio.AllZero(model[g : g+sparseGranule])
			}
		}
		pos += p.N
		return nil
	}); err != nil {
		t.Fatalf("FileRuns: %v", err)
	}
	return share
}
