package parttable

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// sfdiskDisk writes a table with sfdisk into a sparse file of size bytes and
// returns the file's bytes up to the first MiB and the path.
func sfdiskDisk(t *testing.T, size int64, script string) []byte {
	t.Helper()
	sfdisk, err := exec.LookPath("sfdisk")
	if err != nil {
		t.Fatalf("sfdisk (package fdisk) is required: %v", err)
	}
	p := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sfdisk, "--no-reread", "--no-tell-kernel", "-q", p)
	cmd.Stdin = bytes.NewReader([]byte(script))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// layout is "index:startMiB-endMiB" per partition, "x" after an extended one.
func layout(tab *Table) string {
	var b strings.Builder
	for _, p := range tab.Parts {
		fmt.Fprintf(&b, "%d:%g-%g", p.Index, float64(p.Start)/(1<<20), float64(p.End)/(1<<20))
		if p.Extended {
			b.WriteString("x")
		}
		b.WriteString(" ")
	}
	return strings.TrimSpace(b.String())
}

func TestRead(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		name   string
		script string
		scheme string
		layout string
		end    int64
		tail   int64
	}{
		{"no table", "", "", "", 0, 0},
		{"mbr, two primaries", "label: dos\nstart=2048, size=10M, type=83\nstart=30M, size=5M, type=7\n", "mbr", "1:1-11 2:30-35", 35 * mib, 0},
		{"mbr, extended", "label: dos\nstart=2048, size=4M\ntype=5, start=8M, size=20M\nstart=9M, size=2M\n", "mbr", "1:1-5 2:8-28x 5:9-11", 28 * mib, 0},
		{"mbr, extended with two logicals", "label: dos\nstart=2048, size=4M\ntype=f, start=8M, size=40M\nstart=9M, size=10M\nstart=20M, size=5M, type=7\nstart=30M, size=4M\n",
			"mbr", "1:1-5 2:8-48x 5:9-19 6:20-25 7:30-34", 48 * mib, 0},
		{"gpt", "label: gpt\nstart=2048, size=8M\nstart=20M, size=12M\n", "gpt", "1:1-9 2:20-32", 32 * mib, 33 * 512},
		{"gpt, a gap in the entries", "label: gpt\n3: start=2048, size=8M\n1: start=20M, size=12M\n", "gpt", "1:20-32 3:1-9", 32 * mib, 33 * 512},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var disk []byte
			if c.script == "" {
				disk = make([]byte, 64*mib)
			} else {
				disk = sfdiskDisk(t, 64*mib, c.script)
			}
			tab, err := Read(bytes.NewReader(disk), int64(len(disk)), 512)
			if err != nil {
				t.Fatal(err)
			}
			if tab.Scheme != c.scheme || layout(tab) != c.layout || tab.Tail != c.tail || tab.FromBackup {
				t.Fatalf("got %q %q tail %d backup %v, want scheme %q, %q, tail %d", tab.Scheme, layout(tab), tab.Tail, tab.FromBackup, c.scheme, c.layout, c.tail)
			}
			if tab.End() != c.end {
				t.Fatalf("End() = %d, want %d", tab.End(), c.end)
			}
		})
	}
}

// TestGPTBackup damages the primary GPT (its header, then its entries) and reads
// the same table from the backup; with the backup damaged too, it is an error.
func TestGPTBackup(t *testing.T) {
	const size = 64 << 20
	good := sfdiskDisk(t, size, "label: gpt\nstart=2048, size=8M\nstart=20M, size=12M\n")
	for _, c := range []struct {
		name string
		off  int // a byte of the primary to flip
	}{
		{"bad primary header CRC", 512 + 40},
		{"bad primary entries CRC", 1024 + 32},
		{"no primary signature", 512},
	} {
		t.Run(c.name, func(t *testing.T) {
			disk := bytes.Clone(good)
			disk[c.off] ^= 1
			tab, err := Read(bytes.NewReader(disk), size, 512)
			if err != nil {
				t.Fatal(err)
			}
			if !tab.FromBackup || layout(tab) != "1:1-9 2:20-32" || tab.Tail != 33*512 {
				t.Fatalf("got %q backup %v tail %d", layout(tab), tab.FromBackup, tab.Tail)
			}
			disk[size-512+40] ^= 1 // the backup header too
			if _, err := Read(bytes.NewReader(disk), size, 512); !errors.Is(err, ErrBadTable) {
				t.Fatalf("both GPTs damaged: %v, want ErrBadTable", err)
			}
		})
	}
}

// putEntry writes an MBR/EBR entry (type, start and length in sectors) into sector
// s at slot i, and the signature.
func putEntry(s []byte, i int, typ byte, start, n uint32) {
	e := s[mbrEntries+i*mbrEntrySize:][:mbrEntrySize]
	e[4] = typ
	binary.LittleEndian.PutUint32(e[8:], start)
	binary.LittleEndian.PutUint32(e[12:], n)
	s[mbrSignature], s[mbrSignature+1] = 0x55, 0xAA
}

