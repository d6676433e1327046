package vhdx

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

// problems is Check's findings as lines, each checked to be one line naming the file.
func problems(t *testing.T, img *Image) []image.Problem {
	t.Helper()
	ps := img.Check()
	for _, p := range ps {
		if p.File != img.Name() || strings.Contains(p.Message, "\n") || p.Message == "" {
			t.Errorf("problem %q is not one line about %s", p.String(), img.Name())
		}
		if testing.Verbose() {
			t.Log(p.String())
		}
	}
	return ps
}

// TestCheckClean: an image as the builder makes it has no problem.
func TestCheckClean(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    *builder
	}{
		{"dynamic", func() *builder {
			b := newBuilder(8*MiB, MiB)
			b.states[1], b.data[1] = FullyPresent, fill(MiB, 1)
			return b
		}()},
		{"differencing", func() *builder {
			b := newBuilder(8*MiB, 2*MiB)
			b.parent = true
			b.locator = []KeyValue{{"parent_linkage", "{" + NewGUID().String() + "}"}, {"relative_path", `.\p.vhdx`}}
			b.states[0], b.data[0], b.bits[0] = PartiallyPresent, fill(2*MiB, 1), []int64{0, 1, 7}
			b.states[2] = FullyPresent
			return b
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, err := Open(writeFile(t, tc.b.build()), false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if ps := problems(t, img); len(ps) != 0 {
				t.Errorf("%d problems, want none: %v", len(ps), ps)
			}
		})
	}
}

// TestCheckQemu: images qemu-img makes have notes at most.
func TestCheckQemu(t *testing.T) {
	needTool(t, "qemu-img")
	for _, sub := range []string{"dynamic", "fixed"} {
		t.Run(sub, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "q.vhdx")
			run(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat="+sub, p, "16M")
			img, err := Open(p, false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			for _, p := range problems(t, img) {
				if p.Severity != image.Note {
					t.Errorf("qemu-img's %s image: %v", sub, p)
				}
			}
		})
	}
}

