package chain

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/vhd"
)

func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is required for this test and is missing (run 'make deps'; package libvhdi-utils / fuse3): %v", name, err)
	}
	return p
}

// mounted reports whether dir is a mount point, from /proc/self/mountinfo.
func mounted(t *testing.T, dir string) bool {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fields := strings.Fields(s.Text()); len(fields) > 4 && fields[4] == dir {
			return true
		}
	}
	return false
}

// TestLibvhdiAgrees builds depth-3 chains with 4 KiB-aligned random writes, mounts the
// top with vhdimount and compares each view it shows with what chain reads: vhdi3 is
// the whole chain, vhdi2 the chain from depth 1, vhdi1 the base (libvhdi numbers
// from the base up).
//
// Two bugs of libvhdi 20210425 (Debian 12) shape the test, not vhdfs: it resolves
// differencing bitmaps 8 sectors at a time (hence 4 KiB-aligned writes), and a single
// read that covers a run of parent sectors crossing a block boundary returns parent
// data for the rest of the next block, set bits or not (so the same disk reads
// differently with 4 KiB and 128 KiB requests). The mount therefore uses direct_io
// and the test reads one block per request.
func TestLibvhdiAgrees(t *testing.T) {
	vhdimount := requireTool(t, "vhdimount")
	fusermount := requireTool(t, "fusermount3")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Fatalf("FUSE is required for this test: %v", err)
	}
	for _, bs := range []int64{2 * mib, 64 * kib} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			dir := t.TempDir()
			r := newRand(t, uint64(bs))
			const size = 8 * mib
			path := createBase(t, dir, "base.vhd", vhd.TypeDynamic, size, bs)
			for layer := 0; layer < 3; layer++ {
				if layer > 0 {
					path = createChild(t, dir, fmt.Sprintf("layer%d.vhd", layer), path, 0)
				}
				c := openChain(t, path, true)
				for range 25 {
					off := r.Int64N(size/4096) * 4096
					n := min((1+r.Int64N(3*bs/4096+2))*4096, size-off)
					p := randBytes(r, int(n))
					if r.IntN(5) == 0 {
						p = make([]byte, n)
					}
					if _, err := c.WriteAt(p, off); err != nil {
						t.Fatal(err)
					}
				}
				closeChain(t, c)
			}
			c := openChain(t, path, false)

			mnt := t.TempDir()
			logPath := filepath.Join(dir, "vhdimount.log")
			logf, err := os.Create(logPath)
			if err != nil {
				t.Fatal(err)
			}
			defer logf.Close()
			cmd := exec.Command(vhdimount, "-X", "direct_io", path, mnt)
			// A file, not a pipe: the daemon that stays behind must not hold our output open.
			cmd.Stdout, cmd.Stderr = logf, logf
			err = cmd.Run()
			t.Cleanup(func() {
				if !mounted(t, mnt) {
					return
				}
				if out, err := exec.Command(fusermount, "-u", mnt).CombinedOutput(); err != nil {
					t.Errorf("fusermount3 -u %s: %v\n%s", mnt, err, out)
				}
				if mounted(t, mnt) {
					t.Errorf("%s is still mounted after the test", mnt)
					exec.Command(fusermount, "-u", "-z", mnt).Run()
				}
			})
			if err != nil {
				t.Fatalf("vhdimount %s %s: %v\n%s", path, mnt, err, readFile(t, logPath))
			}
			// vhdimount forks into the background only once the mount is up: no waiting.
			if !mounted(t, mnt) {
				t.Fatalf("vhdimount returned before %s was mounted", mnt)
			}
			entries, err := os.ReadDir(mnt)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, e := range entries {
				names = append(names, e.Name())
			}
			if len(names) != 3 {
				t.Fatalf("the mount holds %q, want vhdi1, vhdi2 and vhdi3", names)
			}
			for d := 0; d < 3; d++ {
				got := readBlocks(t, filepath.Join(mnt, fmt.Sprintf("vhdi%d", 3-d)), size, bs)
				want := make([]byte, size)
				if _, err := c.ReadAtDepth(want, 0, d); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Errorf("vhdi%d differs from depth %d at %d (lengths %d, %d)", 3-d, d, firstDiff(got, want), len(got), len(want))
				}
			}
			if out, err := exec.Command(fusermount, "-u", mnt).CombinedOutput(); err != nil {
				t.Fatalf("fusermount3 -u: %v\n%s", err, out)
			}
			if mounted(t, mnt) {
				t.Fatalf("%s still mounted after fusermount3 -u", mnt)
			}
		})
	}
}

// readBlocks reads size bytes of the file at path with one aligned read per block.
func readBlocks(t *testing.T, path string, size, bs int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := make([]byte, size)
	for off := int64(0); off < size; off += bs {
		if n, err := f.ReadAt(out[off:min(off+bs, size)], off); err != nil || int64(n) != min(bs, size-off) {
			t.Fatalf("read %s at %d: %d, %v", path, off, n, err)
		}
	}
	if n, _ := f.ReadAt(make([]byte, 1), size); n != 0 {
		t.Errorf("%s is longer than %d bytes", path, size)
	}
	return out
}
