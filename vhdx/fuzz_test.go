package vhdx

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// A VHDX file is at least 3 MiB (its regions are 1 MiB-aligned) and mostly zeros, so
// fuzz inputs and seeds are sparse encodings of files: a uint32 size in 4 KiB units,
// then records of a uint32 offset, a uint16 length and that many bytes. Seeds stay a
// few KiB, and the fuzzer mutates the bytes that matter.
const maxFuzzFile = 32 * MiB

// encodeSparse encodes f, leaving out runs of zeros.
func encodeSparse(f []byte) []byte {
	out := binary.LittleEndian.AppendUint32(nil, uint32((len(f)+logSector-1)/logSector))
	for off := 0; off < len(f); {
		if f[off] == 0 {
			off++
			continue
		}
		end := off
		zeros := 0
		for end < len(f) && end-off < 0xffff && zeros < 64 {
			if f[end] == 0 {
				zeros++
			} else {
				zeros = 0
			}
			end++
		}
		end -= zeros
		out = binary.LittleEndian.AppendUint32(out, uint32(off))
		out = binary.LittleEndian.AppendUint16(out, uint16(end-off))
		out = append(out, f[off:end]...)
		off = end
	}
	return out
}

// decodeSparse writes the file data encodes to path, sparse.
func decodeSparse(data []byte, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if len(data) < 4 {
		return nil
	}
	size := min(int64(binary.LittleEndian.Uint32(data))*logSector, maxFuzzFile)
	if err := f.Truncate(size); err != nil {
		return err
	}
	for data = data[4:]; len(data) >= 6; {
		off, n := int64(binary.LittleEndian.Uint32(data)), int(binary.LittleEndian.Uint16(data[4:]))
		data = data[6:]
		n = min(n, len(data))
		if w := min(int64(n), size-off); off < size && w > 0 {
			if _, err := f.WriteAt(data[:w], off); err != nil {
				return err
			}
		}
		data = data[n:]
	}
	return nil
}

// fixChecksums recomputes the checksums of both headers, both region tables and every
// log entry the current header's log holds, so that mutations reach the code behind
// the checksum checks.
func fixChecksums(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fix := func(off, n int64, at int) []byte {
		b := make([]byte, n)
		if _, err := f.ReadAt(b, off); err != nil {
			return nil
		}
		binary.LittleEndian.PutUint32(b[at:], checksum(b, at))
		f.WriteAt(b, off)
		return b
	}
	var logOff, logLen int64
	for _, off := range []int64{header1Off, header2Off} {
		if b := fix(off, headerSize, headerChecksumOff); b != nil && logLen == 0 {
			logOff, logLen = int64(binary.LittleEndian.Uint64(b[72:])), int64(binary.LittleEndian.Uint32(b[68:]))
		}
	}
	fix(regionTable1Off, regionTableSize, regionTableChecksumOff)
	fix(regionTable2Off, regionTableSize, regionTableChecksumOff)
	if logLen == 0 || logLen > 4*MiB || logOff > maxFuzzFile {
		return nil
	}
	for pos := int64(0); pos < logLen; pos += logSector {
		h := make([]byte, logEntryHeaderLen)
		if _, err := f.ReadAt(h, logOff+pos); err != nil || string(h[:4]) != "loge" {
			continue
		}
		if n := int64(binary.LittleEndian.Uint32(h[8:])); n > 0 && pos+n <= logLen && n%logSector == 0 {
			fix(logOff+pos, n, logEntryChecksumOff)
		}
	}
	return nil
}

