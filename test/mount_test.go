package test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The end-to-end tests of a mount: each mounts a chain through /dev/fuse with the real
// binary, drives the mount from this process and from child processes (dd, qemu-img,
// fio, losetup, mkfs.ext4), and compares what it shows with an in-test model, with
// `vhdfs export` and with libvhdi. Every mount must be gone when a test ends: one a
// test leaves behind fails it.

func init() {
	// A binary built with -race sleeps a second before it exits (GORACE's
	// atexit_sleep_ms defaults to 1000): that second would be most of every vhdfs
	// command's run time here.
	if raceEnabled && os.Getenv("GORACE") == "" {
		os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
}

// mRaceLog makes the mount processes started with env report data races into files
// of a new directory instead of stderr (a background mount's stderr is /dev/null), and
// fails the test at its end if any report is there. It returns the environment.
func mRaceLog(t testing.TB) []string {
	t.Helper()
	if !raceEnabled {
		return os.Environ()
	}
	// Not t.TempDir(): its name holds the test's, and GORACE splits on commas.
	dir, err := os.MkdirTemp("", "vhdfs-race-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		defer os.RemoveAll(dir)
		reports, _ := filepath.Glob(filepath.Join(dir, "race*"))
		for _, r := range reports {
			t.Errorf("the mount process found a data race:\n%s", fileBytes(t, r))
		}
	})
	return append(os.Environ(), "GORACE=atexit_sleep_ms=0 log_path="+filepath.Join(dir, "race"))
}

// mMountpoint makes an empty directory to mount on.
func mMountpoint(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// mCleanupMount fails the test if dir is still mounted when it ends (unless it failed
// already), then unmounts it: with `vhdfs umount`, which waits for the mount process,
// or failing that (a dead mount) with a lazy fusermount3.
func mCleanupMount(t testing.TB, dir string) {
	t.Helper()
	t.Cleanup(func() {
		if !mountedAt(t, dir) {
			return
		}
		if !t.Failed() {
			t.Errorf("%s is still mounted at the end of the test", dir)
		}
		if _, _, code := vhdfs(t, "umount", dir); code != 0 || mountedAt(t, dir) {
			if out, err := exec.Command("fusermount3", "-u", "-z", dir).CombinedOutput(); err != nil {
				t.Errorf("fusermount3 -u -z %s: %v: %s", dir, err, out)
			}
		}
		if mountedAt(t, dir) {
			t.Errorf("%s is still mounted after the cleanup", dir)
		}
	})
}

// mMount runs `vhdfs mount [flags] image dir`, which must succeed with the mount ready.
func mMount(t testing.TB, image, dir string, flags ...string) {
	t.Helper()
	requireTool(t, "fusermount3")
	env := mRaceLog(t) // checked after the unmount
	mCleanupMount(t, dir)
	args := append(append([]string{"mount"}, flags...), image, dir)
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, vhdfsBin, args...)
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("vhdfs %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if !mountedAt(t, dir) {
		t.Fatalf("vhdfs mount %s %s returned, but nothing is mounted", image, dir)
	}
}

// mUmount runs `vhdfs umount dir`, which must succeed and leave nothing mounted.
func mUmount(t testing.TB, dir string) {
	t.Helper()
	mustVhdfs(t, "umount", dir)
	if mountedAt(t, dir) {
		t.Fatalf("vhdfs umount %s returned, but it is still mounted", dir)
	}
}

// mMountRead mounts image read-only, reads the whole disk.raw and unmounts it.
func mMountRead(t testing.TB, image string) []byte {
	t.Helper()
	mnt := mMountpoint(t)
	mMount(t, image, mnt, "-r")
	b := fileBytes(t, filepath.Join(mnt, "disk.raw"))
	mUmount(t, mnt)
	return b
}

// mForeground is a `vhdfs mount -f` child process.
type mForeground struct {
	cmd    *exec.Cmd
	done   chan struct{} // closed when the process has exited
	err    error         // of Wait; read after done
	stderr bytes.Buffer  // read after done
}

// mStartForeground starts `vhdfs mount -f [flags] image dir` and returns once the
// mount is up. When the test ends the process must have exited (after the mount's
// cleanup); one still running is killed and fails the test.
func mStartForeground(t testing.TB, image, dir string, flags ...string) *mForeground {
	t.Helper()
	requireTool(t, "fusermount3")
	p := &mForeground{done: make(chan struct{})}
	p.cmd = exec.Command(vhdfsBin, append(append([]string{"mount", "-f"}, flags...), image, dir)...)
	p.cmd.Stderr = &p.stderr
	p.cmd.Env = mRaceLog(t)
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	// Registered before the mount's cleanup, so it runs after it.
	t.Cleanup(func() {
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			t.Errorf("vhdfs mount -f %s is still running at the end of the test; killing it", dir)
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	mCleanupMount(t, dir)
	// The -f process says nothing when it is ready: wait for the mount to appear.
	deadline := time.Now().Add(30 * time.Second)
	for delay := time.Millisecond; !mountedAt(t, dir); delay = min(2*delay, 50*time.Millisecond) {
		select {
		case <-p.done:
			t.Fatalf("vhdfs mount -f %s %s exited before mounting: %v\n%s", image, dir, p.err, p.stderr.String())
		case <-time.After(delay):
		}
		if time.Now().After(deadline) {
			t.Fatalf("vhdfs mount -f %s %s: not mounted after 30s", image, dir)
		}
	}
	return p
}

// wait waits for the process to exit and returns Wait's error.
func (p *mForeground) wait(t testing.TB) error {
	t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(cmdTimeout):
		t.Fatalf("vhdfs mount -f did not exit")
		return nil
	}
}

// mStatusJSON is the part of the control file's JSON the tests read.
type mStatusJSON struct {
	PID      int    `json:"pid"`
	ReadOnly bool   `json:"read_only"`
	State    string `json:"state"`
	Chain    []struct {
		Depth       int    `json:"depth"`
		Path        string `json:"path"`
		Type        string `json:"type"`
		VirtualSize int64  `json:"virtual_size"`
	} `json:"chain"`
	Last *struct {
		Command string `json:"command"`
		Errno   int    `json:"errno"`
		Error   string `json:"error"`
		Message string `json:"message"`
	} `json:"last"`
}

// mStatus reads the control file.
func mStatus(t testing.TB, mnt string) mStatusJSON {
	t.Helper()
	b := fileBytes(t, filepath.Join(mnt, "control"))
	var st mStatusJSON
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("control is not JSON: %v\n%s", err, b)
	}
	return st
}

