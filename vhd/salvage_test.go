package vhd

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"os"
	"strings"
	"testing"
)

// salvageCase is a damaged image and the disk a salvage open must read from it.
type salvageCase struct {
	path   string
	want   []byte   // the disk as the model says: intact data, zeros where lost
	strict error    // what a strict open fails with
	notes  []string // a substring of each note, in order
	raw    bool     // no footer at all: only OpenSalvageRaw opens it
}

// truncatedDynamic writes five 512 KiB blocks of an 8-block dynamic image, then cuts
// the file halfway through the data of the fourth (block 3): blocks 0-2 and the
// first half of block 3 survive; the rest of 3 and all of block 4 are lost.
func truncatedDynamic(t *testing.T, dir string) salvageCase {
	t.Helper()
	const bs = 512 * kib
	p := createImage(t, dir, "trunc.vhd", CreateOptions{Type: TypeDynamic, Size: 8 * bs, ExactSize: true, BlockSize: bs})
	data := randBytes(newRand(t, 19), 5*bs)
	img := openImage(t, p, true)
	if _, err := img.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	e3 := int64(img.bat.get(3))*SectorSize + img.bitmapSize
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, e3+bs/2); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 8*bs)
	copy(want, data[:3*bs+bs/2])
	return salvageCase{path: p, want: want, strict: ErrCorrupt, notes: []string{
		"footer at the end is damaged", "using the copy at offset 0",
		"block 3 is cut by the end of the file", "disk bytes 1835008-2097151 read as zeros",
		"block 4 (disk bytes 2097152-2621439) lies past the end of the file",
	}}
}

// fixedImage is a 1 MiB fixed image of random bytes and those bytes.
func fixedImage(t *testing.T, dir, name string) (string, []byte) {
	t.Helper()
	p := createImage(t, dir, name, CreateOptions{Type: TypeFixed, Size: mib, ExactSize: true})
	data := randBytes(newRand(t, 4), mib)
	patchAt(t, p, 0, data)
	return p, data
}

func TestSalvageOpen(t *testing.T) {
	tests := []struct {
		name string
		make func(t *testing.T, dir string) salvageCase
	}{
		{"truncated dynamic: blocks past the end read as zeros", truncatedDynamic},
		{"fixed with a bad footer checksum", func(t *testing.T, dir string) salvageCase {
			p, data := fixedImage(t, dir, "sum.vhd")
			patchAt(t, p, mib+footerChecksumOff, []byte{0xde, 0xad})
			return salvageCase{path: p, want: data, strict: ErrChecksum, notes: []string{"fixed-image footer at 1048576 is damaged", "checksum", "the file less the footer"}}
		}},
		{"fixed with one bad cookie byte", func(t *testing.T, dir string) salvageCase {
			p, data := fixedImage(t, dir, "cookie.vhd")
			patchAt(t, p, mib+3, []byte{'X'})
			return salvageCase{path: p, want: data, strict: ErrNotVHD, notes: []string{"fixed-image footer at 1048576 is damaged", "the file less the footer"}}
		}},
		{"fixed with its footer cut off", func(t *testing.T, dir string) salvageCase {
			p, data := fixedImage(t, dir, "cut.vhd")
			if err := os.Truncate(p, mib); err != nil {
				t.Fatal(err)
			}
			return salvageCase{path: p, want: data, strict: ErrNotVHD, raw: true, notes: []string{"no VHD footer; read as fixed data, 1048576 bytes (the whole file)"}}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.make(t, t.TempDir())
			before := sha256.Sum256(readFile(t, c.path))
			if img, err := Open(c.path, false); !errors.Is(err, c.strict) {
				if err == nil {
					img.Close()
				}
				t.Fatalf("strict Open: %v, want %v", err, c.strict)
			}
			open := func() (*Image, error) { return OpenSalvage(c.path, false) }
			if c.raw {
				if _, err := OpenSalvage(c.path, false); !errors.Is(err, ErrNotVHD) {
					t.Fatalf("OpenSalvage of a file with no footer: %v, want ErrNotVHD", err)
				}
				open = func() (*Image, error) { return OpenSalvageRaw(c.path, false) }
			}
			img, err := open()
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if img.Size() != int64(len(c.want)) {
				t.Fatalf("size %d, want %d", img.Size(), len(c.want))
			}
			if got := readAll(t, img); !bytes.Equal(got, c.want) {
				t.Fatalf("salvaged disk differs from the model")
			}
			if _, err := img.WriteAt(make([]byte, SectorSize), 0); err == nil {
				t.Fatal("a salvage open wrote")
			}
			if f, _, _, ok := img.FileRun(0, SectorSize); ok || f != nil {
				t.Fatal("FileRun of a salvage open hands out the file")
			}
			notes := strings.Join(img.Notes(), "\n")
			t.Logf("notes:\n%s", notes)
			if n := strings.Count(notes, c.path); n != len(img.Notes()) {
				t.Errorf("%d notes, %d name the file", len(img.Notes()), n)
			}
			rest := notes
			for _, s := range c.notes {
				i := strings.Index(rest, s)
				if i < 0 {
					t.Fatalf("notes lack %q (in order)", s)
				}
				rest = rest[i+len(s):]
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			if sha256.Sum256(readFile(t, c.path)) != before {
				t.Fatal("the salvage open changed the file")
			}
		})
	}
}

func TestSalvageFooterCopyNote(t *testing.T) {
	p := createImage(t, t.TempDir(), "d.vhd", CreateOptions{Type: TypeDynamic, Size: 4 * mib, ExactSize: true})
	patchAt(t, p, fileSize(t, p)-FooterSize+footerChecksumOff, []byte{0xde, 0xad})
	img := openImage(t, p, false)
	if n := img.Notes(); len(n) != 1 || !strings.Contains(n[0], p+": footer at the end is damaged") || !strings.Contains(n[0], "copy at offset 0") {
		t.Fatalf("notes %q, want one about the footer copy", n)
	}
	sound := openImage(t, createImage(t, t.TempDir(), "s.vhd", CreateOptions{Type: TypeDynamic, Size: 4 * mib}), false)
	if n := sound.Notes(); len(n) != 0 {
		t.Fatalf("a sound image has notes %q", n)
	}
}

func TestSalvageRefusesWrites(t *testing.T) {
	p, _ := fixedImage(t, t.TempDir(), "f.vhd")
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := openFile(f, p, true, true); !errors.Is(err, ErrInvalidArg) {
		t.Fatalf("writable salvage open: %v, want ErrInvalidArg", err)
	}
}
