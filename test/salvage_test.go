package test

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// salvageCase is a damaged image, the disk --salvage must read from it (intact data,
// zeros where lost), what each stderr line of the salvage says (one want per line, in
// order) and what the strict error says.
type salvageCase struct {
	name  string
	setup func(t *testing.T, dir string) (img string, model []byte)
	notes []string
	err   string
}

// exportModel exports the sound chain at img: the model before the damage.
func exportModel(t *testing.T, img string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "model.raw")
	mustVhdfs(t, "export", img, out)
	return fileBytes(t, out)
}

func salvageCases() []salvageCase {
	const blk = 512 << 10
	fixed := func(t *testing.T, dir string) (string, []byte) {
		p := filepath.Join(dir, "fixed.vhd")
		mustVhdfs(t, "create", "-q", "--size", "8M", "--type", "fixed", p)
		model := make([]byte, virtualSize(t, p))
		applyWrites(t, p, model, []write{{0, fill(4096, 0x11)}, {5 * mib, fill(8192, 0x77)}})
		return p, model
	}
	return []salvageCase{
		{
			name: "truncated dynamic",
			setup: func(t *testing.T, dir string) (string, []byte) {
				p := filepath.Join(dir, "trunc.vhd")
				dynamicWithData(t, p) // blocks 0, 2 and 6, in that order in the file
				applyWrites(t, p, make([]byte, 8*mib), []write{{7 * mib, fill(4096, 0x66)}})
				model := exportModel(t, p)
				l := readLayout(t, p)
				entries := []int64{}
				for _, i := range l.allocated() {
					entries = append(entries, int64(l.BAT[i])*512)
				}
				sort.Slice(entries, func(a, b int) bool { return entries[a] < entries[b] })
				if len(entries) != 4 || l.BAT[6] != uint32(entries[2]/512) || l.BAT[14] != uint32(entries[3]/512) {
					t.Fatalf("unexpected layout %v", l.BAT)
				}
				// Cut 32 KiB into the data of block 6 (after its 512-byte bitmap):
				// the rest of block 6 and all of block 14 are lost.
				if err := os.Truncate(p, entries[2]+512+32<<10); err != nil {
					t.Fatal(err)
				}
				clear(model[6*blk+32<<10 : 7*blk])
				clear(model[14*blk : 15*blk])
				return p, model
			},
			notes: []string{"footer at the end is damaged", "block 6 is cut by the end of the file", "block 14 (disk bytes 7340032-7864319) lies past the end of the file"},
			err:   "past the end",
		},
		{
			name: "truncated VHDX",
			setup: func(t *testing.T, dir string) (string, []byte) {
				p := filepath.Join(dir, "trunc.vhdx")
				mustVhdfs(t, "create", "-q", "--size", "8M", "--block-size", "1M", p)
				model := make([]byte, virtualSize(t, p))
				applyWrites(t, p, model, []write{{0, fill(mib, 0x11)}, {mib, fill(mib, 0x22)}, {2 * mib, fill(mib, 0x33)}, {3 * mib, fill(mib, 0x44)}})
				bat := vhdxBATOffset(t, p)
				type stored struct{ blk, off int64 }
				var blocks []stored
				for i := int64(0); i < 4; i++ {
					e := int64(binary.LittleEndian.Uint64(fileBytesAt(t, p, bat+8*i, 8)))
					blocks = append(blocks, stored{i, e &^ (mib - 1)})
				}
				sort.Slice(blocks, func(a, b int) bool { return blocks[a].off < blocks[b].off })
				// Cut halfway through the third block in the file: the rest of it and
				// all of the fourth are lost.
				if err := os.Truncate(p, blocks[2].off+mib/2); err != nil {
					t.Fatal(err)
				}
				clear(model[blocks[2].blk*mib+mib/2 : (blocks[2].blk+1)*mib])
				clear(model[blocks[3].blk*mib : (blocks[3].blk+1)*mib])
				return p, model
			},
			notes: []string{"is cut by the end of the file", "lies past the end of the file"},
			err:   "past the end of the file",
		},
		{
			name: "fixed with a bad footer checksum",
			setup: func(t *testing.T, dir string) (string, []byte) {
				p, model := fixed(t, dir)
				patchAt(t, p, int64(len(model))+64, []byte{0xde, 0xad})
				return p, model
			},
			notes: []string{"checksum mismatch); read as fixed data"},
			err:   "checksum",
		},
		{
			name: "fixed with its footer cut off",
			setup: func(t *testing.T, dir string) (string, []byte) {
				p, model := fixed(t, dir)
				if err := os.Truncate(p, int64(len(model))); err != nil {
					t.Fatal(err)
				}
				return p, model
			},
			notes: []string{"no VHD footer; read as fixed data"},
			err:   "not a VHD or VHDX image",
		},
		{
			name: "orphaned child, parent missing",
			setup: func(t *testing.T, dir string) (string, []byte) {
				base, child := simpleChain(t, dir)
				model := make([]byte, virtualSize(t, child))
				copy(model[512:], fill(512, 0x44))
				copy(model[5*mib:], fill(8192, 0x55))
				if err := os.Rename(base, filepath.Join(dir, "elsewhere.vhd")); err != nil {
					t.Fatal(err)
				}
				return child, model
			},
			notes: []string{"not found"},
			err:   "not found",
		},
		{
			name: "orphaned child, parent ID mismatched",
			setup: func(t *testing.T, dir string) (string, []byte) {
				base, child := simpleChain(t, dir)
				model := make([]byte, virtualSize(t, child))
				copy(model[512:], fill(512, 0x44))
				copy(model[5*mib:], fill(8192, 0x55))
				if err := os.Remove(base); err != nil {
					t.Fatal(err)
				}
				mustVhdfs(t, "create", "-q", "--size", "8M", base)
				return child, model
			},
			notes: []string{"but its unique ID changed"},
			err:   "does not match",
		},
	}
}