// mControl writes one command to the control file in one write and returns the
// write's error (nil, or an *os.PathError holding the errno).
func mControl(t testing.TB, mnt, cmd string) error {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(mnt, "control"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatalf("open control for writing: %v", err)
	}
	_, werr := f.Write([]byte(cmd))
	if err := f.Close(); err != nil && werr == nil {
		werr = err
	}
	return werr
}

// mCheck runs `vhdfs check image`, which must find the chain consistent.
func mCheck(t testing.TB, image string) {
	t.Helper()
	if out, errs, code := vhdfs(t, "check", image); code != 0 {
		t.Errorf("vhdfs check %s: exit %d\n%s%s", image, code, out, errs)
	}
}

// mRandBytes returns n random bytes.
func mRandBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// mPwrite writes p at off with pwrite(2) until all of it is written or a call fails,
// and returns the bytes written. (os.File.WriteAt does not count the bytes of a short
// write when the next call fails, as one across the end of disk.raw does.)
func mPwrite(f *os.File, p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		k, err := syscall.Pwrite(int(f.Fd()), p[n:], off+int64(n))
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if k == 0 {
			return n, io.ErrShortWrite
		}
		n += k
	}
	return n, nil
}

// mLayerName is the name of the file of layers/ that shows the chain from image down
// at depth.
func mLayerName(depth int, image string) string {
	base := filepath.Base(image)
	return fmt.Sprintf("%d-%s.raw", depth, strings.TrimSuffix(base, filepath.Ext(base)))
}

// TestMountReadsMatchExport: disk.raw read by dd and converted by qemu-img equals
// `vhdfs export` of the chain and the model; layers/N-NAME.raw equals the export of
// the image at depth N; reading through a read-write mount writes nothing.
func TestMountReadsMatchExport(t *testing.T) {
	requireTool(t, "dd")
	requireTool(t, "qemu-img")
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tc := range []struct {
			name string
			opts chainOptions
		}{
			{"depth 3, dynamic base, unaligned writes", chainOptions{Format: format, Depth: 3, Create: []string{"--size", "48M"}, Writes: 20, Align: 1, MaxLen: 600 << 10, Seed: 101}},
			{"depth 3, fixed base, sector writes", chainOptions{Format: format, Depth: 3, Create: []string{"--size", "16M", "--type", "fixed"}, Writes: 20, Align: 512, Seed: 102}},
			{"depth 4, 64K blocks", chainOptions{Format: format, Depth: 4, Create: []string{"--size", "32M", "--block-size", "64K"}, Writes: 25, Align: 512, MaxLen: 200 << 10, Seed: 103}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				opts := tc.opts
				opts.Format = format
				c := makeChain(t, opts)
				snap := snapshotFiles(t, c.Dir)
				export := fileBytes(t, exportImage(t, c.Top()))
				assertSameBytes(t, "export", export, c.Model())

				mnt := mMountpoint(t)
				mMount(t, c.Top(), mnt)
				disk := filepath.Join(mnt, "disk.raw")
				if st, err := os.Stat(disk); err != nil || st.Size() != c.Size {
					t.Fatalf("stat disk.raw: %v, want size %d", err, c.Size)
				}
				out := t.TempDir()
				mustRun(t, "dd", "if="+disk, "of="+filepath.Join(out, "dd.raw"), "bs=1M", "status=none")
				assertSameBytes(t, "dd of disk.raw vs export", fileBytes(t, filepath.Join(out, "dd.raw")), export)
				mustRun(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", disk, filepath.Join(out, "qemu.raw"))
				assertSameBytes(t, "qemu-img convert of disk.raw vs export", fileBytes(t, filepath.Join(out, "qemu.raw")), export)

				var want []string
				for depth := range c.Images {
					want = append(want, mLayerName(depth, c.Images[len(c.Images)-1-depth]))
				}
				ents, err := os.ReadDir(filepath.Join(mnt, "layers"))
				if err != nil {
					t.Fatal(err)
				}
				var got []string
				for _, e := range ents {
					got = append(got, e.Name())
				}
				slices.Sort(got)
				if !slices.Equal(got, want) {
					t.Errorf("layers/ holds %q, want %q", got, want)
				}
				for depth, name := range want {
					img := c.Images[len(c.Images)-1-depth]
					layer := fileBytes(t, filepath.Join(mnt, "layers", name))
					assertSameBytes(t, "layers/"+name+" vs export of "+filepath.Base(img), layer, fileBytes(t, exportShared(t, img)))
					assertSameBytes(t, "layers/"+name+" vs model", layer, c.Views[len(c.Images)-1-depth])
					if _, err := os.OpenFile(filepath.Join(mnt, "layers", name), os.O_WRONLY, 0); !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
						t.Errorf("open layers/%s for writing: %v, want EROFS", name, err)
					}
				}
				mAssertSeekData(t, disk, c)
				mUmount(t, mnt)
				assertUnchanged(t, snap)
			})
		}
	})
}

// mAssertSeekData walks disk.raw with SEEK_DATA and SEEK_HOLE: every hole reads as
// zeros in the model, and every data run lies in blocks some layer has allocated (all
// of it, with a fixed image in the chain).
func mAssertSeekData(t testing.TB, disk string, c *testChain) {
	t.Helper()
	const seekData, seekHole = 3, 4
	size := c.Size
	stored := blockStored(t, c.Images)
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	var dataBytes int64
	for off := int64(0); off < size; {
		data, err := syscall.Seek(fd, off, seekData)
		if err == syscall.ENXIO {
			data = size
		} else if err != nil || data < off || data > size {
			t.Fatalf("SEEK_DATA from %d: %d, %v", off, data, err)
		}
		if !allZero(c.Model()[off:data]) {
			t.Errorf("SEEK_DATA from %d skips to %d over non-zero bytes", off, data)
		}
		if data == size {
			break
		}
		hole, err := syscall.Seek(fd, data, seekHole)
		if err != nil || hole <= data || hole > size {
			t.Fatalf("SEEK_HOLE from %d: %d, %v", data, hole, err)
		}
		for p := data; p < hole; p += 512 {
			if !stored(p) {
				t.Fatalf("SEEK_DATA/SEEK_HOLE report data at %d, in a block no layer allocated", p)
			}
		}
		dataBytes += hole - data
		off = hole
	}
	if _, err := syscall.Seek(fd, size, seekData); err != syscall.ENXIO {
		t.Errorf("SEEK_DATA at the end: %v, want ENXIO", err)
	}
	t.Logf("SEEK_DATA/SEEK_HOLE: %d of %d bytes are data", dataBytes, size)
}

