package vhd

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// sumBytes is the specification's checksum, written out again so a bug in checksum
// cannot hide itself: ones' complement of the byte sum without the 4 checksum bytes.
func sumBytes(b []byte, skip int) uint32 {
	var s uint32
	for i, c := range b {
		if i < skip || i >= skip+4 {
			s += uint32(c)
		}
	}
	return ^s
}

// exactGeometry is the geometry Create writes for an exact size: the size's own when
// one describes it, else the 65535/16/255 marker.
func exactGeometry(size int64) Geometry {
	if g := CHS(size); g.Bytes() == size {
		return g
	}
	return MaxGeometry
}

func TestCreate(t *testing.T) {
	dir := t.TempDir()
	dynParent := createImage(t, dir, "parent-dyn.vhd", CreateOptions{Type: TypeDynamic, Size: 4 * mib, ExactSize: true, BlockSize: 64 * kib})
	fixedParent := createImage(t, dir, "parent-fixed.vhd", CreateOptions{Type: TypeFixed, Size: 3 * mib, ExactSize: true})

	tests := []struct {
		name       string
		opts       CreateOptions
		parentPath string
		wantSize   int64
		wantBlock  int64
		wantGeom   Geometry
	}{
		{name: "fixed, 40 MiB rounded up to CHS as qemu does", opts: CreateOptions{Type: TypeFixed, Size: 40 * mib},
			wantSize: 41953280, wantGeom: Geometry{964, 5, 17}},
		{name: "fixed, 40 MiB exact", opts: CreateOptions{Type: TypeFixed, Size: 40 * mib, ExactSize: true},
			wantSize: 40 * mib, wantGeom: MaxGeometry},
		{name: "dynamic, default block size", opts: CreateOptions{Type: TypeDynamic, Size: 10 * mib},
			wantSize: 10514432, wantBlock: 2 * mib, wantGeom: Geometry{302, 4, 17}},
		{name: "dynamic, 512-byte blocks", opts: CreateOptions{Type: TypeDynamic, Size: 1 * mib, ExactSize: true, BlockSize: 512},
			wantSize: 1 * mib, wantBlock: 512, wantGeom: exactGeometry(1 * mib)},
		{name: "dynamic, 4 KiB blocks", opts: CreateOptions{Type: TypeDynamic, Size: 3*mib + 512, ExactSize: true, BlockSize: 4 * kib},
			wantSize: 3*mib + 512, wantBlock: 4 * kib, wantGeom: exactGeometry(3*mib + 512)},
		{name: "dynamic, 64 KiB blocks", opts: CreateOptions{Type: TypeDynamic, Size: 5 * mib, ExactSize: true, BlockSize: 64 * kib},
			wantSize: 5 * mib, wantBlock: 64 * kib, wantGeom: exactGeometry(5 * mib)},
		{name: "dynamic, 2 MiB blocks", opts: CreateOptions{Type: TypeDynamic, Size: 5 * mib, ExactSize: true, BlockSize: 2 * mib},
			wantSize: 5 * mib, wantBlock: 2 * mib, wantGeom: exactGeometry(5 * mib)},
		{name: "dynamic, 8 MiB blocks, disk smaller than a block", opts: CreateOptions{Type: TypeDynamic, Size: 3 * mib, ExactSize: true, BlockSize: 8 * mib},
			wantSize: 3 * mib, wantBlock: 8 * mib, wantGeom: exactGeometry(3 * mib)},
		{name: "differencing takes its dynamic parent's size and block size", opts: CreateOptions{Type: TypeDifferencing, Size: 1, ExactSize: true},
			parentPath: dynParent, wantSize: 4 * mib, wantBlock: 64 * kib, wantGeom: exactGeometry(4 * mib)},
		{name: "differencing with its own block size", opts: CreateOptions{Type: TypeDifferencing, BlockSize: 4 * kib},
			parentPath: dynParent, wantSize: 4 * mib, wantBlock: 4 * kib, wantGeom: exactGeometry(4 * mib)},
		{name: "differencing of a fixed parent gets 2 MiB blocks", opts: CreateOptions{Type: TypeDifferencing},
			parentPath: fixedParent, wantSize: 3 * mib, wantBlock: 2 * mib, wantGeom: exactGeometry(3 * mib)},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			opts := tc.opts
			var parent *Image
			if tc.parentPath != "" {
				parent = openImage(t, tc.parentPath, false)
				opts.Parent, opts.ParentPath = parent, tc.parentPath
			}
			path := filepath.Join(dir, fmt.Sprintf("img%d.vhd", i))
			before := time.Now().Add(-2 * time.Second)
			if err := Create(path, opts); err != nil {
				t.Fatalf("Create: %v", err)
			}
			after := time.Now().Add(2 * time.Second)

			img := openImage(t, path, false)
			if got := img.Type(); got != opts.Type {
				t.Errorf("Type = %v, want %v", got, opts.Type)
			}
			if got := img.Size(); got != tc.wantSize {
				t.Errorf("Size = %d, want %d", got, tc.wantSize)
			}
			if got := img.BlockSize(); got != tc.wantBlock {
				t.Errorf("BlockSize = %d, want %d", got, tc.wantBlock)
			}
			if st, err := img.FooterState(); st != FooterAtEnd || err != nil {
				t.Errorf("FooterState = %v, %v; want FooterAtEnd, nil", st, err)
			}
			if got := img.AllocatedBytes(); opts.Type != TypeFixed && got != 0 {
				t.Errorf("AllocatedBytes = %d, want 0", got)
			}
			f := img.Footer()
			if string(f.Cookie[:]) != "conectix" {
				t.Errorf("footer cookie %q", f.Cookie)
			}
			if f.Features != 2 || f.FormatVersion != 0x00010000 || f.SavedState != 0 {
				t.Errorf("footer features %#x version %#x saved state %d; want 2, 0x00010000, 0", f.Features, f.FormatVersion, f.SavedState)
			}
			if f.CreatorApp != CreatorApp || f.CreatorHostOS != 0x5769326B {
				t.Errorf("footer creator %q host %#x", f.CreatorApp, f.CreatorHostOS)
			}
			if f.CurrentSize != uint64(tc.wantSize) || f.OriginalSize != uint64(tc.wantSize) {
				t.Errorf("footer sizes original %d current %d, want %d", f.OriginalSize, f.CurrentSize, tc.wantSize)
			}
			if f.Geometry != tc.wantGeom {
				t.Errorf("footer geometry %+v, want %+v", f.Geometry, tc.wantGeom)
			}
			if ts := Time(f.Timestamp); ts.Before(before) || ts.After(after) {
				t.Errorf("footer time stamp %v not between %v and %v", ts, before, after)
			}
			if f.UniqueID.IsZero() || f.UniqueID[6]>>4 != 4 {
				t.Errorf("footer unique ID %v is not a random UUID", f.UniqueID)
			}
			if parent != nil && f.UniqueID == parent.Footer().UniqueID {
				t.Errorf("child has its parent's unique ID")
			}

			raw := readFile(t, path)
			end := raw[len(raw)-FooterSize:]
			if got, want := binary.BigEndian.Uint32(end[64:]), sumBytes(end, 64); got != want {
				t.Errorf("footer checksum on disk %#x, want %#x", got, want)
			}
			wantFile := tc.wantSize + FooterSize
			h, ok := img.Header()
			if opts.Type == TypeFixed {
				if ok {
					t.Errorf("fixed image has a dynamic header")
				}
				if f.DataOffset != ^uint64(0) {
					t.Errorf("fixed footer data offset %#x, want all ones", f.DataOffset)
				}
			} else {
				if !ok {
					t.Fatalf("no dynamic header")
				}
				if f.DataOffset != FooterSize {
					t.Errorf("footer data offset %d, want 512", f.DataOffset)
				}
				if string(raw[:FooterSize]) != string(end) {
					t.Errorf("footer copy at 0 differs from the footer at the end")
				}
				hb := raw[FooterSize : FooterSize+HeaderSize]
				if got, want := binary.BigEndian.Uint32(hb[36:]), sumBytes(hb, 36); got != want {
					t.Errorf("header checksum on disk %#x, want %#x", got, want)
				}
				entries := (tc.wantSize + tc.wantBlock - 1) / tc.wantBlock
				if string(h.Cookie[:]) != "cxsparse" || h.DataOffset != ^uint64(0) || h.HeaderVersion != 0x00010000 {
					t.Errorf("header cookie %q data offset %#x version %#x", h.Cookie, h.DataOffset, h.HeaderVersion)
				}
				if h.TableOffset != FooterSize+HeaderSize || int64(h.MaxTableEntries) != entries || int64(h.BlockSize) != tc.wantBlock {
					t.Errorf("header table at %d, %d entries, block size %d; want 1536, %d, %d", h.TableOffset, h.MaxTableEntries, h.BlockSize, entries, tc.wantBlock)
				}
				batLen := roundUp(entries*4, SectorSize)
				for i, c := range raw[1536 : 1536+batLen] {
					if c != 0xff {
						t.Fatalf("BAT byte %d is %#x, want 0xff (unallocated, padding included)", i, c)
					}
				}
				wantFile = 1536 + batLen + FooterSize
				if opts.Type == TypeDifferencing {
					// The locators' spaces, then as much room again for a re-link.
					for _, l := range h.ParentLocators[:2] {
						wantFile += 2 * int64(l.PlatformDataSpace)
					}
				}
			}
			if got := int64(len(raw)); got != wantFile {
				t.Errorf("file is %d bytes, want %d", got, wantFile)
			}
			if opts.Type == TypeDifferencing {
				pf := parent.Footer()
				if h.ParentUniqueID != pf.UniqueID {
					t.Errorf("parent unique ID %v, want %v", h.ParentUniqueID, pf.UniqueID)
				}
				if h.ParentTimestamp != 0 {
					t.Errorf("parent time stamp %v, want 0 as Windows writes", Time(h.ParentTimestamp))
				}
				if got, want := h.ParentName(), filepath.Base(tc.parentPath); got != want {
					t.Errorf("parent name %q, want %q", got, want)
				}
			} else if !h.ParentUniqueID.IsZero() || h.ParentTimestamp != 0 || h.ParentName() != "" || h.ParentLocators != [8]Locator{} {
				t.Errorf("non-differencing image has parent fields set: %+v", h)
			}
			if ps := problems(img.Check(), Warning); len(ps) > 0 {
				t.Errorf("Check of a fresh image: %v", ps)
			}
		})
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	existing := createImage(t, dir, "existing.vhd", CreateOptions{Type: TypeDynamic, Size: mib})
	tests := []struct {
		name string
		path string
		opts CreateOptions
		want error
	}{
		{"zero size", "a.vhd", CreateOptions{Type: TypeDynamic}, ErrInvalidArg},
		{"negative size", "a.vhd", CreateOptions{Type: TypeFixed, Size: -512}, ErrInvalidArg},
		{"exact size not a multiple of 512", "a.vhd", CreateOptions{Type: TypeFixed, Size: 1000, ExactSize: true}, ErrInvalidArg},
		{"block size not a power of two", "a.vhd", CreateOptions{Type: TypeDynamic, Size: mib, BlockSize: 3000}, ErrInvalidArg},
		{"block size below a sector", "a.vhd", CreateOptions{Type: TypeDynamic, Size: mib, BlockSize: 256}, ErrInvalidArg},
		{"block size above the maximum", "a.vhd", CreateOptions{Type: TypeDynamic, Size: mib, BlockSize: 2 * MaxBlockSize}, ErrInvalidArg},
		{"dynamic larger than a BAT can address", "a.vhd", CreateOptions{Type: TypeDynamic, Size: 2041 << 30, ExactSize: true}, ErrInvalidArg},
		{"differencing without a parent", "a.vhd", CreateOptions{Type: TypeDifferencing}, ErrInvalidArg},
		{"unknown type", "a.vhd", CreateOptions{Type: 5, Size: mib}, ErrInvalidArg},
		{"file exists", "existing.vhd", CreateOptions{Type: TypeDynamic, Size: mib}, os.ErrExist},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := readFile(t, existing)
			err := Create(filepath.Join(dir, tc.path), tc.opts)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Create: %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.path) {
				t.Errorf("error %q does not name the file", err)
			}
			if _, err := os.Stat(filepath.Join(dir, "a.vhd")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("a failed Create left a file behind: %v", err)
			}
			if string(readFile(t, existing)) != string(before) {
				t.Errorf("a failed Create changed an existing file")
			}
		})
	}
}

