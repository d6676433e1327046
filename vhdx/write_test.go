package vhdx

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

// parentByte is what a synthetic parent holds in every byte: the view of a
// differencing image is its stored sectors over this.
const parentByte = 0xee

// view is what a chain of img over the synthetic parent shows.
func view(t *testing.T, img *Image) []byte {
	t.Helper()
	v := make([]byte, img.Size())
	if _, err := img.ReadAt(v, 0); err != nil {
		t.Fatal(err)
	}
	if !img.HasParent() {
		return v
	}
	for off := int64(0); off < img.Size(); {
		n, ok, err := img.Run(off, img.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			copy(v[off:off+n], fill(n, parentByte))
		}
		off += n
	}
	return v
}

type write struct {
	off int64
	n   int64
	c   byte
}

// writeCases are images to write into, each with the writes to make: into present,
// new, ZERO and PARTIALLY_PRESENT blocks, across block boundaries, a whole block,
// the last sector.
func writeCases() []struct {
	name   string
	build  func() *builder
	writes []write
} {
	dyn := func() *builder {
		b := newBuilder(8*MiB, MiB)
		b.states[0], b.data[0] = FullyPresent, pattern(MiB, 1)
		b.states[3] = Zero
		return b
	}
	diff := func(ss uint32) func() *builder {
		return func() *builder { b, _ := differencingImage(ss); return b }
	}
	return []struct {
		name   string
		build  func() *builder
		writes []write
	}{
		{"dynamic", dyn, []write{{4096, 512, 0x21}, {MiB - 512, 1024, 0x22}, {3*MiB + 8192, 4096, 0x23}, {5 * MiB, MiB, 0x24}, {8*MiB - 512, 512, 0x25}}},
		{"differencing-512", diff(512), []write{{512 * 8, 512, 0x31}, {MiB - 512, 1024, 0x32}, {2*MiB + 4096, 512, 0x33}, {5*MiB + 512, 1536, 0x34}, {5*MiB + 4096, 512, 0x35}, {6 * MiB, 8192, 0x36}, {7 * MiB, MiB, 0x37}}},
		{"differencing-4096", diff(4096), []write{{4096, 4096, 0x41}, {MiB - 4096, 8192, 0x42}, {4*MiB + 8192, 4096, 0x43}, {5*MiB + 4096, 4096, 0x44}, {6 * MiB, 4096, 0x45}}},
	}
}