// mWrite is a write into a disk, for the model.
type mWrite struct {
	off  int64
	data []byte
}

// mGranules marks the 4 KiB granules a write touches without covering them whole:
// libvhdi 20210425 misreads those (it resolves bitmaps 8 sectors at a time).
func mGranules(mask map[int64]bool, off, n int64) {
	if off%4096 == 0 && n%4096 == 0 {
		return
	}
	for g := off / 4096; g <= (off+n-1)/4096; g++ {
		mask[g] = true
	}
}

// mAssertSameGranules compares got with want 4 KiB at a time, skipping the granules
// in skip, and names the first differing one.
func mAssertSameGranules(t testing.TB, what string, got, want []byte, skip map[int64]bool) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s: %d bytes, want %d", what, len(got), len(want))
		return
	}
	bad, first := 0, int64(-1)
	for off := int64(0); off < int64(len(want)); off += 4096 {
		end := min(off+4096, int64(len(want)))
		if !skip[off/4096] && !bytes.Equal(got[off:end], want[off:end]) {
			if first < 0 {
				first = off
			}
			bad++
		}
	}
	if bad > 0 {
		t.Errorf("%s: %d 4 KiB granules differ, the first at %d", what, bad, first)
	}
}

// TestMountWrites: dd (with and without conv=notrunc), fio with verification and
// unaligned pwrites through the mount land in the top image only; after unmounting, a
// fresh mount shows the model, libvhdi agrees on the 4 KiB-aligned data, the images
// below the top are untouched and check is clean.
func TestMountWrites(t *testing.T) {
	requireTool(t, "dd")
	requireTool(t, "fio")
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "64M"}, Writes: 20, Seed: 201})
		lower := snapshotFiles(t, c.Images[:len(c.Images)-1]...)
		model := bytes.Clone(c.Model())
		size := c.Size
		unaligned := map[int64]bool{}
		rng := rand.New(rand.NewPCG(201, 202))

		mnt := mMountpoint(t)
		mMount(t, c.Top(), mnt)
		disk := filepath.Join(mnt, "disk.raw")
		assertSize := func(what string) {
			t.Helper()
			if st, err := os.Stat(disk); err != nil || st.Size() != size {
				t.Fatalf("after %s: stat disk.raw: %v, want size %d", what, err, size)
			}
		}

		// fio writes 4 KiB blocks at random over 8..40 MiB with O_DIRECT and verifies each
		// (crc32c in every block); what it wrote becomes the model there.
		fioOff, fioSize := int64(8*mib), int64(32*mib)
		mustRun(t, "fio", "--name=v", "--filename="+disk, "--rw=randwrite", "--bs=4k",
			fmt.Sprintf("--offset=%d", fioOff), fmt.Sprintf("--size=%d", fioSize),
			"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--direct=1",
			"--ioengine=psync", "--iodepth=1", "--numjobs=1", "--randrepeat=1", "--verify_state_save=0", "--output-format=terse")
		assertSize("fio")
		got := fileBytes(t, disk)
		for off := fioOff; off < fioOff+fioSize; off += 4096 {
			if bytes.Equal(got[off:off+4096], model[off:off+4096]) {
				t.Fatalf("fio left the 4 KiB at %d as they were", off)
			}
		}
		copy(model[fioOff:fioOff+fioSize], got[fioOff:fioOff+fioSize])

		src := filepath.Join(t.TempDir(), "src")
		ddRun := func(name string, data []byte, off int64, args ...string) {
			t.Helper()
			if err := os.WriteFile(src, data, 0o644); err != nil {
				t.Fatal(err)
			}
			_, errs, code := run(t, "dd", append([]string{"if=" + src, "of=" + disk, "status=none"}, args...)...)
			if code != 0 {
				t.Fatalf("%s: dd %s: exit %d: %s", name, strings.Join(args, " "), code, errs)
			}
			if errs != "" && !strings.Contains(name, "seek=") {
				t.Errorf("%s: dd %s says: %s", name, strings.Join(args, " "), errs)
			}
			copy(model[off:], data)
			assertSize(name)
		}
		// Across the block boundary at 2 MiB, over fio's data at 8 MiB.
		ddRun("dd conv=notrunc across a block boundary", mRandBytes(rng, 3*mib), 2*mib-64<<10, "bs=64k", fmt.Sprintf("seek=%d", (2*mib-64<<10)/(64<<10)), "conv=notrunc")
		ddRun("dd conv=notrunc over fio's data", mRandBytes(rng, 1*mib+4096), 8*mib-4096, "bs=4k", fmt.Sprintf("seek=%d", (8*mib-4096)/4096), "conv=notrunc")
		// Without notrunc dd opens with O_TRUNC, which must not change the size, and with
		// seek= it ftruncates to the seek offset first: that fails (dd warns but goes on).
		ddRun("dd without conv=notrunc", mRandBytes(rng, 1*mib), 0, "bs=1M")
		ddRun("dd seek= without conv=notrunc", mRandBytes(rng, 512<<10), 20*mib, "bs=512k", "seek=40")

		// Unaligned pwrites through an *os.File: sector edges are read, modified, written.
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range []struct {
			name string
			off  int64
			n    int
		}{
			{"the first byte", 0, 1},
			{"three bytes inside a sector", 4097, 3},
			{"odd offset across the 2 MiB block boundary", 2*mib - 333, 1000},
			{"odd offset and length across two block boundaries", 6*mib - 1, 4*mib + 3},
			{"one byte each side of a sector boundary", 10*mib + 511, 2},
			{"into fio's data, odd length", 12*mib + 7, 70001},
			{"the last sector", size - 512, 512},
			{"the last seven bytes", size - 7, 7},
			{"ending one byte short of the end", size - 5000, 4999},
		} {
			n := w.n
			data := mRandBytes(rng, n)
			if k, err := f.WriteAt(data, w.off); err != nil || k != n {
				t.Fatalf("%s: WriteAt %d bytes at %d: wrote %d: %v", w.name, n, w.off, k, err)
			}
			copy(model[w.off:], data)
			mGranules(unaligned, w.off, int64(n))
			// Read back through the same handle at once, with a sector of context.
			lo, hi := max(w.off-512, 0), min(w.off+int64(n)+512, size)
			back := make([]byte, hi-lo)
			if _, err := f.ReadAt(back, lo); err != nil && err != io.EOF {
				t.Fatalf("%s: read back: %v", w.name, err)
			}
			assertSameBytes(t, w.name+": read back", back, model[lo:hi])
		}
		if err := f.Sync(); err != nil {
			t.Fatalf("fsync disk.raw: %v", err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		assertSize("the pwrites")
		assertSameBytes(t, "disk.raw before unmounting", fileBytes(t, disk), model)
		for depth := range c.Images {
			img := c.Images[len(c.Images)-1-depth]
			want := c.Views[len(c.Images)-1-depth]
			if depth == 0 {
				want = model
			}
			assertSameBytes(t, "layers/"+mLayerName(depth, img)+" after the writes", fileBytes(t, filepath.Join(mnt, "layers", mLayerName(depth, img))), want)
		}
		mUmount(t, mnt)

		assertUnchanged(t, lower)
		mCheck(t, c.Top())
		assertSameBytes(t, "a fresh mount", mMountRead(t, c.Top()), model)
		assertSameBytes(t, "export", fileBytes(t, exportImage(t, c.Top())), model)
		vmnt := vhdimount(t, c.Top())
		mAssertSameGranules(t, "vhdimount of the top (4 KiB-aligned data)", fileBytes(t, vhdiFile(vmnt, len(c.Images)-1)), model, unaligned)
		assertUnchanged(t, lower)
	})
}

