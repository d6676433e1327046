package test

import (
	"bytes"
	"path/filepath"
	"testing"
)

// TestExactSizeInQemu: an --exact-size image whose size no CHS geometry describes
// opens in qemu-img 7.2 (which sizes images of creators it does not know by their
// geometry) with the size vhdfs gives it, and qemu-img convert keeps its tail.
func TestExactSizeInQemu(t *testing.T) {
	t.Parallel()
	requireTool(t, "qemu-img")
	requireTool(t, "vhdiinfo")
	for _, typ := range []string{"dynamic", "fixed"} {
		t.Run(typ, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "e.vhd")
			mustVhdfs(t, "create", "--size", "100M", "--exact-size", "--type", typ, img)
			const size = 100 * mib
			model := make([]byte, size)
			tail := bytes.Repeat([]byte{0xa5}, 64<<10)
			applyWrites(t, img, model, []write{{Off: size - int64(len(tail)), Data: tail}})
			if got := vhdfsInfo(t, img).VirtualSize; got != size {
				t.Fatalf("vhdfs sees %d bytes, want %d", got, size)
			}
			if got := qemuImgInfo(t, "-f", "vpc", img).VirtualSize; got != size {
				t.Errorf("qemu-img info sees %d bytes, want %d", got, size)
			}
			if _, n := vhdiinfo(t, img); n != size {
				t.Errorf("vhdiinfo sees %d bytes, want %d", n, size)
			}
			assertSameBytes(t, "qemu-img convert", qemuConvert(t, img), model)
			assertSameBytes(t, "vhdfs export", fileBytes(t, exportImage(t, img)), model)
		})
	}
}
