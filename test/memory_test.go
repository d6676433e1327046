package test

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestMemoryBigBlocks: four sparse differencing layers with 2 GiB blocks (a bitmap
// of 512 KiB per block) over a dynamic base, each holding a few sectors in every
// block, and 1000 random 4 KiB reads through the mount must leave the mount process
// under 64 MiB resident: the bitmap cache is bounded in bytes, not in bitmaps.
func TestMemoryBigBlocks(t *testing.T) {
	requireTool(t, "fio")
	const (
		blocks    = 256
		blockSize = 2 << 30
		layers    = 4
		limit     = 64 << 20
	)
	dir := t.TempDir()
	top := filepath.Join(dir, "base.vhd")
	mustVhdfs(t, "create", "--size", strconv.Itoa(blocks*2)+"G", "--exact-size", "--block-size", "2G", top)
	for l := 0; l < layers; l++ {
		next := filepath.Join(dir, fmt.Sprintf("snap%d.vhd", l+1))
		mustVhdfs(t, "create", "--parent", top, next)
		top = next
		mnt := mountWith(t, vhdfsBin, top)
		f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		sector := make([]byte, 512)
		for b := int64(0); b < blocks; b++ {
			copy(sector, fmt.Sprintf("layer %d block %d", l+1, b))
			// A different sector in each layer, spread over the bitmap's pages.
			off := b*blockSize + (b*7919+int64(l)*104729)%(blockSize/512)*512
			if _, err := f.WriteAt(sector, off); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		// vhdfs umount waits for the mount process to let go of the images.
		mustVhdfs(t, "umount", mnt)
	}

	// The race detector multiplies a program's memory: measure a plain build.
	mnt := mountWith(t, plainBinary(t), top, "--read-only")
	pid := readMergeStatus(t, mnt).PID

	mustRun(t, "fio", "--name=randread", "--filename="+filepath.Join(mnt, "disk.raw"),
		"--rw=randread", "--bs=4k", "--direct=1", "--number_ios=1000", "--randrepeat=1",
		"--ioengine=psync", "--output=/dev/null")

	rss, hwm := procMemory(t, pid)
	t.Logf("mount process: VmRSS %d KiB, VmHWM %d KiB", rss>>10, hwm>>10)
	if hwm > limit {
		t.Errorf("mount process peaked at %d MiB resident (VmHWM), want under %d MiB", hwm>>20, limit>>20)
	}
}

// mountWith mounts image with the binary bin at a new mount point, which goes at the
// end of the test.
func mountWith(t testing.TB, bin, image string, flags ...string) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	unmountOnCleanup(t, mnt)
	args := append(append([]string{"mount"}, flags...), image, mnt)
	if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
		t.Fatalf("vhdfs mount %s: %v: %s", image, err, out)
	}
	return mnt
}

// procMemory reads VmRSS and VmHWM, in bytes, from /proc/PID/status.
func procMemory(t testing.TB, pid int) (rss, hwm int64) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 3 || fields[2] != "kB" {
			continue
		}
		n, err := strconv.ParseInt(fields[1], 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		switch fields[0] {
		case "VmRSS:":
			rss = n << 10
		case "VmHWM:":
			hwm = n << 10
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if rss == 0 || hwm == 0 {
		t.Fatalf("no VmRSS or VmHWM in /proc/%d/status", pid)
	}
	return rss, hwm
}