// mLoopCleanup detaches the loop device *dev when the test ends, if the test left it
// attached (which fails the test).
func mLoopCleanup(t testing.TB, dev *string) {
	t.Cleanup(func() {
		if *dev == "" {
			return
		}
		if !t.Failed() {
			t.Errorf("loop device %s is still attached at the end of the test", *dev)
		}
		if out, err := exec.Command("losetup", "-d", *dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", *dev, err, out)
		}
		*dev = ""
	})
}

// mUmountCleanup unmounts a kernel mount (ext4 on a loop device) when the test ends,
// failing the test if it was left mounted.
func mUmountCleanup(t testing.TB, dir string) {
	t.Cleanup(func() {
		if !mountedAt(t, dir) {
			return
		}
		if !t.Failed() {
			t.Errorf("%s is still mounted at the end of the test", dir)
		}
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
}

// TestMountExt4OnLoop: the real workflow. disk.raw on a loop device takes an ext4
// file system and files; after unmounting everything, the chain mounted again
// (read-only, loop read-only, ext4 read-only) shows the same files, and e2fsck finds
// the file system clean.
func TestMountExt4OnLoop(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tool := range []string{"losetup", "mkfs.ext4", "e2fsck", "mount", "umount"} {
			requireTool(t, tool)
		}
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "96M"}})
		lower := snapshotFiles(t, c.Images[0])
		rng := rand.New(rand.NewPCG(301, 302))
		files := map[string][]byte{
			"hello.txt":       []byte("hello, vhdfs\n"),
			"random.bin":      mRandBytes(rng, 5*mib+123),
			"dir/small.bin":   mRandBytes(rng, 4097),
			"dir/zeros.bin":   make([]byte, 3*mib),
			"dir/sub/odd.bin": mRandBytes(rng, 777777),
		}

		mnt := mMountpoint(t)
		fsdir := filepath.Join(t.TempDir(), "ext4")
		if err := os.Mkdir(fsdir, 0o755); err != nil {
			t.Fatal(err)
		}
		var loop string
		mMount(t, c.Top(), mnt)
		mLoopCleanup(t, &loop)
		mUmountCleanup(t, fsdir)
		loop = strings.TrimSpace(mustRun(t, "losetup", "--find", "--show", filepath.Join(mnt, "disk.raw")))
		mustRun(t, "mkfs.ext4", "-q", "-F", loop)
		mustRun(t, "mount", "-t", "ext4", loop, fsdir)
		for name, data := range files {
			p := filepath.Join(fsdir, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		mustRun(t, "umount", fsdir)
		mustRun(t, "losetup", "-d", loop)
		loop = ""
		mUmount(t, mnt)
		assertUnchanged(t, lower)
		mCheck(t, c.Top())

		mMount(t, c.Top(), mnt, "-r")
		mLoopCleanup(t, &loop) // again, to run before this mount's cleanup
		mUmountCleanup(t, fsdir)
		loop = strings.TrimSpace(mustRun(t, "losetup", "--find", "--show", "--read-only", filepath.Join(mnt, "disk.raw")))
		mustRun(t, "e2fsck", "-f", "-n", loop)
		mustRun(t, "mount", "-t", "ext4", "-o", "ro", loop, fsdir)
		for name, data := range files {
			assertFileEquals(t, filepath.Join(fsdir, name), data)
		}
		mustRun(t, "umount", fsdir)
		mustRun(t, "losetup", "-d", loop)
		loop = ""
		mUmount(t, mnt)
		assertUnchanged(t, lower)
	})
}

// TestMountKill9: the mount process killed with SIGKILL during a run of writes with
// an fsync every 16 of them leaves a chain that checks clean and, mounted again,
// holds everything written before the last fsync that returned; each sector written
// after it holds either its value at that fsync or a value written since. Three
// rounds on the same chain, killed at different points of the interval between two
// fsyncs, so later rounds also write into an image a crash left behind.
func TestMountKill9(t *testing.T) {
	requireTool(t, "fusermount3")
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "64M", "--block-size", "512K"}, Writes: 20, Seed: 501})
		lower := snapshotFiles(t, c.Images[0])
		model := bytes.Clone(c.Model())
		for round, killAt := range []int{8, 15, 0} {
			t.Logf("round %d: kill after %d writes past the last fsync", round, killAt)
			model = mKillRound(t, c.Top(), model, uint64(round), killAt)
			if t.Failed() {
				return
			}
			assertUnchanged(t, lower)
		}
	})
}

