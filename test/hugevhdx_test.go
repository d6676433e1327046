package test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestHugeVHDXChain: a 64 TiB VHDX chain, a dynamic base and 7 differencing layers
// with 1 MiB blocks (a 512 MiB block table each), made with vhdfs create, each in
// under 2 s and under 64 MiB on disk; written a few 4 KiB pieces at a time through a
// mount of each new top (the last sector of the disk too); then the whole chain
// mounts in under 3 s, under 100 MiB resident, and reads back what a model of the
// writes says, zeros elsewhere.
func TestHugeVHDXChain(t *testing.T) {
	const (
		size   = 64 << 40
		layers = 8
	)
	dir := t.TempDir()
	model := map[int64][]byte{} // 4 KiB pieces by offset: the last write wins
	writes := [][]int64{
		{0, 1 << 40, size - 4096},
		{3 << 20, 40 << 40},
		{},
		{1<<40 + 4096, size - 2<<20},
		{},
		{32 << 40, 0},
		{},
		{size - 4096, 5 << 20},
	}
	var top string
	for l := range layers {
		next := filepath.Join(dir, fmt.Sprintf("l%d.avhdx", l))
		args := []string{"create", "--size", "64T", "--block-size", "1M", filepath.Join(dir, "l0.vhdx")}
		if l == 0 {
			next = args[len(args)-1]
		} else {
			args = []string{"create", "--block-size", "1M", "--parent", top, next}
		}
		start := time.Now()
		mustVhdfs(t, args...)
		took := time.Since(start)
		var st syscall.Stat_t
		if err := syscall.Stat(next, &st); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: made in %v, %d bytes, %d KiB on disk", filepath.Base(next), took, st.Size, st.Blocks/2)
		if took > 2*time.Second || st.Blocks*512 > 64<<20 {
			t.Fatalf("%s: made in %v, %d MiB on disk; want under 2 s and 64 MiB", next, took, st.Blocks*512>>20)
		}
		top = next
		if len(writes[l]) == 0 {
			continue
		}
		mnt := mountWith(t, vhdfsBin, top)
		f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, off := range writes[l] {
			b := bytes.Repeat([]byte(fmt.Sprintf("layer %d at %d;", l, off)), 4096)[:4096]
			if _, err := f.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
			model[off] = b
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		mustVhdfs(t, "umount", mnt)
	}

	// The race detector multiplies a program's memory and time: measure a plain build.
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	unmountOnCleanup(t, mnt)
	bin := plainBinary(t) // built first, under -race
	start := time.Now()
	mustRun(t, bin, "mount", "--read-only", top, mnt)
	took := time.Since(start)
	pid := readMergeStatus(t, mnt).PID

	f, err := os.Open(filepath.Join(mnt, "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || st.Size() != size {
		t.Fatalf("disk.raw: %v, %v; want %d bytes", st, err, int64(size))
	}
	got := make([]byte, 4096)
	for off, want := range model {
		if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, want) {
			t.Errorf("disk.raw at %d: %q…, %v; want %q…", off, got[:24], err, want[:24])
		}
	}
	for _, off := range []int64{4096, 7 << 40, size - 8192, 1<<40 + 8192} {
		if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
			t.Errorf("disk.raw at %d, never written: %q…, %v; want zeros", off, got[:24], err)
		}
	}
	rss, hwm := procMemory(t, pid)
	t.Logf("%d-deep chain of 64 TiB mounted in %v; mount process VmRSS %d KiB, VmHWM %d KiB", layers, took, rss>>10, hwm>>10)
	if took > 3*time.Second {
		t.Errorf("mount took %v, want under 3 s", took)
	}
	if hwm > 100<<20 {
		t.Errorf("mount process peaked at %d MiB resident, want under 100 MiB", hwm>>20)
	}
}
