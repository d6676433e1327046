package vhdx

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

// TestGUIDAndID: a GUID as the file stores it (mixed-endian) and the ID of its text
// form convert both ways, with the BAT region's GUID of §2.2.3.2 as the known value.
func TestGUIDAndID(t *testing.T) {
	disk := GUID{0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08}
	text := image.ID{0x2d, 0xc2, 0x77, 0x66, 0xf6, 0x23, 0x42, 0x00, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08}
	if RegionBAT != disk {
		t.Fatalf("RegionBAT is % x", RegionBAT[:])
	}
	if got := disk.ID(); got != text {
		t.Errorf("ID() = % x, want % x", got[:], text[:])
	}
	if got := disk.ID().String(); got != "2dc27766-f623-4200-9d64-115e9bfd4a08" {
		t.Errorf("ID().String() = %s", got)
	}
	if got := GUIDOf(text); got != disk {
		t.Errorf("GUIDOf = % x, want % x", got[:], disk[:])
	}
	for range 100 {
		g := NewGUID()
		if GUIDOf(g.ID()) != g || g.ID().String() != g.String() {
			t.Fatalf("%v does not round-trip", g)
		}
		id := image.NewID()
		if GUIDOf(id).ID() != id || GUIDOf(id).String() != id.String() {
			t.Fatalf("%v does not round-trip", id)
		}
	}
}