// mKillRound mounts image with `mount -f`, writes until 12 fsyncs and killAt more
// writes have returned, kills the mount process with SIGKILL while the writer goes
// on, and checks the chain and what it holds against durable, the disk as of the
// start. It returns the disk as the crash left it.
func mKillRound(t *testing.T, image string, durable []byte, seed uint64, killAt int) []byte {
	t.Helper()
	durable = bytes.Clone(durable)
	size := int64(len(durable))
	mnt := mMountpoint(t)
	p := mStartForeground(t, image, mnt)
	if st := mStatus(t, mnt); st.PID != p.cmd.Process.Pid {
		t.Errorf("control says pid %d, the mount process is %d", st.PID, p.cmd.Process.Pid)
	}

	const perSync, killAfter = 16, 12 // writes per fsync; fsyncs before the kill
	var since []mWrite                // written (or attempted) after the last fsync that returned
	var syncs, writes int
	var writerErr error
	kill, writerDone := make(chan struct{}), make(chan struct{})
	f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(writerDone)
		defer f.Close()
		rng := rand.New(rand.NewPCG(502+seed, 503))
		for writes = 0; writes < 1_000_000; writes++ {
			if syncs == killAfter && len(since) == killAt {
				close(kill)
			}
			n := (1 + rng.Int64N(32)) * 4096
			off := rng.Int64N((size-n)/4096+1) * 4096
			w := mWrite{off, mRandBytes(rng, int(n))}
			since = append(since, w)
			if _, err := f.WriteAt(w.data, w.off); err != nil {
				writerErr = err
				return
			}
			if writes%perSync == perSync-1 {
				if err := f.Sync(); err != nil {
					writerErr = err
					return
				}
				for _, w := range since {
					copy(durable[w.off:], w.data)
				}
				since = since[:0]
				syncs++
			}
		}
	}()
	select {
	case <-kill:
	case <-writerDone:
		t.Fatalf("the writer stopped before the kill after %d writes: %v", writes, writerErr)
	}
	// The writer goes on writing while the mount process dies.
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-writerDone
	if writerErr == nil {
		t.Fatalf("the writer made %d writes and never saw the mount die", writes)
	}
	t.Logf("killed after %d fsyncs and %d writes, %d of them since the last fsync; the writer got %v", syncs, writes, len(since), writerErr)
	if err := p.wait(t); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("mount process: %v, want killed", err)
	}
	// The dead mount stays until unmounted.
	if out, err := exec.Command("fusermount3", "-u", mnt).CombinedOutput(); err != nil {
		t.Logf("fusermount3 -u %s: %v: %s; detaching lazily", mnt, err, out)
		mustRun(t, "fusermount3", "-u", "-z", mnt)
	}
	if mountedAt(t, mnt) {
		t.Fatalf("%s still mounted after fusermount3 -u", mnt)
	}

	mCheck(t, image)
	got := mMountRead(t, image)
	if len(got) != len(durable) {
		t.Fatalf("disk.raw is %d bytes after the crash, want %d", len(got), len(durable))
	}
	bad, fromLater := 0, 0
	for s := int64(0); s < size; s += 512 {
		sec := got[s : s+512]
		if bytes.Equal(sec, durable[s:s+512]) {
			continue
		}
		later := false
		for _, w := range since {
			if s >= w.off && s < w.off+int64(len(w.data)) && bytes.Equal(sec, w.data[s-w.off:s-w.off+512]) {
				later = true
				break
			}
		}
		if later {
			fromLater++
			continue
		}
		if bad++; bad <= 5 {
			t.Errorf("sector %d (at %d) holds neither its data at the last fsync nor any written since", s/512, s)
		}
	}
	if bad > 0 {
		t.Errorf("%d sectors lost or corrupted by the kill", bad)
	}
	t.Logf("%d sectors hold data written after the last fsync", fromLater)
	return got
}

// TestMountSizeRules: disk.raw keeps its size. Reads at or past the end return 0
// bytes, a read across it is short; writes at or past it fail with ENOSPC and one
// across it writes what fits; truncating to another size fails with EINVAL, to the
// same size succeeds.
func TestMountSizeRules(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "32M"}, Writes: 10, Seed: 601})
		model := bytes.Clone(c.Model())
		size := c.Size
		mnt := mMountpoint(t)
		mMount(t, c.Top(), mnt)
		disk := filepath.Join(mnt, "disk.raw")
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		pat := bytes.Repeat([]byte{0x5a}, 4096)

		t.Run("reads", func(t *testing.T) {
			for _, tc := range []struct {
				name string
				off  int64
				n    int
				want int // bytes read
			}{
				{"read at the end", size, 4096, 0},
				{"read one byte past the end", size + 1, 1, 0},
				{"read far past the end", size + 1<<30, 4096, 0},
				{"read across the end", size - 1000, 4096, 1000},
				{"read ending at the end", size - 4096, 4096, 4096},
			} {
				buf := make([]byte, tc.n)
				k, err := f.ReadAt(buf, tc.off)
				if k != tc.want {
					t.Errorf("%s: read %d bytes, want %d", tc.name, k, tc.want)
				}
				if k < tc.n && err != io.EOF {
					t.Errorf("%s: short read with %v, want EOF", tc.name, err)
				}
				if tc.want > 0 {
					assertSameBytes(t, tc.name, buf[:k], model[tc.off:tc.off+int64(k)])
				}
			}
		})

		t.Run("writes", func(t *testing.T) {
			for _, tc := range []struct {
				name string
				off  int64
				n    int
				want int // bytes written; fewer than n means ENOSPC
			}{
				{"write at the end", size, 512, 0},
				{"write one byte at the end", size, 1, 0},
				{"write past the end", size + 4096, 4096, 0},
				{"write across the end", size - 512, 4096, 512},
				{"write across the end, unaligned", size - 3, 10, 3},
				{"write ending at the end", size - 4096, 4096, 4096},
			} {
				k, err := mPwrite(f, pat[:tc.n], tc.off)
				if k != tc.want {
					t.Errorf("%s: wrote %d bytes, want %d", tc.name, k, tc.want)
				}
				if tc.want < tc.n && !errors.Is(err, syscall.ENOSPC) {
					t.Errorf("%s: %v, want ENOSPC", tc.name, err)
				}
				if tc.want == tc.n && err != nil {
					t.Errorf("%s: %v", tc.name, err)
				}
				if k > 0 {
					copy(model[tc.off:], pat[:k])
				}
			}
			// pwrite(2) with an offset past the end: no bytes at all, ENOSPC.
			if k, err := syscall.Pwrite(int(f.Fd()), pat[:512], size); k > 0 || err != syscall.ENOSPC {
				t.Errorf("pwrite at the end: %d, %v; want ENOSPC", k, err)
			}
		})

		t.Run("truncate", func(t *testing.T) {
			for _, tc := range []struct {
				name  string
				do    func(sz int64) error
				sz    int64
				ok    bool
				errno syscall.Errno
			}{
				{"ftruncate smaller", f.Truncate, size - 512, false, syscall.EINVAL},
				{"ftruncate larger", f.Truncate, size + 512, false, syscall.EINVAL},
				{"ftruncate to 0", f.Truncate, 0, false, syscall.EINVAL},
				{"ftruncate to the same size", f.Truncate, size, true, 0},
				{"truncate smaller", func(sz int64) error { return os.Truncate(disk, sz) }, size / 2, false, syscall.EINVAL},
				{"truncate larger", func(sz int64) error { return os.Truncate(disk, sz) }, 2 * size, false, syscall.EINVAL},
				{"truncate to the same size", func(sz int64) error { return os.Truncate(disk, sz) }, size, true, 0},
			} {
				err := tc.do(tc.sz)
				if tc.ok && err != nil {
					t.Errorf("%s: %v", tc.name, err)
				}
				if !tc.ok && !errors.Is(err, tc.errno) {
					t.Errorf("%s: %v, want %v", tc.name, err, tc.errno)
				}
				if st, err := os.Stat(disk); err != nil || st.Size() != size {
					t.Errorf("after %s: stat: %v, want size %d", tc.name, err, size)
				}
				if st, err := f.Stat(); err != nil || st.Size() != size {
					t.Errorf("after %s: fstat: %v, want size %d", tc.name, err, size)
				}
			}
			// open(O_TRUNC) reaches the file system as a truncate to 0 with no handle, as
			// does truncate(path, 0): both leave the disk as it is.
			g, err := os.OpenFile(disk, os.O_WRONLY|os.O_TRUNC, 0)
			if err != nil {
				t.Fatalf("open O_TRUNC: %v", err)
			}
			g.Close()
			os.Truncate(disk, 0)
			if st, err := os.Stat(disk); err != nil || st.Size() != size {
				t.Errorf("after O_TRUNC: stat: %v, want size %d", err, size)
			}
		})

		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		assertSameBytes(t, "disk.raw", fileBytes(t, disk), model)
		mUmount(t, mnt)
		assertSameBytes(t, "a fresh mount", mMountRead(t, c.Top()), model)
	})
}