// TestWrite writes into dynamic and differencing images and compares the view with
// a model, then again after a reopen; the write GUIDs change and the log is empty.
// qemu reads the dynamic image with the same data.
func TestWrite(t *testing.T) {
	for _, tc := range writeCases() {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.build()
			p := writeFile(t, b.build())
			img, err := Open(p, true)
			if err != nil {
				t.Fatal(err)
			}
			want := view(t, img)
			for _, w := range tc.writes {
				d := fill(w.n, w.c)
				if n, err := img.WriteAt(d, w.off); n != len(d) || err != nil {
					t.Fatalf("WriteAt(%d, %d) = %d, %v", w.off, w.n, n, err)
				}
				copy(want[w.off:], d)
			}
			if !bytes.Equal(view(t, img), want) {
				t.Fatal("the view after the writes differs from the model")
			}
			if _, err := img.WriteAt(make([]byte, 100), 0); !errors.Is(err, ErrInvalidArg) {
				t.Errorf("an unaligned write: %v", err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			img, err = Open(p, false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			h := img.Header()
			if !h.LogGuid.IsZero() || h.FileWriteGuid == b.fileWrite || h.DataWriteGuid == b.dataWrite {
				t.Errorf("after writes: log GUID %v, FileWriteGuid changed %v, DataWriteGuid changed %v", h.LogGuid, h.FileWriteGuid != b.fileWrite, h.DataWriteGuid != b.dataWrite)
			}
			if !bytes.Equal(view(t, img), want) {
				t.Fatal("the view after a reopen differs from the model")
			}
			if _, err := img.WriteAt(make([]byte, 512), 0); !errors.Is(err, ErrReadOnly) {
				t.Errorf("a write to a read-only image: %v", err)
			}
			if !img.HasParent() {
				if _, err := exec.LookPath("qemu-img"); err == nil {
					run(t, "qemu-img", "check", "-U", "-f", "vhdx", p)
					raw := filepath.Join(t.TempDir(), "x.raw")
					run(t, "qemu-img", "convert", "-U", "-f", "vhdx", "-O", "raw", p, raw)
					if got, _ := os.ReadFile(raw); !bytes.Equal(got, want) {
						t.Error("qemu-img convert differs from the model")
					}
				}
			}
		})
	}
}

// openCut opens a copy of base for writing on a cutFile that lets k writes, fsyncs
// and truncates through; the test may change the budget through left.
func openCut(t *testing.T, base string, k int) (path string, img *Image, left *int) {
	t.Helper()
	path = copyFile(t, base)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	left = new(int)
	*left = k
	img, err = OpenFile(cutFile{f, left}, path, true)
	if err != nil {
		t.Fatal(err)
	}
	return path, img, left
}

// cutFile fails every write, fsync and truncate after the first left, as a power
// loss would cut them.
type cutFile struct {
	*os.File
	left *int
}

var errCut = errors.New("cut")

func (f cutFile) step() error {
	if *f.left <= 0 {
		return errCut
	}
	*f.left--
	return nil
}

func (f cutFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.step(); err != nil {
		return 0, err
	}
	return f.File.WriteAt(p, off)
}

func (f cutFile) Sync() error {
	if err := f.step(); err != nil {
		return err
	}
	return f.File.Sync()
}

func (f cutFile) Truncate(n int64) error {
	if err := f.step(); err != nil {
		return err
	}
	return f.File.Truncate(n)
}

// TestWriteCrash cuts the writes after every k-th write, fsync or truncate: every
// cut file opens (replaying its log, read-only in memory and writable into the file,
// with the same view), and every sector shows the old or the new data.
func TestWriteCrash(t *testing.T) {
	for _, tc := range writeCases() {
		t.Run(tc.name, func(t *testing.T) {
			base := writeFile(t, tc.build().build())
			ss := int64(tc.build().logical)
			var old, want []byte // the views before and after the writes
			for k := 0; ; k++ {
				p, img, _ := openCut(t, base, k)
				if old == nil {
					old = view(t, img)
					want = append([]byte(nil), old...)
					for _, w := range tc.writes {
						copy(want[w.off:], fill(w.n, w.c))
					}
				}
				cut := false
				for _, w := range tc.writes {
					if _, err := img.WriteAt(fill(w.n, w.c), w.off); err != nil {
						if !errors.Is(err, errCut) {
							t.Fatalf("cut after %d: %v", k, err)
						}
						cut = true
						break
					}
				}
				// The metadata of new blocks waits for Sync: a cut there counts too.
				if err := img.Sync(); !cut && err != nil {
					if !errors.Is(err, errCut) {
						t.Fatalf("cut after %d: sync: %v", k, err)
					}
					cut = true
				}
				img.Close()
				ro, err := Open(p, false)
				if err != nil {
					t.Fatalf("cut after %d: the file does not open: %v", k, err)
				}
				got := view(t, ro)
				ro.Close()
				for s := int64(0); s < int64(len(got))/ss; s++ {
					g := got[s*ss : (s+1)*ss]
					if !bytes.Equal(g, old[s*ss:(s+1)*ss]) && !bytes.Equal(g, want[s*ss:(s+1)*ss]) {
						t.Fatalf("cut after %d: sector %d is neither old nor new", k, s)
					}
				}
				rw, err := Open(p, true)
				if err != nil {
					t.Fatalf("cut after %d: a writable open fails: %v", k, err)
				}
				if !bytes.Equal(view(t, rw), got) {
					t.Fatalf("cut after %d: replaying into the file shows another view", k)
				}
				rw.Close()
				if !cut {
					if !bytes.Equal(got, want) {
						t.Fatal("uncut: the view differs from the model")
					}
					t.Logf("%d cut points", k)
					return
				}
			}
		})
	}
}

// copyFile copies the file at src to a new temporary file in the kernel
// (copy_file_range), and returns its path.
func copyFile(t *testing.T, src string) string {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	p := filepath.Join(t.TempDir(), "x.vhdx")
	out, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestWriteAfterFailedCommit: once a metadata update fails half way, the handle
// takes no more writes (its log may be pending in the file); one that failed before
// the header named the log does. Either way the file opens with each sector old or
// new.
func TestWriteAfterFailedCommit(t *testing.T) {
	b := newBuilder(8*MiB, MiB)
	b.states[0], b.data[0] = FullyPresent, fill(MiB, 1)
	base := writeFile(t, b.build())
	refused, accepted := 0, 0
	for k := 0; ; k++ {
		p, img, left := openCut(t, base, k)
		old := view(t, img)
		// A new block's metadata goes through the log at the Sync.
		_, err := img.WriteAt(fill(4096, 0x11), 5*MiB)
		if err == nil {
			err = img.Sync()
		}
		if err == nil {
			img.Close()
			break
		}
		*left = 1 << 30
		_, err2 := img.WriteAt(fill(4096, 0x22), 6*MiB)
		if err2 == nil {
			err2 = img.Sync()
		}
		switch {
		case err2 == nil:
			accepted++
		case errors.Is(err2, errCut) && strings.Contains(err2.Error(), "earlier metadata update failed"):
			refused++
			if err := img.SetID(image.NewID()); !errors.Is(err, errCut) {
				t.Errorf("cut after %d: SetID after a failed update: %v", k, err)
			}
		default:
			t.Fatalf("cut after %d: the second write: %v", k, err2)
		}
		img.Close()
		ro, err := Open(p, false)
		if err != nil {
			t.Fatalf("cut after %d: %v", k, err)
		}
		got := view(t, ro)
		ro.Close()
		want := append([]byte(nil), old...)
		copy(want[5*MiB:], fill(4096, 0x11))
		if err2 == nil {
			copy(want[6*MiB:], fill(4096, 0x22))
		}
		for s := int64(0); s < int64(len(got))/512; s++ {
			g := got[s*512 : (s+1)*512]
			if !bytes.Equal(g, old[s*512:(s+1)*512]) && !bytes.Equal(g, want[s*512:(s+1)*512]) {
				t.Fatalf("cut after %d: sector %d is neither old nor new", k, s)
			}
		}
		if err2 == nil && !bytes.Equal(got[6*MiB:6*MiB+4096], fill(4096, 0x22)) {
			t.Fatalf("cut after %d: the accepted second write is not in the file", k)
		}
	}
	if refused == 0 || accepted == 0 {
		t.Errorf("%d second writes refused, %d accepted: want some of each", refused, accepted)
	}
}
