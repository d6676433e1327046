package vhd

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf16"

	"github.com/vhdfs/vhdfs/internal/fileio"
)

func utf16LE(s string) []byte {
	var b []byte
	for _, c := range utf16.Encode([]rune(s)) {
		b = binary.LittleEndian.AppendUint16(b, c)
	}
	return b
}

func utf16BE(s string) []byte {
	var b []byte
	for _, c := range utf16.Encode([]rune(s)) {
		b = binary.BigEndian.AppendUint16(b, c)
	}
	return b
}

// locSpec is one parent locator to place in an image: its data goes to the end of the
// file, in reserve bytes (default: data rounded up to a sector).
type locSpec struct {
	slot    int
	code    uint32
	data    []byte
	space   uint32 // the Platform Data Space field; default: the reserve in bytes
	reserve int64
}

// withLocators replaces the parent locators (and, unless name is nil, the parent
// name) of the differencing image at path, placing the data before the end footer.
func withLocators(t *testing.T, path string, name []byte, specs []locSpec) {
	t.Helper()
	b := readFile(t, path)
	foot := append([]byte(nil), b[len(b)-FooterSize:]...)
	body := b[:len(b)-FooterSize]
	var h Header
	if err := binary.Read(bytes.NewReader(b[FooterSize:FooterSize+HeaderSize]), binary.BigEndian, &h); err != nil {
		t.Fatal(err)
	}
	h.ParentLocators = [8]Locator{}
	for _, s := range specs {
		reserve := max(s.reserve, roundUp(int64(len(s.data)), SectorSize), SectorSize)
		space := s.space
		if space == 0 {
			space = uint32(reserve)
		}
		h.ParentLocators[s.slot] = Locator{PlatformCode: s.code, PlatformDataSpace: space, PlatformDataLength: uint32(len(s.data)), PlatformDataOffset: uint64(len(body))}
		chunk := make([]byte, reserve)
		copy(chunk, s.data)
		body = append(body, chunk...)
	}
	if name != nil {
		h.ParentUnicodeName = [512]byte{}
		copy(h.ParentUnicodeName[:], name)
	}
	copy(body[FooterSize:], h.Marshal())
	writeFile(t, path, append(body, foot...))
}