// TestMountBadInput: broken chains fail to mount with the one-line error info gives,
// and leave nothing mounted; bad mount points fail; a read-only mount refuses writes;
// bad control commands fail with the documented errno and the status records them.
func TestMountBadInput(t *testing.T) {
	requireTool(t, "fusermount3")
	t.Run("broken chains", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			damage func(t *testing.T, c *testChain)
			want   string
		}{
			{"parent missing", func(t *testing.T, c *testChain) {
				if err := os.Rename(c.Images[1], c.Images[1]+".gone"); err != nil {
					t.Fatal(err)
				}
			}, "not found"},
			{"bad header checksum in the parent", func(t *testing.T, c *testChain) {
				patchHeader(t, c.Images[1], headerBlockSizeOff+3, []byte{1}, true)
			}, "checksum"},
			{"bad footer checksums in the top", func(t *testing.T, c *testChain) {
				patchFooters(t, c.Top(), footerTimeOff, []byte{1, 2, 3, 4}, true)
			}, "checksum"},
			{"parent unique ID mismatch", func(t *testing.T, c *testChain) {
				patchFooters(t, c.Images[0], footerUniqueIDOff, bytes.Repeat([]byte{0x42}, 16), false)
			}, "base.vhd"},
			{"truncated base", func(t *testing.T, c *testChain) {
				truncateFile(t, c.Images[0], 1000)
			}, "base.vhd"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				c := makeChain(t, chainOptions{Depth: 3, Create: []string{"--size", "8M"}, Writes: 3, Seed: 701})
				tc.damage(t, c)
				snap := snapshotFiles(t, c.Dir)
				_, infoErr, code := vhdfs(t, "info", c.Top())
				if code != 1 {
					t.Fatalf("info: exit %d, want 1", code)
				}
				assertOneLineError(t, infoErr, tc.want)
				_, checkErr, code := vhdfs(t, "check", c.Top())
				if code != 3 {
					t.Errorf("check: exit %d, want 3", code)
				}
				mnt := mMountpoint(t)
				mCleanupMount(t, mnt)
				_, mountErr, code := vhdfs(t, "mount", c.Top(), mnt)
				if code != 1 {
					t.Errorf("mount: exit %d, want 1", code)
				}
				assertOneLineError(t, mountErr, tc.want)
				msg := strings.TrimSpace(strings.TrimPrefix(infoErr, "vhdfs info: "))
				if got := strings.TrimSpace(strings.TrimPrefix(mountErr, "vhdfs mount: ")); got != msg {
					t.Errorf("mount says %q, info %q", got, msg)
				}
				// check names the file, then the severity, then the same problem.
				if file, problem, _ := strings.Cut(msg, ": "); !strings.Contains(checkErr, file) || !strings.Contains(checkErr, problem) {
					t.Errorf("check says %q, info %q", strings.TrimSpace(checkErr), msg)
				}
				if mountedAt(t, mnt) {
					t.Errorf("a failed mount left %s mounted", mnt)
				}
				assertUnchanged(t, snap)
			})
		}
	})

	c := makeChain(t, chainOptions{Depth: 3, Create: []string{"--size", "16M"}, Writes: 5, Seed: 702})
	t.Run("damaged end footer of the top", func(t *testing.T) {
		// The copy at offset 0 survives: the chain opens read-only, not for writing.
		d := makeChain(t, chainOptions{Depth: 2, Create: []string{"--size", "8M"}, Writes: 3, Seed: 703})
		l := readLayout(t, d.Top())
		patchAt(t, d.Top(), l.FooterOff+footerTimeOff, []byte{9, 9, 9, 9})
		snap := snapshotFiles(t, d.Dir)
		mnt := mMountpoint(t)
		mCleanupMount(t, mnt)
		_, errs, code := vhdfs(t, "mount", d.Top(), mnt)
		if code != 1 {
			t.Errorf("read-write mount: exit %d, want 1", code)
		}
		assertOneLineError(t, errs, d.Top(), "check --repair")
		if mountedAt(t, mnt) {
			t.Errorf("a failed mount left %s mounted", mnt)
		}
		assertSameBytes(t, "read-only mount", mMountRead(t, d.Top()), d.Model())
		assertUnchanged(t, snap)
	})
	t.Run("umount of what is not a vhdfs mount", func(t *testing.T) {
		dir := t.TempDir()
		_, errs, code := vhdfs(t, "umount", dir)
		if code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		assertOneLineError(t, errs, dir)
	})
	t.Run("missing mount point", func(t *testing.T) {
		missing := filepath.Join(t.TempDir(), "nowhere")
		_, errs, code := vhdfs(t, "mount", c.Top(), missing)
		if code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		assertOneLineError(t, errs, missing)
	})
	t.Run("mount point is a file", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "file")
		if err := os.WriteFile(file, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		_, errs, code := vhdfs(t, "mount", c.Top(), file)
		if code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		assertOneLineError(t, errs, file)
	})
	t.Run("busy mount point", func(t *testing.T) {
		other := makeChain(t, chainOptions{Depth: 1, Create: []string{"--size", "8M"}})
		mnt := mMountpoint(t)
		mMount(t, c.Top(), mnt, "-r")
		_, errs, code := vhdfs(t, "mount", other.Top(), mnt)
		if code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		assertOneLineError(t, errs, mnt, "busy")
		if st := mStatus(t, mnt); len(st.Chain) != len(c.Images) || st.Chain[0].Path != c.Top() {
			t.Errorf("the first mount no longer serves %s: %+v", c.Top(), st.Chain)
		}
		mUmount(t, mnt)
	})
	t.Run("read-only mount", func(t *testing.T) {
		snap := snapshotFiles(t, c.Dir)
		mnt := mMountpoint(t)
		mMount(t, c.Top(), mnt, "-r")
		disk := filepath.Join(mnt, "disk.raw")
		for _, flag := range []int{os.O_WRONLY, os.O_RDWR} {
			if g, err := os.OpenFile(disk, flag, 0); !errors.Is(err, syscall.EROFS) {
				if g != nil {
					g.Close()
				}
				t.Errorf("open disk.raw with flags %#x: %v, want EROFS", flag, err)
			}
		}
		if err := os.Truncate(disk, 0); err == nil {
			t.Errorf("truncate of a read-only disk.raw succeeded")
		}
		if err := control(mnt, "merge"); err != syscall.EROFS {
			t.Errorf("merge on a read-only mount: %v, want EROFS", err)
		}
		st := mStatus(t, mnt)
		if !st.ReadOnly {
			t.Errorf("control does not say read_only")
		}
		// The kernel's ro flag refuses the open of control for writing: the command
		// never reaches vhdfs, so the status records nothing.
		if opts := findmntOptions(t, mnt); !slices.Contains(opts, "ro") {
			t.Errorf("findmnt options %v of a -r mount lack ro", opts)
		}
		assertSameBytes(t, "read-only disk.raw", fileBytes(t, disk), c.Model())
		mUmount(t, mnt)
		assertUnchanged(t, snap)
	})
	t.Run("control errors", func(t *testing.T) {
		snap := snapshotFiles(t, c.Dir)
		mnt := mMountpoint(t)
		mMount(t, c.Top(), mnt)
		for _, tc := range []struct {
			name, cmd string
			errno     syscall.Errno
		}{
			{"command too long", "merge " + strings.Repeat("x", 300), syscall.EINVAL},
			{"unknown command", "frobnicate", syscall.EINVAL},
			{"empty command", "\n", syscall.EINVAL},
			{"merge depth=0", "merge depth=0", syscall.EINVAL},
			{"merge depth=chain length", fmt.Sprintf("merge depth=%d", len(c.Images)), syscall.EINVAL},
			{"merge depth past the chain", "merge depth=99", syscall.EINVAL},
			{"merge depth not a number", "merge depth=one", syscall.EINVAL},
			{"merge from=0", "merge from=0 depth=1", syscall.EINVAL},
			{"merge from past the chain", "merge from=2 depth=1", syscall.EINVAL},
			{"merge unknown argument", "merge speed=1", syscall.EINVAL},
			{"two commands in one write", "sync\nsync\n", syscall.EINVAL},
			{"abort with an argument", "abort now", syscall.EINVAL},
		} {
			err := mControl(t, mnt, tc.cmd)
			if !errors.Is(err, tc.errno) {
				t.Errorf("%s: %v, want %v", tc.name, err, tc.errno)
			}
			st := mStatus(t, mnt)
			if st.Last == nil || st.Last.Errno != int(tc.errno) || st.Last.Message == "" {
				t.Errorf("%s: last result %+v, want errno %d and a message", tc.name, st.Last, tc.errno)
			}
			if st.State != "idle" || len(st.Chain) != len(c.Images) {
				t.Errorf("%s: state %q with %d layers, want idle with %d", tc.name, st.State, len(st.Chain), len(c.Images))
			}
		}
		for _, cmd := range []string{"sync", "sync\n", "abort"} {
			if err := mControl(t, mnt, cmd); err != nil {
				t.Errorf("%q: %v", cmd, err)
			}
			if st := mStatus(t, mnt); st.Last == nil || st.Last.Errno != 0 {
				t.Errorf("%q: last result %+v, want errno 0", cmd, st.Last)
			}
		}
		assertSameBytes(t, "disk.raw", fileBytes(t, filepath.Join(mnt, "disk.raw")), c.Model())
		mUmount(t, mnt)
		assertUnchanged(t, snap)
		mCheck(t, c.Top())
	})
}

