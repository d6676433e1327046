package test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"unsafe"
)

// splRead reads n bytes at off of path with O_DIRECT, so the READ reaches vhdfs in
// the reader's own size (at most the mount's max_read).
func splRead(path string, off, n int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	// O_DIRECT wants an aligned buffer.
	raw := make([]byte, n+4096)
	a := int((4096 - uintptr(unsafe.Pointer(&raw[0]))%4096) % 4096)
	buf := raw[a : a+int(n)]
	k, err := f.ReadAt(buf, off)
	if int64(k) == n {
		err = nil
	}
	return buf[:k], err
}

// splSplicedReplies counts the READ replies go-fuse's debug log shows as sent from a
// pipe, by size.
func splSplicedReplies(log string) map[string]int {
	m := map[string]int{}
	for _, s := range regexp.MustCompile(`\(fd (\d+)b data\)`).FindAllStringSubmatch(log, -1) {
		m[s[1]]++
	}
	return m
}

// TestMountSplicedReads: READs of 128 KiB and more are spliced from the image files,
// whether one layer holds the range, several do, or none (zeros), and read as the
// model; smaller READs are copied, and read as the model too. The writes are whole
// pages: runs that split at sector boundaries inside a page take more pipe buffers
// than go-fuse's reply pipe has slots, and are copied instead (fs TestSpliceReplyFits;
// TestFsx reads them).
func TestMountSplicedReads(t *testing.T) {
	c := makeChain(t, chainOptions{Depth: 3, Create: []string{"--size", "8M"}, Writes: 12, Align: 4096, MaxLen: 100 << 10, Seed: 11})
	model := c.Model()
	mnt := mMountpoint(t)
	logPath := rpForeground(t, c.Top(), mnt, "-r", "--debug")
	disk := filepath.Join(mnt, "disk.raw")
	before := len(fileBytes(t, logPath))
	for _, tc := range []struct {
		name   string
		off, n int64
		splice bool
	}{
		{"512 KiB at 0", 0, 512 << 10, true},
		{"every 512 KiB", -1, 512 << 10, true},
		{"128 KiB at an odd sector", 7 * 512, 128 << 10, true},
		{"256 KiB across the end of a 2 MiB block", 2<<20 - 64<<10, 256 << 10, true},
		{"the last 128 KiB", int64(len(model)) - 128<<10, 128 << 10, true},
		{"64 KiB: copied", 3 << 20, 64 << 10, false},
		{"4 KiB: copied", 5<<20 + 4096, 4096, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			offs := []int64{tc.off}
			if tc.off < 0 {
				offs = nil
				for o := int64(0); o+tc.n <= int64(len(model)); o += tc.n {
					offs = append(offs, o)
				}
			}
			mark := len(fileBytes(t, logPath))
			for _, off := range offs {
				got, err := splRead(disk, off, tc.n)
				if err != nil {
					t.Fatalf("read %d bytes at %d: %v", tc.n, off, err)
				}
				assertSameBytes(t, fmt.Sprintf("%d bytes at %d", tc.n, off), got, model[off:off+tc.n])
			}
			spliced := splSplicedReplies(string(fileBytes(t, logPath)[mark:]))[fmt.Sprint(tc.n)]
			if tc.splice && spliced != len(offs) {
				t.Errorf("%d of %d READs of %d bytes spliced, want all", spliced, len(offs), tc.n)
			}
			if !tc.splice && spliced != 0 {
				t.Errorf("%d READs of %d bytes spliced, want none", spliced, tc.n)
			}
		})
	}
	if strings.Contains(string(fileBytes(t, logPath)[before:]), "trySplice") {
		t.Errorf("go-fuse logged a failed splice")
	}
	mUmount(t, mnt)
}

// TestMountSplicedReadsDuringMerge: spliced reads of disk.raw during merges that
// shorten the chain (and close the merged-away images) read as the model.
func TestMountSplicedReadsDuringMerge(t *testing.T) {
	c := makeChain(t, chainOptions{Depth: 4, Create: []string{"--size", "16M"}, Writes: 30, Seed: 12})
	model := c.Model()
	mnt := mMountpoint(t)
	logPath := rpForeground(t, c.Top(), mnt, "--debug")
	disk := filepath.Join(mnt, "disk.raw")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(i), 12))
			for {
				select {
				case <-stop:
					return
				default:
				}
				n := int64(128<<10) << r.IntN(3)
				off := r.Int64N(int64(len(model))-n) / 512 * 512
				got, err := splRead(disk, off, n)
				if err != nil {
					t.Errorf("read %d bytes at %d: %v", n, off, err)
					return
				}
				assertSameBytes(t, fmt.Sprintf("%d bytes at %d", n, off), got, model[off:off+n])
			}
		}()
	}
	for _, cmd := range []string{"merge depth=1", "merge depth=2"} {
		if e := control(mnt, cmd); e != 0 {
			t.Errorf("%s: %v: %+v", cmd, e, readMergeStatus(t, mnt).Last)
		}
	}
	close(stop)
	wg.Wait()
	if st := readMergeStatus(t, mnt); len(st.Chain) != 3 {
		t.Errorf("chain after the merges has %d images, want 3", len(st.Chain))
	}
	assertSameBytes(t, "disk.raw after the merges", fileBytes(t, disk), model)
	mUmount(t, mnt)
	if len(splSplicedReplies(string(fileBytes(t, logPath)))) == 0 {
		t.Errorf("no READ reply was spliced")
	}
}
