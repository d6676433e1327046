package parttable

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
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

func TestRead(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		name   string
		script string
		scheme string
		ends   []int64
		tail   int64
	}{
		{"no table", "", "", nil, 0},
		{"mbr, two primaries", "label: dos\nstart=2048, size=10M, type=83\nstart=30M, size=5M, type=7\n", "mbr", []int64{11 * mib, 35 * mib}, 0},
		{"mbr, extended", "label: dos\nstart=2048, size=4M\ntype=5, start=8M, size=20M\nstart=9M, size=2M\n", "mbr", []int64{5 * mib, 28 * mib}, 0},
		{"gpt", "label: gpt\nstart=2048, size=8M\nstart=20M, size=12M\n", "gpt", []int64{9 * mib, 32 * mib}, 33 * 512},
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
			if tab.Scheme != c.scheme || len(tab.Parts) != len(c.ends) || tab.Tail != c.tail {
				t.Fatalf("got %+v, want scheme %q with %d partitions and tail %d", tab, c.scheme, len(c.ends), c.tail)
			}
			for i, p := range tab.Parts {
				if p.End != c.ends[i] {
					t.Fatalf("partition %d ends at %d, want %d", i+1, p.End, c.ends[i])
				}
			}
			if len(c.ends) > 0 && tab.End() != c.ends[len(c.ends)-1] {
				t.Fatalf("End() = %d", tab.End())
			}
			if c.scheme == "gpt" {
				disk[512+40] ^= 1 // the first usable sector: the header CRC catches it
				if _, err := Read(bytes.NewReader(disk), int64(len(disk)), 512); !errors.Is(err, ErrBadTable) {
					t.Fatalf("damaged GPT header: %v, want ErrBadTable", err)
				}
			}
		})
	}
}

func FuzzRead(f *testing.F) {
	for _, s := range []string{
		"label: dos\nstart=2048, size=1M, type=83\n",
		"label: gpt\nstart=2048, size=1M\n",
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