// TestMountForeground: `mount -f` serves until SIGTERM or SIGINT, then unmounts,
// writes everything and exits 0; while it runs, a second read-write mount of the same
// image fails because the image is locked.
func TestMountForeground(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
			t.Run(sig.String(), func(t *testing.T) {
				c := makeChain(t, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "16M"}, Writes: 5, Seed: 801})
				lower := snapshotFiles(t, c.Images[0])
				model := bytes.Clone(c.Model())
				mnt := mMountpoint(t)
				p := mStartForeground(t, c.Top(), mnt)
				if st := mStatus(t, mnt); st.PID != p.cmd.Process.Pid {
					t.Errorf("control says pid %d, the process is %d", st.PID, p.cmd.Process.Pid)
				}

				mnt2 := mMountpoint(t)
				mCleanupMount(t, mnt2)
				_, errs, code := vhdfs(t, "mount", c.Top(), mnt2)
				if code != 1 {
					t.Errorf("second read-write mount: exit %d, want 1", code)
				}
				assertOneLineError(t, errs, c.Top(), "locked for writing by another process (vhdfs, pid")
				if mountedAt(t, mnt2) {
					t.Errorf("the refused second mount left %s mounted", mnt2)
				}

				// Written, never fsynced: the clean shutdown must write it out.
				data := mRandBytes(rand.New(rand.NewPCG(802, 803)), 3*mib+1234)
				f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := f.WriteAt(data, 1*mib+77); err != nil {
					t.Fatal(err)
				}
				copy(model[1*mib+77:], data)
				if err := f.Close(); err != nil {
					t.Fatal(err)
				}

				if err := p.cmd.Process.Signal(sig); err != nil {
					t.Fatal(err)
				}
				if err := p.wait(t); err != nil {
					t.Errorf("after %v the mount process ended with %v\n%s", sig, err, p.stderr.String())
				}
				if mountedAt(t, mnt) {
					t.Fatalf("after %v and the process's exit, %s is still mounted", sig, mnt)
				}
				assertUnchanged(t, lower)
				mCheck(t, c.Top())
				assertSameBytes(t, "a fresh mount", mMountRead(t, c.Top()), model)
			})
		}
	})
}

