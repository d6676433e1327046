package vhd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Layout of the dynamic image malformedBase makes (4 KiB blocks, data 4 KiB-aligned):
// footer copy 0, header 512, BAT 1536 (16 entries, one sector), block 0 bitmap at
// 3584 (BAT entry 7), block 2 bitmap at 11776 (BAT entry 23), footer at 16384.
const (
	mbSize       = 64 * kib
	mbBlock0     = 3584
	mbBlock2     = 11776
	mbFileSize   = 16384 + FooterSize
	mbLocatorOff = 2048 // first locator of the differencing image, after its BAT
)

// malformedBase creates a fixed, dynamic or differencing image of mbSize bytes with
// data in blocks 0 and 2 (dynamic: of the image itself; differencing: of the child).
func malformedBase(t *testing.T, dir string, typ DiskType) string {
	t.Helper()
	var path string
	switch typ {
	case TypeFixed:
		path = createImage(t, dir, "fixed.vhd", CreateOptions{Type: TypeFixed, Size: mbSize, ExactSize: true})
	case TypeDynamic:
		path = createImage(t, dir, "dyn.vhd", CreateOptions{Type: TypeDynamic, Size: mbSize, ExactSize: true, BlockSize: 4 * kib})
	case TypeDifferencing:
		parent := createImage(t, dir, "parent.vhd", CreateOptions{Type: TypeDynamic, Size: mbSize, ExactSize: true, BlockSize: 4 * kib})
		path = createDiff(t, dir, "diff.vhd", parent, 0)
	}
	img := openImage(t, path, true)
	for _, off := range []int64{0, 8 * kib} {
		if _, err := img.WriteAt(bytes.Repeat([]byte{0x5a}, 4*kib), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestOpenMalformed(t *testing.T) {
	flip := func(off int64) func(t *testing.T, p string) {
		return func(t *testing.T, p string) {
			b := readFile(t, p)
			if off < 0 {
				off += int64(len(b))
			}
			patchAt(t, p, off, []byte{b[off] ^ 0x40})
		}
	}
	footer := func(edit func(*Footer)) func(t *testing.T, p string) {
		return func(t *testing.T, p string) { editFooter(t, p, edit) }
	}
	header := func(edit func(*Header)) func(t *testing.T, p string) {
		return func(t *testing.T, p string) { editHeader(t, p, edit) }
	}
	bat := func(i int, e uint32) func(t *testing.T, p string) {
		return func(t *testing.T, p string) { setBAT(t, p, i, e) }
	}
	loc := func(i int, edit func(*Locator)) func(t *testing.T, p string) {
		return header(func(h *Header) { edit(&h.ParentLocators[i]) })
	}
	tests := []struct {
		name   string
		typ    DiskType
		damage func(t *testing.T, path string)
		want   error
	}{
		{"empty file", TypeFixed, func(t *testing.T, p string) { writeFile(t, p, nil) }, ErrTruncated},
		{"shorter than a footer", TypeFixed, func(t *testing.T, p string) { writeFile(t, p, make([]byte, 100)) }, ErrTruncated},
		{"raw zeros", TypeFixed, func(t *testing.T, p string) { writeFile(t, p, make([]byte, 64*kib)) }, ErrNotVHD},
		{"bad cookie", TypeFixed, footer(func(f *Footer) { f.Cookie[0] = 'C' }), ErrNotVHD},
		{"footer checksum", TypeFixed, flip(-FooterSize + 200), ErrChecksum},
		{"both footers' checksums", TypeDynamic, func(t *testing.T, p string) { flip(-FooterSize+200)(t, p); flip(200)(t, p) }, ErrChecksum},
		{"disk type 5", TypeFixed, footer(func(f *Footer) { f.DiskType = 5 }), ErrUnsupported},
		{"format version 2", TypeDynamic, footer(func(f *Footer) { f.FormatVersion = 0x00020000 }), ErrUnsupported},
		{"current size zero", TypeFixed, footer(func(f *Footer) { f.CurrentSize = 0 }), ErrCorrupt},
		{"current size not a multiple of 512", TypeDynamic, footer(func(f *Footer) { f.CurrentSize = mbSize - 1 }), ErrCorrupt},
		{"dynamic larger than a BAT can address", TypeDynamic, footer(func(f *Footer) { f.CurrentSize = maxDynamicSize + SectorSize }), ErrCorrupt},
		{"fixed data cut short", TypeFixed, func(t *testing.T, p string) {
			b := readFile(t, p)
			writeFile(t, p, append(b[:mbSize/2], b[len(b)-FooterSize:]...))
		}, ErrTruncated},
		{"fixed size with the top bit set", TypeFixed, footer(func(f *Footer) { f.CurrentSize = 1 << 63 }), ErrTruncated},
		{"data offset all ones", TypeDynamic, footer(func(f *Footer) { f.DataOffset = ^uint64(0) }), ErrCorrupt},
		{"data offset not sector-aligned", TypeDynamic, footer(func(f *Footer) { f.DataOffset = 600 }), ErrCorrupt},
		{"data offset inside the footer copy", TypeDynamic, footer(func(f *Footer) { f.DataOffset = 0 }), ErrCorrupt},
		{"header past the end", TypeDynamic, footer(func(f *Footer) { f.DataOffset = mbFileSize - FooterSize }), ErrTruncated},
		{"header with the top bit set", TypeDynamic, footer(func(f *Footer) { f.DataOffset = 1 << 63 }), ErrTruncated},
		{"header checksum", TypeDynamic, flip(FooterSize + 800), ErrChecksum},
		{"header cookie", TypeDynamic, header(func(h *Header) { h.Cookie[7] = 'f' }), ErrCorrupt},
		{"header version 2", TypeDynamic, header(func(h *Header) { h.HeaderVersion = 0x00020000 }), ErrUnsupported},
		{"block size not a power of two", TypeDynamic, header(func(h *Header) { h.BlockSize = 3000 }), ErrCorrupt},
		{"block size below a sector", TypeDynamic, header(func(h *Header) { h.BlockSize = 256 }), ErrCorrupt},
		{"block size zero", TypeDynamic, header(func(h *Header) { h.BlockSize = 0 }), ErrCorrupt},
		{"table too small for the size", TypeDynamic, header(func(h *Header) { h.MaxTableEntries = 15 }), ErrCorrupt},
		{"BAT past the end of the file", TypeDynamic, header(func(h *Header) { h.TableOffset = mbFileSize }), ErrTruncated},
		{"BAT runs past the footer", TypeDynamic, header(func(h *Header) { h.MaxTableEntries = 1 << 20 }), ErrTruncated},
		{"BAT offset with the top bit set", TypeDynamic, header(func(h *Header) { h.TableOffset = 1 << 63; h.MaxTableEntries = 1 << 30 }), ErrTruncated},
		{"BAT not sector-aligned", TypeDynamic, header(func(h *Header) { h.TableOffset = 1600 }), ErrCorrupt},
		{"BAT overlapping the header", TypeDynamic, header(func(h *Header) { h.TableOffset = 1024 }), ErrCorrupt},
		{"BAT overlapping the footer copy", TypeDynamic, header(func(h *Header) { h.TableOffset = 0 }), ErrCorrupt},
		{"BAT entry past the end", TypeDynamic, bat(5, 1<<20), ErrCorrupt},
		{"BAT entry whose block runs into the footer", TypeDynamic, bat(5, (mbFileSize-FooterSize-4*kib)/SectorSize), ErrCorrupt},
		{"BAT entry inside the header", TypeDynamic, bat(5, 2), ErrCorrupt},
		{"BAT entry on the BAT", TypeDynamic, bat(5, 3), ErrCorrupt},
		{"BAT entries overlap", TypeDynamic, bat(5, mbBlock0/SectorSize+1), ErrCorrupt},
		{"BAT entries identical", TypeDynamic, bat(5, mbBlock2/SectorSize), ErrCorrupt},
		{"BAT entry on locator data", TypeDifferencing, bat(5, mbLocatorOff/SectorSize), ErrCorrupt},
		{"zero parent unique ID", TypeDifferencing, header(func(h *Header) { h.ParentUniqueID = UUID{} }), ErrCorrupt},
		{"unknown locator platform code", TypeDifferencing, loc(3, func(l *Locator) { l.PlatformCode = 0x41424344 }), ErrCorrupt},
		{"locator data outside the file", TypeDifferencing, loc(0, func(l *Locator) { l.PlatformDataOffset = 1 << 30 }), ErrCorrupt},
		{"locator offset with the top bit set", TypeDifferencing, loc(0, func(l *Locator) { l.PlatformDataOffset = 1 << 63 }), ErrCorrupt},
		{"locator data inside the footer copy", TypeDifferencing, loc(1, func(l *Locator) { l.PlatformDataOffset = 100 }), ErrCorrupt},
		{"locator data overlapping the header", TypeDifferencing, loc(1, func(l *Locator) { l.PlatformDataOffset = 1000 }), ErrCorrupt},
		{"locator data overlapping the BAT", TypeDifferencing, loc(1, func(l *Locator) { l.PlatformDataOffset = 1536 }), ErrCorrupt},
		{"locator data longer than 64 KiB", TypeDifferencing, loc(0, func(l *Locator) { l.PlatformDataLength = 64*kib + 2 }), ErrCorrupt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := malformedBase(t, dir, tc.typ)
			tc.damage(t, path)
			before := readFile(t, path)
			for _, writable := range []bool{false, true} {
				img, err := Open(path, writable)
				if err == nil {
					img.Close()
					t.Fatalf("Open(writable=%v) succeeded on a broken image", writable)
				}
				if !errors.Is(err, tc.want) {
					t.Fatalf("Open(writable=%v): %v; want %v", writable, err, tc.want)
				}
				if !strings.Contains(err.Error(), path) {
					t.Errorf("error %q does not name the file", err)
				}
			}
			if !bytes.Equal(readFile(t, path), before) {
				t.Errorf("Open wrote to a broken image")
			}
		})
	}
}

func TestShortFooter(t *testing.T) {
	for _, typ := range []DiskType{TypeFixed, TypeDynamic, TypeDifferencing} {
		t.Run(typ.String(), func(t *testing.T) {
			dir := t.TempDir()
			path := malformedBase(t, dir, typ)
			orig := openImage(t, path, false)
			want := view(t, orig, nil)
			orig.Close()
			// Images before Virtual PC 2004 end in 511 bytes: the footer without its last
			// (reserved, zero) byte.
			b := readFile(t, path)
			if b[len(b)-1] != 0 {
				t.Fatal("the footer's last byte is not zero")
			}
			writeFile(t, path, b[:len(b)-1])

			img := openImage(t, path, false)
			if st, err := img.FooterState(); st != FooterShort || err != nil {
				t.Fatalf("FooterState = %v, %v; want FooterShort", st, err)
			}
			if got := view(t, img, nil); !bytes.Equal(got, want) {
				t.Fatalf("data differs at %d", firstDiff(got, want))
			}
			ps := img.Check()
			if len(problems(ps, Warning)) > 0 || !strings.Contains(problemText(ps), "footer is 511 bytes long") {
				t.Errorf("Check: %v; want only a note on the 511-byte footer", ps)
			}
			if typ == TypeFixed {
				return
			}
			// A write that allocates moves the footer to a whole sector at the new end.
			img.Close()
			img = openImage(t, path, true)
			if _, err := img.WriteAt(bytes.Repeat([]byte{1}, SectorSize), 4*kib); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			copy(want[4*kib:], bytes.Repeat([]byte{1}, SectorSize))
			img = openImage(t, path, false)
			if st, _ := img.FooterState(); st != FooterAtEnd {
				t.Fatalf("after an allocation FooterState = %v, want FooterAtEnd", st)
			}
			if got := view(t, img, nil); !bytes.Equal(got, want) {
				t.Fatalf("data after the write differs at %d", firstDiff(got, want))
			}
			if ps := problems(img.Check(), Error); len(ps) > 0 {
				t.Errorf("Check: %v", ps)
			}
		})
	}
}

func problemText(ps []Problem) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return strings.Join(s, "\n")
}

func TestFooterCopyOnlyAndRepair(t *testing.T) {
	tests := []struct {
		name   string
		damage func(t *testing.T, path string, size int64)
	}{
		{"footer at the end damaged", func(t *testing.T, p string, size int64) {
			patchAt(t, p, size-FooterSize+300, []byte{0xff})
		}},
		{"footer at the end zeroed", func(t *testing.T, p string, size int64) {
			patchAt(t, p, size-FooterSize, make([]byte, FooterSize))
		}},
		{"torn tail after a crash: half a block and no footer", func(t *testing.T, p string, size int64) {
			patchAt(t, p, size-FooterSize, bytes.Repeat([]byte{0xc7}, 6000))
		}},
		{"file cut inside the footer", func(t *testing.T, p string, size int64) {
			if err := os.Truncate(p, size-100); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, typ := range []DiskType{TypeDynamic, TypeDifferencing} {
		for _, tc := range tests {
			t.Run(tc.name+"/"+typ.String(), func(t *testing.T) {
				dir := t.TempDir()
				path := malformedBase(t, dir, typ)
				size := fileSize(t, path)
				orig := openImage(t, path, false)
				want := view(t, orig, nil)
				orig.Close()
				tc.damage(t, path, size)

				img := openImage(t, path, false)
				st, why := img.FooterState()
				if st != FooterCopyOnly || why == nil {
					t.Fatalf("FooterState = %v, %v; want FooterCopyOnly with a reason", st, why)
				}
				if got := view(t, img, nil); !bytes.Equal(got, want) {
					t.Fatalf("data read through the footer copy differs at %d", firstDiff(got, want))
				}
				if len(problems(img.Check(), Error)) == 0 {
					t.Errorf("Check reports no error for a damaged footer")
				}
				img.Close()
				if w, err := Open(path, true); !errors.Is(err, ErrReadOnly) {
					if err == nil {
						w.Close()
					}
					t.Fatalf("writable Open: %v, want ErrReadOnly", err)
				}

				wrote, err := RepairFooter(path)
				if err != nil || !wrote {
					t.Fatalf("RepairFooter = %v, %v; want true, nil", wrote, err)
				}
				if got := fileSize(t, path); got != size {
					t.Errorf("repaired file is %d bytes, want %d", got, size)
				}
				img = openImage(t, path, false)
				if st, _ := img.FooterState(); st != FooterAtEnd {
					t.Fatalf("after repair FooterState = %v", st)
				}
				if got := view(t, img, nil); !bytes.Equal(got, want) {
					t.Fatalf("data after repair differs at %d", firstDiff(got, want))
				}
				if ps := problems(img.Check(), Warning); len(ps) > 0 {
					t.Errorf("Check after repair: %v", ps)
				}
				img.Close()
				if wrote, err := RepairFooter(path); wrote || err != nil {
					t.Errorf("second RepairFooter = %v, %v; want false, nil", wrote, err)
				}
			})
		}
	}
}

// TestCheckFindings damages fields Open tolerates and expects Check to name them.
func TestCheckFindings(t *testing.T) {
	tests := []struct {
		name     string
		typ      DiskType
		damage   func(t *testing.T, path string)
		severity Severity
		want     string
	}{
		{"footer copy differs", TypeDynamic, func(t *testing.T, p string) {
			b := readFile(t, p)
			f := decodeFooter(t, b)
			f.Timestamp++
			patchAt(t, p, 0, f.Marshal())
		}, Error, "differs from the footer at the end"},
		{"saved state 2", TypeDynamic, func(t *testing.T, p string) { editFooter(t, p, func(f *Footer) { f.SavedState = 2 }) }, Error, "saved state"},
		{"saved state set", TypeFixed, func(t *testing.T, p string) { editFooter(t, p, func(f *Footer) { f.SavedState = 1 }) }, Warning, "saved state"},
		{"reserved feature bit clear", TypeDynamic, func(t *testing.T, p string) { editFooter(t, p, func(f *Footer) { f.Features = 0 }) }, Note, "lacks the bit 0x2"},
		{"zero unique ID", TypeFixed, func(t *testing.T, p string) { editFooter(t, p, func(f *Footer) { f.UniqueID = UUID{} }) }, Warning, "unique ID is zero"},
		{"BAT entry past the disk size", TypeDynamic, func(t *testing.T, p string) {
			editHeader(t, p, func(h *Header) { h.MaxTableEntries = 17 })
			setBAT(t, p, 16, mbBlock2/SectorSize)
			setBAT(t, p, 2, unallocated)
		}, Warning, "past the disk size"},
		{"no path locators", TypeDifferencing, func(t *testing.T, p string) {
			editHeader(t, p, func(h *Header) { h.ParentLocators = [8]Locator{} })
		}, Warning, "only the parent name"},
		{"locator longer than its space", TypeDifferencing, func(t *testing.T, p string) {
			editHeader(t, p, func(h *Header) { h.ParentLocators[1].PlatformDataSpace = 1 }) // one sector
			editHeader(t, p, func(h *Header) { h.ParentLocators[1].PlatformDataLength = 600 })
		}, Warning, "exceeds its data space"},
		// The rules of blktap's vhd-util check: notes where only blktap minds, warnings where the image is at odds with itself.
		{"footer reserved bytes set", TypeDynamic, func(t *testing.T, p string) { editFooter(t, p, func(f *Footer) { f.Reserved[5] = 1 }) }, Note, "unused bytes 85-511"},
		{"hidden byte 2", TypeFixed, func(t *testing.T, p string) { editFooter(t, p, func(f *Footer) { f.Reserved[0] = 2 }) }, Note, "unused bytes 85-511"},
		{"header reserved field set", TypeDynamic, func(t *testing.T, p string) { editHeader(t, p, func(h *Header) { h.Reserved1 = 7 }) }, Note, "dynamic header's unused fields are not zero"},
		{"creation time in the future", TypeFixed, func(t *testing.T, p string) {
			editFooter(t, p, func(f *Footer) { f.Timestamp = Timestamp(time.Now().Add(24 * time.Hour)) })
		}, Note, "creation time"},
		{"geometry marker", TypeFixed, func(t *testing.T, p string) { editFooter(t, p, func(f *Footer) { f.Geometry = MaxGeometry }) }, Note, "geometry too large"},
		{"locator space reaching into a block", TypeDifferencing, func(t *testing.T, p string) {
			editHeader(t, p, func(h *Header) { h.ParentLocators[1].PlatformDataSpace = 32 * kib })
		}, Warning, "lies inside the space of the header"},
		{"locator name differs from the parent name", TypeDifferencing, func(t *testing.T, p string) {
			editHeader(t, p, func(h *Header) {
				h.ParentUnicodeName = [512]byte{}
				copy(h.ParentUnicodeName[:], utf16BE("other.vhd"))
			})
		}, Warning, "header's parent name is"},
		{"dynamic data under a clear bitmap bit", TypeDynamic, func(t *testing.T, p string) {
			b := readFile(t, p)
			e := int64(binary.BigEndian.Uint32(b[FooterSize+HeaderSize:])) * SectorSize
			patchAt(t, p, e, []byte{0x7f}) // sector 0 of block 0 unwritten, its 0x5a data stays
		}, Warning, "has data in sectors its bitmap marks unwritten"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := malformedBase(t, t.TempDir(), tc.typ)
			tc.damage(t, path)
			img := openImage(t, path, false)
			ps := img.Check()
			found := false
			for _, p := range ps {
				if p.Severity == tc.severity && strings.Contains(p.Message, tc.want) {
					found = true
				}
				if p.File != path {
					t.Errorf("problem %v names %q, want %q", p, p.File, path)
				}
			}
			if !found {
				t.Errorf("Check = %v; want a %v containing %q", ps, tc.severity, tc.want)
			}
		})
	}
}

// TestOpenWritesNothing opens good images read-only and writable and closes them
// without writing: the files must not change.
func TestOpenWritesNothing(t *testing.T) {
	for _, typ := range []DiskType{TypeFixed, TypeDynamic, TypeDifferencing} {
		t.Run(typ.String(), func(t *testing.T) {
			path := malformedBase(t, t.TempDir(), typ)
			before := readFile(t, path)
			for _, w := range []bool{false, true} {
				img := openImage(t, path, w)
				_ = view(t, img, nil)
				_ = img.Check()
				if _, err := img.ParentLocations(); err != nil {
					t.Fatal(err)
				}
				if err := img.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(readFile(t, path), before) {
				t.Errorf("opening and closing changed the file")
			}
			if got := filepath.Base(path); !strings.HasSuffix(got, ".vhd") {
				t.Fatal(got)
			}
		})
	}
}

// One writer per image in a process (across processes, package imagelock and the
// end-to-end tests show qemu's rules).
func TestSecondWriterLocked(t *testing.T) {
	path := malformedBase(t, t.TempDir(), TypeDynamic)
	w := openImage(t, path, true)
	if img, err := Open(path, true); !errors.Is(err, ErrLocked) {
		if err == nil {
			img.Close()
		}
		t.Fatalf("second writable Open: %v, want ErrLocked", err)
	}
	openImage(t, path, false).Close() // the process's own readers
	w.Close()
	r1 := openImage(t, path, false)
	// A joint reopen (a merge writing into a layer its chain reads) is let through.
	j, err := r1.ReopenImage(true)
	if err != nil {
		t.Fatalf("joint Reopen: %v", err)
	}
	j.Close()
}

// TestCheckBounded: a finding that comes entry by entry is named for the first
// maxPerEntry entries and counted in one line for the rest.
func TestCheckBounded(t *testing.T) {
	p := createImage(t, t.TempDir(), "a.vhd", CreateOptions{Type: TypeDynamic, Size: 100 * 4 * kib, ExactSize: true, BlockSize: 4 * kib})
	img := openImage(t, p, true)
	if _, err := img.WriteAt(bytes.Repeat([]byte{1}, 100*4*kib), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	// 90 of the 100 allocated blocks now lie past the disk's size.
	editFooter(t, p, func(f *Footer) { f.CurrentSize, f.OriginalSize = 10*4*kib, 10*4*kib })
	img = openImage(t, p, false)
	defer img.Close()
	named, summary := 0, ""
	for _, pr := range img.Check() {
		switch {
		case strings.Contains(pr.Message, "is allocated but lies past the disk size"):
			named++
		case strings.Contains(pr.Message, "more BAT entries are allocated past the disk size"):
			summary = pr.Message
		}
	}
	if named != maxPerEntry {
		t.Errorf("%d entries named, want %d", named, maxPerEntry)
	}
	if want := fmt.Sprintf("%d more BAT entries are allocated past the disk size", 90-maxPerEntry); summary != want {
		t.Errorf("summary %q, want %q", summary, want)
	}
}