func TestCHS(t *testing.T) {
	tests := []struct {
		name string
		size int64
		want Geometry
	}{
		{"40 MiB rounds down (Windows, VirtualBox)", 40 * mib, Geometry{963, 5, 17}},
		{"qemu's 40M", 41953280, Geometry{964, 5, 17}},
		{"10 MiB", 10 * mib, Geometry{301, 4, 17}},
		{"one sector", 512, Geometry{0, 4, 17}},
		{"1 GiB goes to 63 sectors per track", 1 << 30, Geometry{2080, 16, 63}},
		{"31 sectors per track", 200 * mib, Geometry{825, 16, 31}},
		{"largest 63-sector geometry switches to 255", 65535 * 16 * 63 * 512, Geometry{16191, 16, 255}},
		{"maximum", 65535 * 16 * 255 * 512, Geometry{65535, 16, 255}},
		{"beyond the maximum is capped", 2000 << 30, Geometry{65535, 16, 255}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g := CHS(tc.size)
			if g != tc.want {
				t.Fatalf("CHS(%d) = %+v, want %+v", tc.size, g, tc.want)
			}
			if g.Bytes() > tc.size {
				t.Errorf("CHS(%d) describes %d bytes, more than the size", tc.size, g.Bytes())
			}
		})
	}
	if got := CHS(40 * mib).Bytes(); got != 41909760 {
		t.Errorf("CHS(40 MiB).Bytes() = %d, want 41909760", got)
	}
}