// TestCheck: each file Open accepts but the specification frowns on gets the finding
// named, with its severity.
func TestCheck(t *testing.T) {
	dynamic := func(edit func(b *builder)) []byte {
		b := newBuilder(8*MiB, MiB)
		b.states[0], b.data[0] = FullyPresent, fill(MiB, 1)
		if edit != nil {
			edit(b)
		}
		return b.build()
	}
	patched := func(patch func(f []byte)) []byte {
		f := dynamic(nil)
		patch(f)
		return f
	}
	differencing := func(edit func(b *builder)) []byte {
		b := newBuilder(8*MiB, MiB)
		b.parent = true
		b.locator = []KeyValue{{"parent_linkage", "{" + NewGUID().String() + "}"}, {"relative_path", `.\p.vhdx`}}
		if edit != nil {
			edit(b)
		}
		return b.build()
	}
	logFile, _, _ := logImage(t)
	for _, tc := range []struct {
		name string
		file []byte
		sev  image.Severity
		want string
	}{
		{"older header invalid", patched(func(f []byte) { f[header1Off+200]++ }), image.Warning, "header at 65536 is not valid"},
		{"both headers with one sequence number", dynamic(func(b *builder) { b.seq1 = 2 }), image.Note, "both headers are the same copy (sequence number 2)"},
		{"older header has the log elsewhere", patched(func(f []byte) { put64(f, header1Off+72, 5*MiB); fixHeader(f, header1Off) }), image.Warning, "puts the log at 5242880"},
		{"header reserved bytes", patched(func(f []byte) { f[header2Off+1000] = 1; fixHeader(f, header2Off) }), image.Note, "header at 131072: unused bytes 80-4095"},
		{"DataWriteGuid zero", dynamic(func(b *builder) { b.dataWrite = GUID{} }), image.Warning, "DataWriteGuid is zero"},
		{"FileWriteGuid zero", dynamic(func(b *builder) { b.fileWrite = GUID{} }), image.Note, "(FileWriteGuid) is zero"},
		{"no log", patched(func(f []byte) {
			for _, off := range []int64{header1Off, header2Off} {
				put32(f, off+68, 0)
				put64(f, off+72, 0)
				fixHeader(f, off)
			}
		}), image.Warning, "no log region"},
		{"log not replayed", logFile, image.Warning, "log holds 2 entries"},
		{"first region table invalid", patched(func(f []byte) { f[regionTable1Off+20]++ }), image.Warning, "region table at 196608 is not valid"},
		{"region tables differ", patched(func(f []byte) { put32(f, regionTable2Off+12, 1); fixRegionTables(f) }), image.Warning, "region tables at 196608 and 262144 differ"},
		{"region table reserved field", patched(func(f []byte) { put32(f, regionTable2Off+12, 1); fixRegionTables(f) }), image.Note, "region table at 262144: an unused field is not zero"},
		{"BAT region not required", patched(func(f []byte) {
			put32(f, regionTable1Off+16+28, 0)
			put32(f, regionTable2Off+16+28, 0)
			fixRegionTables(f)
		}), image.Note, "region 0 (the BAT) is not marked required"},
		{"region reserved flag bits", patched(func(f []byte) {
			put32(f, regionTable1Off+16+28, 5)
			put32(f, regionTable2Off+16+28, 5)
			fixRegionTables(f)
		}), image.Note, "reserved flag bits 0x4"},
		{"unknown optional region", dynamic(func(b *builder) {
			b.extraRegions = []RegionEntry{{Guid: NewGUID(), FileOffset: uint64(b.blockOffset(5)), Length: MiB}}
		}), image.Note, "is not known and not required"},
		{"metadata items overlap", patched(func(f []byte) {
			put32(f, mdFirstEntry+2*metadataEntryLen+16, uint32(mdVirtualSize-bMetaOff))
		}), image.Error, "metadata item 2 (" + ItemPage83Data.String() + ") at region offset 65544 overlaps metadata item 1"},
		{"unknown optional metadata item", dynamic(func(b *builder) {
			b.extraItems = []MetadataEntry{{ItemID: NewGUID(), Length: 8}}
		}), image.Note, "not known, and not required: ignored"},
		{"system item not required", patched(func(f []byte) { put32(f, mdFirstEntry+24, 0) }), image.Note, "metadata item 0 (" + ItemFileParameters.String() + ") is not marked required"},
		{"IsVirtualDisk on the file parameters", patched(func(f []byte) { put32(f, mdFirstEntry+24, itemIsRequired|itemIsVirtualDisk) }), image.Note, "IsVirtualDisk flag is true where the format says false"},
		{"file parameters reserved bits", patched(func(f []byte) { put32(f, mdBlockSize+4, 0x10) }), image.Note, "file parameters: unused flag bits (reserved flag bits 0x10)"},
		{"locator without a parent", func() []byte {
			f := differencing(nil)
			put32(f, mdBlockSize+4, 0)
			return f
		}(), image.Note, "no parent but keeps a parent locator"},
		{"no parent_linkage", differencing(func(b *builder) { b.locator = b.locator[1:] }), image.Error, "no parent_linkage"},
		{"parent_linkage not a GUID", differencing(func(b *builder) { b.locator[0].Value = "{123}" }), image.Error, `parent_linkage "{123}" is not a GUID`},
		{"parent_linkage2 zero", differencing(func(b *builder) {
			b.locator = append(b.locator, KeyValue{"parent_linkage2", "{00000000-0000-0000-0000-000000000000}"})
		}), image.Note, "parent_linkage2 is zero"},
		{"parent_linkage2 not a GUID", differencing(func(b *builder) { b.locator = append(b.locator, KeyValue{"parent_linkage2", "x"}) }), image.Warning, `parent_linkage2 "x" is not a GUID`},
		{"no path", differencing(func(b *builder) { b.locator = b.locator[:1] }), image.Warning, "nothing says where the parent is"},
		{"unknown locator key", differencing(func(b *builder) { b.locator = append(b.locator, KeyValue{"vhdfs_hint", "y"}) }), image.Note, `parent locator entry "vhdfs_hint" is not one vhdfs knows`},
		{"stray BAT entries past the count", dynamic(func(b *builder) { b.rawBAT[8], b.rawBAT[100] = 2, 6 }), image.Note, "block table entries past the 8 in use: 2 not zero (the first: entry 8)"},
		{"BAT reserved bits", dynamic(func(b *builder) { b.rawBAT[1] = uint64(makeEntry(Zero, 0)) | 1<<5 }), image.Note, "BAT entry 1: unused bits (reserved bits 3-19) are 0x4"},
		{"UNMAPPED as the draft wrote it", dynamic(func(b *builder) { b.states[1], b.states[2] = unmappedDraft, unmappedDraft }), image.Note, "2 block table entries mark unmapped blocks as a draft of the format did"},
		{"fixed image with ZERO blocks", dynamic(func(b *builder) {
			b.leaveAlloc = true
			for p := int64(0); p < 8; p++ {
				b.states[p], b.data[p] = FullyPresent, nil
			}
			b.states[3], b.states[6] = Zero, NotPresent
		}), image.Note, "fixed image has 2 blocks not fully allocated (the first: block 3, ZERO)"},
		{"PARTIALLY_PRESENT without a bit", differencing(func(b *builder) { b.states[2] = PartiallyPresent }), image.Note, "block 2 is PARTIALLY_PRESENT with no sector written"},
		{"PARTIALLY_PRESENT with every bit", differencing(func(b *builder) {
			b.states[3] = PartiallyPresent
			for s := int64(0); s < MiB/512; s++ {
				b.bits[3] = append(b.bits[3], s)
			}
		}), image.Note, "block 3 is PARTIALLY_PRESENT with every sector written"},
		{"file size not a multiple of 1 MiB", append(dynamic(nil), make([]byte, 512)...), image.Note, "file size 12583424 is not a multiple of 1 MiB"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := writeFile(t, tc.file)
			img, err := Open(p, false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			before := fileSum(t, p)
			found := false
			for _, pr := range problems(t, img) {
				if strings.Contains(pr.Message, tc.want) {
					found = true
					if pr.Severity != tc.sev {
						t.Errorf("%q is a %v, want a %v", pr.Message, pr.Severity, tc.sev)
					}
				}
			}
			if !found {
				t.Errorf("no problem says %q", tc.want)
			}
			if fileSum(t, p) != before {
				t.Error("Check changed the file")
			}
		})
	}
}