// builderSeeds are small images of every kind the builder makes, with little data
// in their blocks so that their encodings stay a few KiB.
func builderSeeds(t testing.TB) map[string][]byte {
	seeds := map[string][]byte{}
	shrink := func(b *builder) *builder {
		for p, d := range b.data {
			b.data[p] = d[:512]
		}
		return b
	}
	b := newBuilder(4*MiB, MiB)
	b.states[1] = FullyPresent
	b.data[1] = fill(4096, 7)
	b.states[2] = Zero
	seeds["dynamic"] = b.build()
	// An entry at 2^63, which a signed offset once let through to reads.
	b = newBuilder(4*MiB, MiB)
	b.rawBAT[0] = 1<<63 | uint64(FullyPresent)
	seeds["offset-2^63"] = b.build()
	d, _ := differencingImage(512)
	seeds["differencing-512"] = shrink(d).build()
	d, _ = differencingImage(4096)
	seeds["differencing-4096"] = shrink(d).build()
	b = newBuilder(4*MiB, MiB)
	b.leaveAlloc = true
	for p := int64(0); p < 4; p++ {
		b.states[p] = FullyPresent
		b.data[p] = fill(512, byte(p+1))
	}
	seeds["fixed"] = b.build()
	f, _, lb := logImage(t)
	blk0 := lb.blockOffset(0)
	clear(f[blk0+512 : blk0+MiB])
	clear(f[len(f)-MiB+512:])
	seeds["log"] = f
	for name, p := range craftedLogSeeds(t) {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		clear(b[4*MiB+512 : 5*MiB]) // block 0
		seeds[name] = b
	}
	for name, s := range seeds {
		if n := len(encodeSparse(s)); n > 64*KiB {
			t.Fatalf("seed %s encodes to %d bytes; keep seeds small", name, n)
		}
	}
	return seeds
}

var updateSeeds = flag.Bool("update-seeds", false, "rewrite testdata/*.sparse from qemu-img-made images")

// TestSeeds checks the seed files in testdata, and with -update-seeds makes them
// anew with qemu-img and qemu-io, and with Create and WriteAt (writeCreatedSeeds):
// tiny images (8 MiB, 1 MiB blocks) with a few writes.
func TestSeeds(t *testing.T) {
	if *updateSeeds {
		needTool(t, "qemu-img")
		dir := t.TempDir()
		for name, opts := range map[string]string{
			"qemu-dynamic":        "subformat=dynamic,block_size=1M",
			"qemu-dynamic-nozero": "subformat=dynamic,block_size=1M,block_state_zero=off",
			"qemu-fixed":          "subformat=fixed,block_size=1M",
			"qemu-dynamic-log-2m": "subformat=dynamic,block_size=2M,log_size=2M",
		} {
			p := filepath.Join(dir, name)
			run(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", opts, p, "8M")
			run(t, "qemu-io", "-f", "vhdx", "-c", "write -P 0x5a 4096 4096", "-c", "write -P 0xa5 3M 512", p)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join("testdata", name+".sparse"), encodeSparse(b), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		writeCreatedSeeds(t, dir)
	}
	seeds := readSeedFiles(t)
	if len(seeds) == 0 {
		t.Fatal("no seeds in testdata")
	}
	for name, s := range seeds {
		if len(s) > 64*KiB {
			t.Errorf("seed %s is %d bytes; keep seeds small", name, len(s))
		}
		p := filepath.Join(t.TempDir(), "x.vhdx")
		if err := decodeSparse(s, p); err != nil {
			t.Fatal(err)
		}
		img, err := Open(p, false)
		if err != nil {
			t.Fatalf("seed %s: %v", name, err)
		}
		got := make([]byte, 4096)
		if _, err := img.ReadAt(got, 4096); err != nil || !bytes.Equal(got, fill(4096, 0x5a)) {
			t.Errorf("seed %s: the data qemu-io wrote reads wrong (%v)", name, err)
		}
		img.Close()
	}
}

func readSeedFiles(t testing.TB) map[string][]byte {
	seeds := map[string][]byte{}
	names, _ := filepath.Glob(filepath.Join("testdata", "*.sparse"))
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			t.Fatal(err)
		}
		seeds[strings.TrimSuffix(filepath.Base(n), ".sparse")] = b
	}
	return seeds
}