// checkNotes checks that stderr is one warning line per want, each naming img.
func checkNotes(t *testing.T, stderr, img string, want []string) {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
	if stderr == "" || len(lines) != len(want) {
		if stderr == "" {
			t.Fatalf("stderr is empty, want %d warning lines", len(want))
		}
		t.Fatalf("stderr is %d lines, want %d:\n%s", len(lines), len(want), stderr)
	}
	for i, w := range want {
		if !strings.Contains(lines[i], "warning: ") || !strings.Contains(lines[i], w) || !strings.Contains(lines[i], filepath.Dir(img)) {
			t.Errorf("stderr line %d %q: want a warning naming the file that says %q", i, lines[i], w)
		}
	}
}

func TestSalvage(t *testing.T) {
	for _, tc := range salvageCases() {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img, model := tc.setup(t, dir)
			snap := snapshotFiles(t, dir)
			out := filepath.Join(t.TempDir(), "out.raw")

			_, stderr, code := vhdfs(t, "export", img, out)
			if code == 0 {
				t.Fatal("export without --salvage succeeded")
			}
			assertOneLineError(t, stderr, tc.err)

			// A new name: the failed export may have begun its output, which export
			// does not overwrite without --force.
			out = filepath.Join(t.TempDir(), "salvaged.raw")
			_, stderr, code = vhdfs(t, "export", "--salvage", img, out)
			if code != 0 {
				t.Fatalf("export --salvage: exit %d: %s", code, stderr)
			}
			checkNotes(t, stderr, img, tc.notes)
			if !bytes.Equal(fileBytes(t, out), model) {
				t.Error("export --salvage differs from the model")
			}
			if _, stderr, code := vhdfs(t, "info", "--salvage", img); code != 0 {
				t.Errorf("info --salvage: exit %d: %s", code, stderr)
			} else {
				checkNotes(t, stderr, img, tc.notes)
			}
			assertUnchanged(t, snap)
		})
	}
}

func TestSalvageMount(t *testing.T) {
	tc := salvageCases()[0]
	dir := t.TempDir()
	img, model := tc.setup(t, dir)
	snap := snapshotFiles(t, dir)
	mnt := mMountpoint(t)
	unmountOnCleanup(t, mnt)
	if _, stderr, code := vhdfs(t, "mount", "--salvage", img, mnt); code != 2 || !strings.Contains(stderr, "-r") {
		t.Errorf("mount --salvage without -r: exit %d, %q; want a usage error", code, stderr)
	}
	if _, stderr, code := vhdfs(t, "mount", "-r", img, mnt); code == 0 {
		t.Fatal("mount -r of a truncated image without --salvage succeeded")
	} else if !strings.Contains(stderr, tc.err) {
		t.Errorf("mount -r: %q does not say %q", stderr, tc.err)
	}
	_, stderr, code := vhdfs(t, "mount", "-r", "--salvage", img, mnt)
	if code != 0 {
		t.Fatalf("mount -r --salvage: exit %d: %s", code, stderr)
	}
	for _, w := range tc.notes {
		if !strings.Contains(stderr, w) {
			t.Errorf("mount -r --salvage stderr %q lacks %q", stderr, w)
		}
	}
	if got := fileBytes(t, filepath.Join(mnt, "disk.raw")); !bytes.Equal(got, model) {
		t.Error("disk.raw of the salvage mount differs from the model")
	}
	mustRun(t, "fusermount3", "-u", mnt)
	assertUnchanged(t, snap)
}

// TestSalvageFooterCopyNotice: a dynamic image whose end footer is damaged opens
// from the copy at offset 0, and info and export say so in one stderr line.
func TestSalvageFooterCopyNotice(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "d.vhd")
	l := dynamicWithData(t, p)
	model := exportModel(t, p)
	patchAt(t, p, l.FooterOff+64, []byte{0xde, 0xad})
	snap := snapshotFiles(t, dir)
	want := []string{"footer at the end is damaged", "using the copy at offset 0"}
	_, stderr, code := vhdfs(t, "info", p)
	if code != 0 {
		t.Fatalf("info: exit %d: %s", code, stderr)
	}
	checkNotes(t, stderr, p, want[:1])
	out := filepath.Join(t.TempDir(), "out.raw")
	_, stderr, code = vhdfs(t, "export", p, out)
	if code != 0 {
		t.Fatalf("export: exit %d: %s", code, stderr)
	}
	checkNotes(t, stderr, p, want[1:])
	if !bytes.Equal(fileBytes(t, out), model) {
		t.Error("export differs from the image as it was")
	}
	assertUnchanged(t, snap)
}