func TestRoundUpCHS(t *testing.T) {
	tests := []struct {
		name       string
		size, want int64
	}{
		{"one byte", 1, 34816},
		{"a CHS size stays", 41953280, 41953280},
		{"one sector past a CHS size", 34816 + 512, 69632},
		{"40 MiB", 40 * mib, 41953280},
		{"beyond CHS stays, rounded to a sector", 200<<30 + 1, 200<<30 + 512},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := RoundUpCHS(tc.size)
			if got != tc.want {
				t.Fatalf("RoundUpCHS(%d) = %d, want %d", tc.size, got, tc.want)
			}
		})
	}
}

// TestRoundUpCHSMatchesQemu creates images with qemu-img create -f vpc and compares
// their virtual size with RoundUpCHS and with what Create makes of the same request.
// (Near the CHS maximum of 127 GiB qemu keeps the requested size; RoundUpCHS rounds up
// to the maximum geometry; those sizes are left out.)
func TestRoundUpCHSMatchesQemu(t *testing.T) {
	qemuImg := requireTool(t, "qemu-img")
	dir := t.TempDir()
	for _, size := range []string{"1", "512", "1000000", "10M", "33M", "40M", "100M", "1G", "3G", "100G"} {
		t.Run(size, func(t *testing.T) {
			q := filepath.Join(dir, "q"+size+".vhd")
			run(t, qemuImg, "create", "-q", "-f", "vpc", q, size)
			var info struct {
				VirtualSize int64 `json:"virtual-size"`
			}
			if err := json.Unmarshal(run(t, qemuImg, "info", "--output=json", q), &info); err != nil {
				t.Fatal(err)
			}
			req := parseQemuSize(t, size)
			if got := RoundUpCHS(req); got != info.VirtualSize {
				t.Errorf("RoundUpCHS(%d) = %d, qemu-img made %d", req, got, info.VirtualSize)
			}
			// qemu-img reads an image vhdfs made with the size vhdfs gave it.
			v := filepath.Join(dir, "v"+size+".vhd")
			if err := Create(v, CreateOptions{Type: TypeDynamic, Size: req}); err != nil {
				t.Fatal(err)
			}
			var vinfo struct {
				VirtualSize int64 `json:"virtual-size"`
			}
			if err := json.Unmarshal(run(t, qemuImg, "info", "-f", "vpc", "--output=json", v), &vinfo); err != nil {
				t.Fatal(err)
			}
			if vinfo.VirtualSize != info.VirtualSize {
				t.Errorf("qemu-img sees %d bytes in vhdfs's image, %d in its own", vinfo.VirtualSize, info.VirtualSize)
			}
			// And vhdfs opens qemu's image with its size.
			qi := openImage(t, q, false)
			if qi.Size() != info.VirtualSize {
				t.Errorf("vhdfs sees %d bytes in qemu's image, qemu %d", qi.Size(), info.VirtualSize)
			}
			if ps := problems(qi.Check(), Error); len(ps) > 0 {
				t.Errorf("Check of qemu's image: %v", ps)
			}
		})
	}
}

func parseQemuSize(t *testing.T, s string) int64 {
	t.Helper()
	shift := 0
	switch {
	case strings.HasSuffix(s, "M"):
		s, shift = strings.TrimSuffix(s, "M"), 20
	case strings.HasSuffix(s, "G"):
		s, shift = strings.TrimSuffix(s, "G"), 30
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n << shift
}