// maxFuzzRead bounds how much of an opened image the fuzz body reads.
const maxFuzzRead = 1 * MiB

// FuzzOpen opens arbitrary files. Open must fail with an error naming the file and
// wrapping a sentinel, changing nothing, or return an image whose ReadAt and Run
// work without panicking or contradicting themselves; a read-only open must not
// change a byte; a writable open must succeed exactly when a read-only one does and
// show the same view, and afterwards the log must be empty and the view the same.
func FuzzOpen(f *testing.F) {
	for _, b := range builderSeeds(f) {
		f.Add(encodeSparse(b), false)
	}
	for _, b := range readSeedFiles(f) {
		f.Add(b, false)
		f.Add(b, true)
	}
	dir := f.TempDir()
	var seq atomic.Int64
	f.Fuzz(func(t *testing.T, data []byte, fix bool) {
		path := filepath.Join(dir, fmt.Sprintf("fuzz%d.vhdx", seq.Add(1)))
		defer os.Remove(path)
		if err := decodeSparse(data, path); err != nil {
			t.Fatal(err)
		}
		if fix {
			if err := fixChecksums(path); err != nil {
				t.Fatal(err)
			}
		}
		before := fuzzSum(t, path)
		img, err := Open(path, false)
		if fuzzSum(t, path) != before {
			t.Fatal("a read-only open changed the file")
		}
		if err != nil {
			checkOpenError(t, err, path)
			if img, err := Open(path, true); err == nil {
				img.Close()
				t.Fatal("a writable open succeeded where a read-only one failed")
			}
			if fuzzSum(t, path) != before {
				t.Fatal("a failed writable open changed the file")
			}
			return
		}
		view, bad := exercise(t, img, path)
		replayed, vsize := img.LogReplayed(), img.src.vsize
		img.Close()
		if vsize > maxFuzzFile {
			return // replaying would make a file this large
		}
		img, err = Open(path, true)
		if err != nil {
			t.Fatalf("a writable open failed where a read-only one succeeded: %v", err)
		}
		if v, b := exercise(t, img, path); !bytes.Equal(v, view) || (b == nil) != (bad == nil) {
			t.Fatalf("the writable view differs from the read-only one (%v; %v)", b, bad)
		}
		img.Close()
		if replayed == 0 && fuzzSum(t, path) != before {
			t.Fatal("a writable open without a log to replay changed the file")
		}
		img, err = Open(path, false)
		if err != nil {
			t.Fatalf("reopen after replay: %v", err)
		}
		if img.LogReplayed() != 0 || !img.Header().LogGuid.IsZero() && replayed > 0 {
			t.Fatal("the log is not empty after a writable open")
		}
		if v, b := exercise(t, img, path); !bytes.Equal(v, view) || (b == nil) != (bad == nil) {
			t.Fatalf("the view after replay differs from the view before (%v; %v)", b, bad)
		}
		img.Close()
		if bad != nil {
			return // writes that need the bad entries fail as the reads did
		}

		// A write at each end of the disk reads back after a reopen.
		if img, err = Open(path, true); err != nil {
			t.Fatalf("writable reopen: %v", err)
		}
		ss := img.LogicalSectorSize()
		sector := bytes.Repeat([]byte{0x5c}, int(ss))
		for _, off := range []int64{0, img.Size() - ss} {
			if _, err := img.WriteAt(sector, off); err != nil {
				if errors.Is(err, ErrUnsupported) {
					img.Close()
					return
				}
				t.Fatalf("WriteAt(%d): %v", off, err)
			}
		}
		img.Close()
		if img, err = Open(path, false); err != nil {
			t.Fatalf("reopen after writes: %v", err)
		}
		defer img.Close()
		for _, off := range []int64{0, img.Size() - ss} {
			got := make([]byte, ss)
			n, stored, err := img.Run(off, ss)
			if _, rerr := img.ReadAt(got, off); rerr != nil || err != nil || n != ss || !stored || !bytes.Equal(got, sector) {
				t.Fatalf("the sector written at %d reads back %v (stored %v, %v, %v)", off, got[:4], stored, err, rerr)
			}
		}
	})
}