func TestCreatedLocators(t *testing.T) {
	tests := []struct {
		name        string
		parent      string // relative to the test directory
		child       string
		locatorPath string // relative; "" for child
		wantRel     string
	}{
		{"parent beside the child", "parent.vhd", "child.vhd", "", `.\parent.vhd`},
		{"parent in a subdirectory", "sub/parent.vhd", "child.vhd", "", `.\sub\parent.vhd`},
		{"parent in the directory above", "parent.vhd", "kids/child.vhd", "", `..\parent.vhd`},
		{"locators computed for another path", "parent.vhd", "tmp/child.vhd.new", "child.vhd", `.\parent.vhd`},
		{"non-ASCII name with a surrogate pair", "pärent-𝄞 x.vhd", "child.vhd", "", `.\pärent-𝄞 x.vhd`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			pp := filepath.Join(dir, tc.parent)
			cp := filepath.Join(dir, tc.child)
			for _, p := range []string{pp, cp} {
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := Create(pp, CreateOptions{Type: TypeDynamic, Size: mib}); err != nil {
				t.Fatal(err)
			}
			parent := openImage(t, pp, false)
			opts := CreateOptions{Type: TypeDifferencing, Parent: parent, ParentPath: pp}
			if tc.locatorPath != "" {
				opts.LocatorPath = filepath.Join(dir, tc.locatorPath)
			}
			if err := Create(cp, opts); err != nil {
				t.Fatal(err)
			}
			img := openImage(t, cp, false)
			macx := "file://" + strings.ReplaceAll(tc.wantRel, `\`, "/")
			got, err := img.ParentLocations()
			if err != nil {
				t.Fatal(err)
			}
			want := []ParentLocation{{"W2ru", tc.wantRel}, {"MacX", macx}, {"name", filepath.Base(pp)}}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("ParentLocations = %q, want %q", got, want)
			}

			// The bytes on disk: UTF-16LE without BOM or NUL, data space in bytes, and the
			// name in UTF-16BE, as Windows and libvhdi expect.
			h, _ := img.Header()
			raw := readFile(t, cp)
			batEnd := int64(h.TableOffset) + roundUp(int64(h.MaxTableEntries)*4, SectorSize)
			for slot, w := range []struct {
				code uint32
				data []byte
			}{{PlatformW2ru, utf16LE(tc.wantRel)}, {PlatformMacX, []byte(macx)}} {
				l := h.ParentLocators[slot]
				if l.PlatformCode != w.code || int(l.PlatformDataLength) != len(w.data) {
					t.Errorf("locator %d: code %s length %d; want %s, %d", slot, PlatformName(l.PlatformCode), l.PlatformDataLength, PlatformName(w.code), len(w.data))
				}
				if l.PlatformDataSpace%SectorSize != 0 || int64(l.PlatformDataSpace) < int64(len(w.data)) {
					t.Errorf("locator %d: data space %d is not a byte count that holds %d bytes", slot, l.PlatformDataSpace, len(w.data))
				}
				if l.PlatformDataOffset%SectorSize != 0 || int64(l.PlatformDataOffset) < batEnd {
					t.Errorf("locator %d at %d: not sector-aligned after the BAT (ends %d)", slot, l.PlatformDataOffset, batEnd)
				}
				if d := raw[l.PlatformDataOffset : l.PlatformDataOffset+uint64(l.PlatformDataLength)]; !bytes.Equal(d, w.data) {
					t.Errorf("locator %d data % x, want % x", slot, d, w.data)
				}
			}
			for _, l := range h.ParentLocators[2:] {
				if l != (Locator{}) {
					t.Errorf("unused locator entry %+v is not zero", l)
				}
			}
			name := raw[FooterSize+64 : FooterSize+64+512]
			wantName := utf16BE(filepath.Base(pp))
			if !bytes.Equal(name[:len(wantName)], wantName) || !fileio.AllZero(name[len(wantName):]) {
				t.Errorf("parent name field % x, want UTF-16BE % x then zeros", name[:len(wantName)+4], wantName)
			}
			if ps := problems(img.Check(), Warning); len(ps) > 0 {
				t.Errorf("Check: %v", ps)
			}
		})
	}
}

func TestParentLocationsDecode(t *testing.T) {
	winName := utf16BE(`C:\Users\sergi\Downloads\win8.vhd`)
	tests := []struct {
		name       string
		parentName []byte // nil keeps the name Create wrote
		specs      []locSpec
		want       []ParentLocation
	}{
		{
			name:       "Windows 10 layout: W2ku then W2ru, spaces in bytes",
			parentName: winName,
			specs: []locSpec{
				{slot: 0, code: PlatformW2ku, data: utf16LE(`C:\Users\sergi\Downloads\win8.vhd`), space: 4096, reserve: 4096},
				{slot: 1, code: PlatformW2ru, data: utf16LE(`.\win8.vhd`), space: 65536, reserve: 65536},
			},
			want: []ParentLocation{{"W2ru", `.\win8.vhd`}, {"W2ku", `C:\Users\sergi\Downloads\win8.vhd`}, {"name", `C:\Users\sergi\Downloads\win8.vhd`}},
		},
		{
			name:       "spaces in sectors, as the specification says",
			parentName: utf16BE("p.vhd"),
			specs: []locSpec{
				{slot: 6, code: PlatformW2ru, data: utf16LE(`.\p.vhd`), space: 1},
				{slot: 7, code: PlatformW2ku, data: utf16LE(`D:\vms\p.vhd`), space: 2, reserve: 1024},
			},
			want: []ParentLocation{{"W2ru", `.\p.vhd`}, {"W2ku", `D:\vms\p.vhd`}, {"name", "p.vhd"}},
		},
		{
			name:       "blktap: MacX, W2ku and W2ru all relative",
			parentName: utf16BE("p.vhd"),
			specs: []locSpec{
				{slot: 0, code: PlatformMacX, data: []byte("file://./p.vhd")},
				{slot: 1, code: PlatformW2ku, data: utf16LE(`.\p.vhd`)},
				{slot: 2, code: PlatformW2ru, data: utf16LE(`.\p.vhd`)},
			},
			want: []ParentLocation{{"W2ru", `.\p.vhd`}, {"W2ku", `.\p.vhd`}, {"MacX", "file://./p.vhd"}, {"name", "p.vhd"}},
		},
		{
			name:       "a repeated code: the first entry wins",
			parentName: utf16BE("p.vhd"),
			specs: []locSpec{
				{slot: 0, code: PlatformW2ru, data: utf16LE(`.\first.vhd`)},
				{slot: 1, code: PlatformW2ru, data: utf16LE(`.\second.vhd`)},
			},
			want: []ParentLocation{{"W2ru", `.\first.vhd`}, {"name", "p.vhd"}},
		},
		{
			name:       "data ending in NUL stops there",
			parentName: utf16BE("p.vhd"),
			specs:      []locSpec{{slot: 0, code: PlatformW2ru, data: append(utf16LE(`.\p.vhd`), 0, 0, 'x', 0)}},
			want:       []ParentLocation{{"W2ru", `.\p.vhd`}, {"name", "p.vhd"}},
		},
		{
			name:       "an unpaired surrogate becomes U+FFFD",
			parentName: utf16BE("p.vhd"),
			specs:      []locSpec{{slot: 0, code: PlatformW2ru, data: append(utf16LE(`.\a`), 0x00, 0xd8, 'b', 0)}},
			want:       []ParentLocation{{"W2ru", ".\\a\uFFFDb"}, {"name", "p.vhd"}},
		},
		{
			name:       "deprecated and Mac alias codes are ignored",
			parentName: utf16BE("p.vhd"),
			specs: []locSpec{
				{slot: 0, code: PlatformWi2r, data: []byte(`.\x.vhd`)},
				{slot: 1, code: PlatformWi2k, data: []byte(`C:\x.vhd`)},
				{slot: 2, code: PlatformMac, data: []byte{1, 2, 3, 4}},
			},
			want: []ParentLocation{{"name", "p.vhd"}},
		},
		{
			name:       "MacX that is not UTF-8 is ignored",
			parentName: utf16BE("p.vhd"),
			specs:      []locSpec{{slot: 0, code: PlatformMacX, data: []byte{'f', 0xff, 0xfe}}},
			want:       []ParentLocation{{"name", "p.vhd"}},
		},
		{
			name:       "a locator with no data is skipped",
			parentName: utf16BE("p.vhd"),
			specs:      []locSpec{{slot: 0, code: PlatformW2ru, data: nil}, {slot: 1, code: PlatformW2ku, data: utf16LE(`C:\p.vhd`)}},
			want:       []ParentLocation{{"W2ku", `C:\p.vhd`}, {"name", "p.vhd"}},
		},
		{
			name:       "no locators and no name",
			parentName: []byte{},
			want:       nil,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			pp := createImage(t, dir, "p.vhd", CreateOptions{Type: TypeDynamic, Size: mib})
			cp := createDiff(t, dir, "c.vhd", pp, 0)
			name := tc.parentName
			if len(name) == 0 && name != nil {
				name = make([]byte, 512)
			}
			withLocators(t, cp, name, tc.specs)
			img := openImage(t, cp, false)
			got, err := img.ParentLocations()
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("ParentLocations = %q, want %q", got, tc.want)
			}
			if ps := problems(img.Check(), Error); len(ps) > 0 {
				t.Errorf("Check: %v", ps)
			}
		})
	}
}

// TestParentLocationsNotDifferencing: only a differencing image has a parent. A dynamic
// image's locator fields are not validated by Open, so reading them would trust
// lengths and offsets from the file (a 4 GiB allocation here).
func TestParentLocationsNotDifferencing(t *testing.T) {
	dir := t.TempDir()
	fixed := createImage(t, dir, "f.vhd", CreateOptions{Type: TypeFixed, Size: mib})
	dyn := createImage(t, dir, "d.vhd", CreateOptions{Type: TypeDynamic, Size: mib})
	editHeader(t, dyn, func(h *Header) {
		h.ParentLocators[0] = Locator{PlatformCode: PlatformW2ru, PlatformDataLength: 0xfffffff0, PlatformDataOffset: 1 << 40}
		copy(h.ParentUnicodeName[:], utf16BE("p.vhd"))
	})
	for _, p := range []string{fixed, dyn} {
		img := openImage(t, p, false)
		start := time.Now()
		locs, err := img.ParentLocations()
		if locs != nil || err != nil {
			t.Errorf("%s: ParentLocations = %q, %v; want nil, nil", filepath.Base(p), locs, err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("%s: ParentLocations took %v", filepath.Base(p), d)
		}
	}
}

func TestWindowsToSlash(t *testing.T) {
	tests := []struct{ in, want string }{
		{`.\p.vhd`, "./p.vhd"},
		{`..\a\p.vhd`, "../a/p.vhd"},
		{`C:\Users\x\p.vhd`, "/Users/x/p.vhd"},
		{`c:\p.vhd`, "/p.vhd"},
		{`C:p.vhd`, "p.vhd"},
		{`\\server\share\p.vhd`, "//server/share/p.vhd"},
		{`1:\p.vhd`, "1:/p.vhd"},
		{"p.vhd", "p.vhd"},
		{"", ""},
	}
	for _, tc := range tests {
		if got := WindowsToSlash(tc.in); got != tc.want {
			t.Errorf("WindowsToSlash(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestMacXToPath(t *testing.T) {
	tests := []struct{ in, want string }{
		{"file://./p.vhd", "p.vhd"},
		{"file:///var/vms/p.vhd", "/var/vms/p.vhd"},
		{"file://./my%20disk.vhd", "my disk.vhd"},
		{"./a/../p.vhd", "p.vhd"},
	}
	for _, tc := range tests {
		if got := MacXToPath(tc.in); got != tc.want {
			t.Errorf("MacXToPath(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestSpaceBytes(t *testing.T) {
	tests := []struct {
		space  uint32
		want   int64
		wantOK bool
	}{
		{0, 0, true},
		{1, 512, true},
		{8, 4096, true},
		{511, 511 * 512, true},
		{512, 512, true},
		{4096, 4096, true},
		{65536, 65536, true},
		{1000, 0, false},
	}
	for _, tc := range tests {
		got, ok := Locator{PlatformDataSpace: tc.space}.SpaceBytes()
		if got != tc.want || ok != tc.wantOK {
			t.Errorf("SpaceBytes(%d) = %d, %v; want %d, %v", tc.space, got, ok, tc.want, tc.wantOK)
		}
	}
}

func TestPlatformName(t *testing.T) {
	for code, want := range map[uint32]string{PlatformW2ru: "W2ru", PlatformW2ku: "W2ku", PlatformMacX: "MacX", PlatformMac: "Mac ", PlatformNone: "...."} {
		if got := PlatformName(code); got != want {
			t.Errorf("PlatformName(%#x) = %q, want %q", code, got, want)
		}
	}
}

func TestUTF16(t *testing.T) {
	for _, s := range []string{"", "p.vhd", `C:\Users\Ünïcødé\p.vhd`, "𝄞 music", "日本語.vhd"} {
		for _, order := range []binary.ByteOrder{binary.LittleEndian, binary.BigEndian} {
			b := encodeUTF16(s, order)
			want := utf16LE(s)
			if order == binary.BigEndian {
				want = utf16BE(s)
			}
			if !bytes.Equal(b, want) {
				t.Errorf("encodeUTF16(%q, %v) = % x, want % x", s, order, b, want)
			}
			if got := decodeUTF16(append(b, 0, 0, 0x41, 0), order); got != s {
				t.Errorf("decodeUTF16(encodeUTF16(%q)) = %q", s, got)
			}
		}
	}
	if got := decodeUTF16([]byte{0x41, 0, 0x42}, binary.LittleEndian); got != "A" {
		t.Errorf("an odd trailing byte: %q, want \"A\"", got)
	}
}