// TestParentIdentity: ParentID, AcceptsParent and ParentHints read the parent
// locator as §2.6.2.6.3 says.
func TestParentIdentity(t *testing.T) {
	p1, p2 := NewGUID(), NewGUID()
	brace := func(g GUID) string { return "{" + g.String() + "}" }
	zero := "{00000000-0000-0000-0000-000000000000}"
	for _, tc := range []struct {
		name      string
		parent    bool
		locator   []KeyValue
		parentID  image.ID
		accepts   []image.ID
		refuses   []image.ID
		hints     []image.ParentHint
		hintError error
	}{
		{name: "no parent", refuses: []image.ID{p1.ID(), {}}},
		{name: "Windows: all paths, zero parent_linkage2", parent: true, locator: []KeyValue{
			{"parent_linkage", brace(p1)}, {"parent_linkage2", zero},
			{"relative_path", `..\base\Parent.vhdx`},
			{"volume_path", `\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\base\Parent.vhdx`},
			{"absolute_win32_path", `C:\base\Parent.vhdx`},
		}, parentID: p1.ID(), accepts: []image.ID{p1.ID()}, refuses: []image.ID{{}, p2.ID()},
			hints: []image.ParentHint{{Path: "../base/Parent.vhdx", Source: "relative_path"}, {Path: "Parent.vhdx", Source: "volume_path"}}},
		{name: "parent_linkage2 names a second parent, upper case", parent: true, locator: []KeyValue{
			{"parent_linkage", brace(p1)}, {"parent_linkage2", "{" + string(bytes.ToUpper([]byte(p2.String()))) + "}"},
			{"absolute_win32_path", `D:\vms\other.vhdx`},
		}, parentID: p1.ID(), accepts: []image.ID{p1.ID(), p2.ID()}, refuses: []image.ID{NewGUID().ID()},
			hints: []image.ParentHint{{Path: "other.vhdx", Source: "absolute_win32_path"}}},
		{name: "bad parent_linkage", parent: true, locator: []KeyValue{{"parent_linkage", "nonsense"}, {"relative_path", `.\p.vhdx`}},
			refuses: []image.ID{{}, p1.ID()}, hints: []image.ParentHint{{Path: "p.vhdx", Source: "relative_path"}}},
		{name: "no paths", parent: true, locator: []KeyValue{{"parent_linkage", brace(p1)}},
			parentID: p1.ID(), accepts: []image.ID{p1.ID()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBuilder(8*MiB, MiB)
			b.parent, b.locator = tc.parent, tc.locator
			img, err := Open(writeFile(t, b.build()), false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if got := img.ParentID(); got != tc.parentID {
				t.Errorf("ParentID = %v, want %v", got, tc.parentID)
			}
			for _, id := range tc.accepts {
				if !img.AcceptsParent(id) {
					t.Errorf("AcceptsParent(%v) = false", id)
				}
			}
			for _, id := range tc.refuses {
				if img.AcceptsParent(id) {
					t.Errorf("AcceptsParent(%v) = true", id)
				}
			}
			hints, err := img.ParentHints()
			if !errors.Is(err, tc.hintError) || !reflect.DeepEqual(hints, tc.hints) {
				t.Errorf("ParentHints = %v, %v; want %v, %v", hints, err, tc.hints, tc.hintError)
			}
			if got := img.ID(); got != b.dataWrite.ID() {
				t.Errorf("ID = %v, want the DataWriteGuid %v", got, b.dataWrite)
			}
		})
	}
}

// TestParentHintsUnknownLocatorType: a locator of another type is ErrUnsupported
// (Open refuses it; ParentHints says so too if it gets one).
func TestParentHintsUnknownLocatorType(t *testing.T) {
	b := newBuilder(8*MiB, MiB)
	b.parent, b.locator = true, []KeyValue{{"parent_linkage", "{" + NewGUID().String() + "}"}}
	img, err := Open(writeFile(t, b.build()), false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	img.meta.Load().LocatorType = NewGUID()
	if _, err := img.ParentHints(); !errors.Is(err, ErrUnsupported) {
		t.Errorf("ParentHints = %v, want ErrUnsupported", err)
	}
}

// TestSetID: SetID writes a new DataWriteGuid through the other header slot with the
// next sequence number, changes the FileWriteGuid once, and later writes keep the ID;
// a torn header update leaves the old ID.
func TestSetID(t *testing.T) {
	b := newBuilder(8*MiB, MiB)
	b.states[0], b.data[0] = FullyPresent, fill(MiB, 1)
	p := writeFile(t, b.build())

	ro, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := ro.SetID(image.NewID()); !errors.Is(err, ErrReadOnly) {
		t.Errorf("SetID on a read-only image: %v", err)
	}
	ro.Close()

	img, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.SetID(image.ID{}); !errors.Is(err, ErrInvalidArg) {
		t.Errorf("SetID(zero): %v", err)
	}
	h0 := img.Header()
	id := image.NewID()
	if err := img.SetID(id); err != nil {
		t.Fatal(err)
	}
	h1 := img.Header()
	if img.ID() != id || h1.DataWriteGuid != GUIDOf(id) {
		t.Errorf("ID after SetID = %v, want %v", img.ID(), id)
	}
	if h1.SequenceNumber != h0.SequenceNumber+1 || img.headerSlot != header1Off {
		t.Errorf("header %d in slot %d, want %d in slot %d", h1.SequenceNumber, img.headerSlot, h0.SequenceNumber+1, header1Off)
	}
	if h1.FileWriteGuid == h0.FileWriteGuid {
		t.Error("SetID left the FileWriteGuid")
	}
	// A write into a present block, then one that allocates (through the log).
	for _, off := range []int64{0, 5 * MiB} {
		if _, err := img.WriteAt(fill(4096, 7), off); err != nil {
			t.Fatal(err)
		}
	}
	if h := img.Header(); img.ID() != id || h.FileWriteGuid != h1.FileWriteGuid {
		t.Errorf("a write after SetID changed the ID to %v or the FileWriteGuid", img.ID())
	}
	id2 := image.NewID()
	if err := img.SetID(id2); err != nil {
		t.Fatal(err)
	}
	if h := img.Header(); h.FileWriteGuid != h1.FileWriteGuid {
		t.Error("a second SetID changed the FileWriteGuid again")
	}
	slot := img.headerSlot
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	img, err = Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	if img.ID() != id2 {
		t.Errorf("reopened: ID %v, want %v", img.ID(), id2)
	}
	img.Close()
	if _, err := exec.LookPath("qemu-img"); err == nil {
		run(t, "qemu-img", "check", "-q", "-f", "vhdx", p)
	}

	// Tear the newest header: the one before it wins, with the ID it had.
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(fill(100, 0xee), slot+2000); err != nil {
		t.Fatal(err)
	}
	f.Close()
	img, err = Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.ID() != id {
		t.Errorf("torn newest header: ID %v, want the one before, %v", img.ID(), id)
	}
}

// TestWriteChangesID: without SetID the first write gives a new DataWriteGuid (and
// FileWriteGuid), once.
func TestWriteChangesID(t *testing.T) {
	b := newBuilder(8*MiB, MiB)
	img, err := Open(writeFile(t, b.build()), true)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.ID() != b.dataWrite.ID() {
		t.Fatal("ID is not the DataWriteGuid")
	}
	if _, err := img.WriteAt(fill(512, 1), 0); err != nil {
		t.Fatal(err)
	}
	first := img.ID()
	if first == b.dataWrite.ID() || img.FileWriteGuid() == b.fileWrite {
		t.Error("the first write kept the DataWriteGuid or the FileWriteGuid")
	}
	if _, err := img.WriteAt(fill(512, 1), 3*MiB); err != nil {
		t.Fatal(err)
	}
	if img.ID() != first {
		t.Error("a second write changed the ID again")
	}
}

// TestSetIDCrash cuts SetID after each of its writes and fsyncs: the file opens
// with the old ID or the new one, never neither.
func TestSetIDCrash(t *testing.T) {
	b := newBuilder(8*MiB, MiB)
	base := writeFile(t, b.build())
	id := image.NewID()
	for k := 0; ; k++ {
		p, img, _ := openCut(t, base, k)
		serr := img.SetID(id)
		img.Close()
		ro, err := Open(p, false)
		if err != nil {
			t.Fatalf("cut after %d: %v", k, err)
		}
		got := ro.ID()
		ro.Close()
		if got != id && got != b.dataWrite.ID() {
			t.Fatalf("cut after %d: ID %v is neither old nor new", k, got)
		}
		if serr == nil {
			if got != id {
				t.Fatalf("SetID succeeded but the file has ID %v", got)
			}
			return
		}
	}
}

// TestIDAgreesWithLibvhdi: libvhdi's vhdiinfo prints a VHDX's identifier (the
// DataWriteGuid) in text form; ID gives the same text for a file qemu-img made.
func TestIDAgreesWithLibvhdi(t *testing.T) {
	needTool(t, "qemu-img")
	needTool(t, "vhdiinfo")
	p := filepath.Join(t.TempDir(), "q.vhdx")
	run(t, "qemu-img", "create", "-q", "-f", "vhdx", p, "8M")
	out, err := exec.Command("vhdiinfo", p).CombinedOutput()
	if err != nil {
		t.Fatalf("vhdiinfo: %v\n%s", err, out)
	}
	var want string
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "Identifier" {
			want = strings.TrimSpace(v)
		}
	}
	img, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if got := img.ID().String(); want == "" || got != want {
		t.Errorf("ID %s, vhdiinfo's identifier %q", got, want)
	}
}
