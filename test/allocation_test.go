package test

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// TestDiskAllocation: disk.raw's st_blocks is the space the chain's image files take
// (what du and qemu-img info show), not its size: an empty 1 GiB chain takes under
// 16 MiB, and 64 MiB written into the top add about 64 MiB; a layer's view counts
// from its depth down.
func TestDiskAllocation(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", "1G")
		top := createChild(t, base, "top")
		mnt := mountEnv(t, top, nil)
		disk := filepath.Join(mnt, "disk.raw")
		const mib = 1 << 20
		allocated := func(p string) int64 { return allocatedBytes(t, p) }
		files := func() int64 { return allocated(base) + allocated(top) }
		empty := allocated(disk)
		if empty > 16*mib || empty != files() {
			t.Errorf("empty chain: disk.raw takes %d bytes, the image files %d; want theirs, under 16 MiB", empty, files())
		}
		f, err := os.OpenFile(disk, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, mib)
		r := rand.New(rand.NewPCG(5, 6))
		for i := range 64 {
			for j := range buf {
				buf[j] = byte(r.Uint32())
			}
			if _, err := f.WriteAt(buf, int64(i)*mib); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		written := allocated(disk)
		if grew := written - empty; grew < 64*mib || grew > 64*mib+16*mib || written != files() {
			t.Errorf("after 64 MiB written: disk.raw takes %d bytes (grew %d), the image files %d; want theirs, grown by 64-80 MiB", written, grew, files())
		}
		layer := filepath.Join(mnt, "layers", mLayerName(1, base))
		if got := allocated(layer); got != allocated(base) {
			t.Errorf("layers/%s takes %d bytes, the base's file %d", filepath.Base(layer), got, allocated(base))
		}
		mustVhdfs(t, "umount", mnt)
	})
}