// TestMountSingleImages: a lone fixed or dynamic image (no parent) takes unaligned
// writes through the mount, zeros included; afterwards check is clean and qemu-img,
// which reads these types itself, sees the model.
func TestMountSingleImages(t *testing.T) {
	requireTool(t, "qemu-img")
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tc := range []struct {
			name   string
			create []string
		}{
			{"fixed", []string{"--size", "16M", "--type", "fixed"}},
			{"dynamic", []string{"--size", "16M"}},
			{"dynamic 4K blocks", []string{"--size", "16M", "--block-size", "4K"}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				c := makeChain(t, chainOptions{Format: format, Depth: 1, Create: tc.create})
				model := bytes.Clone(c.Model())
				mnt := mMountpoint(t)
				mMount(t, c.Top(), mnt)
				f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				for i, w := range newWriteGen(1101, c.Size, 1, 300<<10).writes(60) {
					if i%7 == 3 {
						clear(w.Data) // zeros over data, and zeros into empty blocks
					}
					if k, err := mPwrite(f, w.Data, w.Off); err != nil || k != len(w.Data) {
						t.Fatalf("write %v: wrote %d: %v", w, k, err)
					}
					copy(model[w.Off:], w.Data)
				}
				if err := f.Close(); err != nil {
					t.Fatal(err)
				}
				assertSameBytes(t, "disk.raw", fileBytes(t, filepath.Join(mnt, "disk.raw")), model)
				mUmount(t, mnt)
				mCheck(t, c.Top())
				assertSameBytes(t, "qemu-img convert", qemuConvert(t, c.Top()), model)
				assertSameBytes(t, "a fresh mount", mMountRead(t, c.Top()), model)
			})
		}
	})
}

// TestMountOddNames: an image and a mount point whose paths hold spaces, a comma, a
// backslash and non-ASCII letters mount, serve and unmount like any other.
func TestMountOddNames(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		name := "my disks, 2026 \\ Übersicht"
		if format == "vhdx" {
			// A VHDX parent locator holds Windows paths, where a backslash is the
			// separator: create refuses a parent whose path holds one.
			name = "my disks, 2026 Übersicht"
		}
		dir := filepath.Join(t.TempDir(), name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		c := makeChainIn(t, dir, chainOptions{Format: format, Depth: 2, Create: []string{"--size", "8M"}, Writes: 5, Seed: 1001})
		top := filepath.Join(dir, imageName(format, "top snapshot, v2", true))
		if err := os.Rename(c.Top(), top); err != nil {
			t.Fatal(err)
		}
		mnt := filepath.Join(t.TempDir(), "mount point, ß")
		if err := os.Mkdir(mnt, 0o755); err != nil {
			t.Fatal(err)
		}
		mMount(t, top, mnt)
		assertSameBytes(t, "disk.raw", fileBytes(t, filepath.Join(mnt, "disk.raw")), c.Model())
		if _, err := os.Stat(filepath.Join(mnt, "layers", mLayerName(0, top))); err != nil {
			t.Errorf("layers/: %v", err)
		}
		mUmount(t, mnt)
	})
}

// TestMountConcurrentReadsAndWrites: readers at random ranges while one writer writes.
// The writer writes only the even MiB of the disk; readers check the odd MiB (which
// share blocks and bitmaps with what is being written) against the model as they go,
// and read anywhere else for length. At the end the disk equals the model, before and
// after unmounting.
func TestMountConcurrentReadsAndWrites(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "32M", "--block-size", "512K"}, Writes: 15, Align: 512, Seed: 901})
		lower := snapshotFiles(t, c.Images[:len(c.Images)-1]...)
		model := bytes.Clone(c.Model())
		static := bytes.Clone(model) // what the odd MiB hold throughout
		size := c.Size
		mnt := mMountpoint(t)
		mMount(t, c.Top(), mnt)
		disk := filepath.Join(mnt, "disk.raw")

		const readers, nWrites = 4, 400
		stop := make(chan struct{})
		var wg sync.WaitGroup
		errs := make(chan error, readers+1)
		for r := range readers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				flag := os.O_RDONLY
				if r%2 == 1 {
					flag |= syscall.O_DIRECT // past the page cache, straight to the mount
				}
				f, err := os.OpenFile(disk, flag, 0)
				if err != nil {
					errs <- err
					return
				}
				defer f.Close()
				rng := rand.New(rand.NewPCG(uint64(910+r), 911))
				buf := make([]byte, 1*mib)
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					var off, n int64
					if i%2 == 0 {
						// Inside an odd MiB, nothing written there.
						m := 2*rng.Int64N(size/mib/2) + 1
						n = 1 + rng.Int64N(mib)
						off = m*mib + rng.Int64N(mib-n+1)
					} else {
						off, n = rng.Int64N(size), 1+rng.Int64N(mib)
					}
					if flag&syscall.O_DIRECT != 0 {
						off, n = off&^511, max(n&^511, 512)
					}
					k, err := f.ReadAt(buf[:n], off)
					want := min(n, size-off)
					if int64(k) != want || (err != nil && err != io.EOF) {
						errs <- fmt.Errorf("reader %d: read %d bytes at %d: got %d: %v", r, n, off, k, err)
						return
					}
					if i%2 == 0 && !bytes.Equal(buf[:k], static[off:off+int64(k)]) {
						errs <- fmt.Errorf("reader %d: %d bytes at %d (in a MiB nobody writes) differ from the model", r, k, off)
						return
					}
				}
			}()
		}
		func() {
			defer close(stop)
			f, err := os.OpenFile(disk, os.O_RDWR, 0)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			rng := rand.New(rand.NewPCG(920, 921))
			for i := range nWrites {
				m := 2 * rng.Int64N((size/mib+1)/2)
				end := min((m+1)*mib, size)
				n := 1 + rng.Int64N(min(64<<10, end-m*mib))
				off := m*mib + rng.Int64N(end-m*mib-n+1)
				data := mRandBytes(rng, int(n))
				if _, err := f.WriteAt(data, off); err != nil {
					errs <- fmt.Errorf("write %d: %d bytes at %d: %v", i, n, off, err)
					return
				}
				copy(model[off:], data)
				if i%100 == 99 {
					if err := f.Sync(); err != nil {
						errs <- fmt.Errorf("fsync: %v", err)
						return
					}
				}
			}
		}()
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		assertSameBytes(t, "disk.raw after the run", fileBytes(t, disk), model)
		mUmount(t, mnt)
		assertUnchanged(t, lower)
		mCheck(t, c.Top())
		assertSameBytes(t, "a fresh mount", mMountRead(t, c.Top()), model)
	})
}