// TestCheckInMemoryBAT: Check looks at the BAT as reads see it, with the sectors
// that writes changed and that wait for the next Sync (source.pending).
func TestCheckInMemoryBAT(t *testing.T) {
	b := newBuilder(8*MiB, MiB)
	b.states[0], b.states[1] = FullyPresent, FullyPresent
	img, err := Open(writeFile(t, b.build()), false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	g := img.geo
	set := func(idx int64, e batEntry) {
		off := img.batOff + 8*idx
		k := off &^ (logSector - 1)
		if img.src.pending == nil {
			img.src.pending = map[int64][]byte{}
		}
		s, ok := img.src.pending[k]
		if !ok {
			s = make([]byte, logSector)
			if err := img.src.readAt(s, k); err != nil {
				t.Fatal(err)
			}
			img.src.pending[k] = s
		}
		binary.LittleEndian.PutUint64(s[off-k:], uint64(e))
	}
	e0, err := img.entry(g.payloadIndex(0))
	if err != nil {
		t.Fatal(err)
	}
	set(g.payloadIndex(1), e0)
	set(g.payloadIndex(2), makeEntry(FullyPresent, bMetaOff))
	set(g.payloadIndex(3), makeEntry(FullyPresent, 100*MiB))
	want := map[string]bool{
		"BAT entry 0 (block 0) and BAT entry 1 (block 1) overlap at":                          false,
		"BAT entry 2 (block 2) points to 2097152, overlapping the metadata region at 2097152": false,
		"BAT entry 3 (block 3) points to 104857600+1048576, past the end of the file":         false,
	}
	for _, p := range problems(t, img) {
		for w := range want {
			if strings.Contains(p.Message, w) && p.Severity == image.Error {
				want[w] = true
			}
		}
	}
	for w, ok := range want {
		if !ok {
			t.Errorf("no error says %q", w)
		}
	}
}

// TestRepair: Repair replays a pending log into the file and says how many entries;
// afterwards the image opens with an empty log, the same view and no log warning.
func TestRepair(t *testing.T) {
	f, m, _ := logImage(t)
	p := writeFile(t, f)
	n, err := Repair(p)
	if err != nil || n != 2 {
		t.Fatalf("Repair = %d, %v; want 2 entries", n, err)
	}
	img, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.LogReplayed() != 0 || !img.Header().LogGuid.IsZero() {
		t.Errorf("after Repair: %d entries replayed at open, log GUID %v", img.LogReplayed(), img.Header().LogGuid)
	}
	checkModel(t, img, m)
	for _, pr := range problems(t, img) {
		if strings.Contains(pr.Message, "log holds") {
			t.Errorf("after Repair: %v", pr)
		}
	}
	f2, _, _ := logImage(t)
	w, err := Open(writeFile(t, f2), true)
	if err != nil {
		t.Fatal(err)
	}
	for _, pr := range problems(t, w) {
		if strings.Contains(pr.Message, "log holds") {
			t.Errorf("a writable open, which replayed the log: %v", pr)
		}
	}
	w.Close()
	before := fileSum(t, p)
	if n, err := Repair(p); err != nil || n != 0 {
		t.Errorf("a second Repair = %d, %v; want 0 entries", n, err)
	}
	if fileSum(t, p) != before {
		t.Error("a Repair with nothing to replay changed the file")
	}
	if _, err := Repair(filepath.Join(t.TempDir(), "none.vhdx")); !os.IsNotExist(err) {
		t.Errorf("Repair of a missing file: %v", err)
	}
	if path, err := exec.LookPath("qemu-img"); err == nil {
		if out, err := exec.Command(path, "check", "-f", "vhdx", "-U", p).CombinedOutput(); err != nil {
			t.Errorf("qemu-img check after Repair: %v\n%s", err, out)
		}
	}
}

// TestCheckBitmapInDynamic: a sector bitmap entry that is present in an image
// without a parent is a note (ignored). It takes more than one chunk (4 GiB): a sparse
// qemu-img file, its first sector bitmap entry pointed at a new 1 MiB at the end.
func TestCheckBitmapInDynamic(t *testing.T) {
	needTool(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "big.vhdx")
	run(t, "qemu-img", "create", "-q", "-f", "vhdx", p, "5G")
	img, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	g, batOff := img.geo, img.batOff
	img.Close()
	if g.entries <= g.chunkRatio {
		t.Fatalf("%d BAT entries: no sector bitmap entry in use", g.entries)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	end := (st.Size() + MiB - 1) / MiB * MiB
	if err := f.Truncate(end + MiB); err != nil {
		t.Fatal(err)
	}
	e := make([]byte, 8)
	put64(e, 0, uint64(makeEntry(Present, end)))
	if _, err := f.WriteAt(e, batOff+8*g.chunkRatio); err != nil {
		t.Fatal(err)
	}
	f.Close()
	img, err = Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	want := "the image has no parent but keeps a sector bitmap block at " + strconv.FormatInt(end, 10)
	found := false
	for _, pr := range problems(t, img) {
		if strings.Contains(pr.Message, want) && pr.Severity == image.Note {
			found = true
		}
	}
	if !found {
		t.Errorf("no note says %q", want)
	}
}

// TestCheckBounded: findings that come entry by entry are named for the first
// maxPerEntry entries and counted in one line for the rest, so a crafted table of
// millions of entries gives a bounded report.
func TestCheckBounded(t *testing.T) {
	b := newBuilder(256*MiB, MiB)
	g := b.geometry()
	for p := int64(1); p < 256; p++ {
		b.rawBAT[g.payloadIndex(p)] = uint64(makeEntry(Zero, 0)) | 1<<5
	}
	p := writeFile(t, b.build())
	img, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	named, summary := 0, ""
	for _, pr := range problems(t, img) {
		switch {
		case strings.Contains(pr.Message, "unused bits (reserved bits 3-19)"):
			named++
		case strings.Contains(pr.Message, "more BAT entries with unused bits set"):
			summary = pr.Message
		}
	}
	if named != maxPerEntry {
		t.Errorf("%d entries named, want %d", named, maxPerEntry)
	}
	if want := fmt.Sprintf("%d more BAT entries with unused bits set", 255-maxPerEntry); summary != want {
		t.Errorf("summary %q, want %q", summary, want)
	}
}