// fuzzSum identifies the content of a sparse file cheaply: the data extents
// (SEEK_DATA, SEEK_HOLE), their offsets and their bytes. Any write shows.
func fuzzSum(t *testing.T, p string) string {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	fmt.Fprint(h, st.Size())
	fd := int(f.Fd())
	for off := int64(0); off < st.Size(); {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			break // ENXIO: no data past off
		}
		e, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprint(h, d, e)
		if _, err := io.Copy(h, io.NewSectionReader(f, d, e-d)); err != nil {
			t.Fatal(err)
		}
		off = e
	}
	return string(h.Sum(nil))
}

func checkOpenError(t *testing.T, err error, path string) {
	t.Helper()
	known := false
	for _, s := range []error{ErrNotVHDX, ErrChecksum, ErrTruncated, ErrCorrupt, ErrUnsupported} {
		known = known || errors.Is(err, s)
	}
	if !known || !strings.Contains(err.Error(), path) {
		t.Fatalf("Open: %v: want an error naming the file and wrapping a sentinel", err)
	}
}

// exercise reads the start and the end of the image and walks Run over it, checking
// that they agree, and returns what it read, and the error that stopped the reads:
// Open checks no BAT entry (the table is paged), and a read that needs a bad one
// fails with an error naming the file (path) and wrapping ErrCorrupt.
func exercise(t *testing.T, img *Image, path string) (view []byte, bad error) {
	t.Helper()
	size := img.Size()
	n := min(size, maxFuzzRead)
	view = make([]byte, 2*n)
	badEntry := func(err error) bool {
		if err == nil || err == io.EOF {
			return false
		}
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), path) || strings.Contains(err.Error(), " -") {
			t.Fatalf("a read failed with %v: want an error naming the file and wrapping ErrCorrupt", err)
		}
		bad = err
		return true
	}
	if k, err := img.ReadAt(view[:n], 0); !badEntry(err) && int64(k) != n {
		t.Fatalf("ReadAt(0, %d) = %d, %v", n, k, err)
	}
	if k, err := img.ReadAt(view[n:], size-n); !badEntry(err) && int64(k) != n {
		t.Fatalf("ReadAt(%d, %d) = %d, %v", size-n, n, k, err)
	}
	for off, i := int64(0), 0; off < size && i < 2000 && bad == nil; i++ {
		k, stored, err := img.Run(off, size-off)
		if badEntry(err) {
			break
		}
		if err != nil || k <= 0 || k > size-off {
			t.Fatalf("Run(%d) = %d, %v, %v", off, k, stored, err)
		}
		if !stored && !img.HasParent() {
			p := make([]byte, min(k, 64*KiB))
			if _, err := img.ReadAt(p, off); !badEntry(err) && (err != nil && err != io.EOF || !allZero(p)) {
				t.Fatalf("Run(%d) = %d, not stored, but ReadAt finds data there (%v)", off, k, err)
			}
		}
		off += k
	}
	// The other readers of what the file says must not fail on what Open accepts.
	for _, pr := range img.Check() {
		if pr.Message == "" || strings.Contains(pr.Message, "\n") {
			t.Fatalf("Check: %q", pr.Message)
		}
	}
	_ = img.Describe()
	_, _ = img.ParentHints()
	_ = img.AcceptsParent(img.ParentID())
	for _, off := range []int64{0, size / 2, size - 1} {
		if f, fo, k, ok := img.FileRun(off, size); ok && (f == nil || fo < 0 || k <= 0 || k > size-off) {
			t.Fatalf("FileRun(%d) = %d, %d, %v", off, fo, k, ok)
		}
	}
	return view, bad
}