// TestEBRChain builds EBR chains by hand: a loop, a chain longer than the cap, and
// garbage in an EBR's unused entries.
func TestEBRChain(t *testing.T) {
	const sectors = 1 << 16 // 32 MiB
	disk := func() []byte {
		d := make([]byte, sectors*512)
		putEntry(d[:512], 0, 0x05, 2048, sectors-2048) // the extended partition
		return d
	}
	ebr := func(d []byte, lba int) []byte { return d[lba*512:][:512] }
	t.Run("loop", func(t *testing.T) {
		d := disk()
		putEntry(ebr(d, 2048), 0, 0x83, 1, 100)
		putEntry(ebr(d, 2048), 1, 0x05, 1000, 200) // to 3048
		putEntry(ebr(d, 3048), 0, 0x83, 1, 100)
		putEntry(ebr(d, 3048), 1, 0x05, 0, 1000) // back to the first EBR
		tab, err := Read(bytes.NewReader(d), int64(len(d)), 512)
		if err != nil {
			t.Fatal(err)
		}
		if got := len(tab.Parts); got != 3 || tab.Parts[1].Index != 5 || tab.Parts[2].Index != 6 || tab.Parts[2].Start != 3049*512 {
			t.Fatalf("got %q", layout(tab))
		}
	})
	t.Run("self link", func(t *testing.T) {
		d := disk()
		putEntry(ebr(d, 2048), 1, 0x05, 0, 100)
		tab, err := Read(bytes.NewReader(d), int64(len(d)), 512)
		if err != nil || len(tab.Parts) != 1 {
			t.Fatalf("got %v, %v", tab, err)
		}
	})
	t.Run("longer than the cap", func(t *testing.T) {
		d := disk()
		for i := 0; i < 400; i++ {
			lba := 2048 + i*8
			putEntry(ebr(d, lba), 0, 0x83, 1, 4)
			putEntry(ebr(d, lba), 1, 0x05, uint32((i+1)*8), 8)
		}
		tab, err := Read(bytes.NewReader(d), int64(len(d)), 512)
		if err != nil {
			t.Fatal(err)
		}
		last := tab.Parts[len(tab.Parts)-1]
		if last.Index != maxIndex || len(tab.Parts) != 1+maxIndex-4 {
			t.Fatalf("%d partitions, the last p%d", len(tab.Parts), last.Index)
		}
	})
	t.Run("garbage in the fourth entry", func(t *testing.T) {
		d := disk()
		putEntry(ebr(d, 2048), 0, 0x83, 1, 100)
		putEntry(ebr(d, 2048), 3, 0x83, 1, sectors) // past the extended partition
		tab, err := Read(bytes.NewReader(d), int64(len(d)), 512)
		if err != nil || layout(tab) != fmt.Sprintf("1:1-%gx 5:%g-%g", float64(sectors*512)/(1<<20), 2049.0*512/(1<<20), 2149.0*512/(1<<20)) {
			t.Fatalf("got %q, %v", layout(tab), err)
		}
	})
	t.Run("link past the disk", func(t *testing.T) {
		d := disk()
		putEntry(ebr(d, 2048), 0, 0x83, 1, 100)
		putEntry(ebr(d, 2048), 1, 0x05, 1<<31, 100)
		tab, err := Read(bytes.NewReader(d), int64(len(d)), 512)
		if err != nil || len(tab.Parts) != 2 {
			t.Fatalf("got %q, %v", layout(tab), err)
		}
	})
}

func TestDevices(t *testing.T) {
	tab := &Table{Parts: []Partition{
		{Index: 1, Start: 512, End: 1024},
		{Index: 2, Start: 1024, End: 8192, Extended: true},
		{Index: 5, Start: 2048, End: 9000},  // runs past the end: cut
		{Index: 6, Start: 8192, End: 10000}, // starts at the end: dropped
		{Index: 300, Start: 512, End: 1024}, // Linux numbers none past 255
	}}
	got := (&Table{Parts: tab.Devices(8192)}).Parts
	if len(got) != 2 || got[0].Index != 1 || got[1].Index != 5 || got[1].End != 8192 {
		t.Fatalf("got %+v", got)
	}
}

func FuzzRead(f *testing.F) {
	for _, s := range []string{
		"label: dos\nstart=2048, size=1M, type=83\n",
		"label: gpt\nstart=2048, size=1M\n",
		"label: dos\nstart=2, size=10\ntype=5, start=16, size=100\nstart=18, size=20\nstart=50, size=20\n", // EBRs inside the 64 KiB
		"label: gpt\n2: start=2048, size=1M\n4: start=4096, size=1M\n",
	} {
		f.Add(seed(f, s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		tab, err := Read(bytes.NewReader(b), int64(len(b)), 512)
		if err == nil && tab == nil {
			t.Fatal("nil table without an error")
		}
	})
}

// seed is the first 64 KiB of a 4 MiB disk sfdisk partitioned with script.
func seed(f *testing.F, script string) []byte {
	f.Helper()
	p := filepath.Join(f.TempDir(), "seed.raw")
	if err := os.WriteFile(p, make([]byte, 4<<20), 0o644); err != nil {
		f.Fatal(err)
	}
	cmd := exec.Command("sfdisk", "--no-reread", "--no-tell-kernel", "-q", p)
	cmd.Stdin = bytes.NewReader([]byte(script))
	if out, err := cmd.CombinedOutput(); err != nil {
		f.Fatalf("sfdisk: %v\n%s", err, out)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		f.Fatal(err)
	}
	return b[:64<<10]
}
