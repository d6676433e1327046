package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Crafted logs (issue 17, item 7): each must open within openLimit and openMemLimit,
// and a writable open or Repair must write no more than the image needs.
const (
	openLimit    = 5 * time.Second
	openMemLimit = 128 * MiB
	craftLogOff  = 8 * MiB // where craftedLogFile moves the log: the builder's file end
)

// craftedLogFile writes a sparse file: a dynamic 4 MiB image (1 MiB blocks, block 0
// FULLY_PRESENT and holding pattern 1) whose log region is moved to its end
// (craftLogOff) and made logLen long, or stays at bLogOff (1 MiB) if logLen is 0;
// fillRing then writes into the ring with put (pos is an offset in the ring; a
// write wraps around its end). Only the 4 KiB sectors that are not all zero are
// written. With VHDX_CRAFT_DIR set, a copy goes there too.
func craftedLogFile(t testing.TB, logLen int64, fillRing func(guid GUID, put func(pos int64, b []byte))) string {
	t.Helper()
	b := newBuilder(4*MiB, MiB)
	b.logGuid = NewGUID()
	b.states[0] = FullyPresent
	b.data[0] = pattern(MiB, 1)
	f := b.build()
	if int64(len(f)) != craftLogOff {
		t.Fatalf("builder file is %d bytes, want %d", len(f), craftLogOff)
	}
	logOff := int64(craftLogOff)
	if logLen == 0 {
		logOff, logLen = bLogOff, bLogLen
	} else {
		for _, off := range []int64{header1Off, header2Off} {
			h, err := parseHeader(f[off:off+headerSize], off)
			if err != nil {
				t.Fatal(err)
			}
			h.LogOffset, h.LogLength = craftLogOff, uint32(logLen)
			copy(f[off:], h.Marshal())
		}
	}
	clear(f[bLogOff : bLogOff+bLogLen])
	write := func(p string) {
		file, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer file.Close()
		if err := file.Truncate(max(craftLogOff, logOff+logLen)); err != nil {
			t.Fatal(err)
		}
		writeSparse(t, file, f, 0)
		fillRing(b.logGuid, func(pos int64, e []byte) {
			k := min(int64(len(e)), logLen-pos)
			writeSparse(t, file, e[:k], logOff+pos)
			writeSparse(t, file, e[k:], logOff)
		})
		if err := file.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if dir := os.Getenv("VHDX_CRAFT_DIR"); dir != "" { // a copy to measure vhdfs info on
		write(filepath.Join(dir, strings.ReplaceAll(t.Name(), "/", "-")+".vhdx"))
	}
	p := filepath.Join(t.TempDir(), "crafted.vhdx")
	write(p)
	return p
}

// writeSparse writes the 4 KiB sectors of b that are not all zero at off.
func writeSparse(t testing.TB, f *os.File, b []byte, off int64) {
	t.Helper()
	for i := 0; i < len(b); i += logSector {
		s := b[i:min(i+logSector, len(b))]
		if allZero(s) {
			continue
		}
		if _, err := f.WriteAt(s, off+int64(i)); err != nil {
			t.Fatal(err)
		}
	}
}

// everySectorLog fills a ring of logLen bytes with an entry header at every sector
// that claims the whole ring and as many descriptors as fit in it (checksums wrong),
// except the last sector, which holds a valid empty entry: a scan that checks every
// candidate over its claimed length takes time quadratic in the log's length.
func everySectorLog(logLen int64) func(GUID, func(int64, []byte)) {
	return func(guid GUID, put func(int64, []byte)) {
		size := uint64(craftLogOff + logLen)
		for pos := int64(0); pos < logLen-logSector; pos += logSector {
			h := logEntryHeader{EntryLength: uint32(logLen), SequenceNumber: uint64(100 + pos/logSector),
				DescriptorCount: uint32(128*(logLen/logSector) - 2), LogGuid: guid, FlushedFileOffset: size, LastFileOffset: size}
			copy(h.Signature[:], "loge")
			s := make([]byte, logSector)
			if _, err := binary.Encode(s, binary.LittleEndian, h); err != nil {
				panic(err)
			}
			put(pos, s)
		}
		put(logLen-logSector, marshalLogEntry(1<<20, uint32(logLen-logSector), guid, size, size, nil))
	}
}

// craftedLogSeeds are the crafted logs small enough to seed FuzzOpen: the file
// names by seed name. (The sparse 4095 MiB log is TestLogCraftedSparse's only.)
func craftedLogSeeds(t testing.TB) map[string]string {
	return map[string]string{
		"log-every-sector-2m": craftedLogFile(t, 2*MiB, everySectorLog(2*MiB)),
		"log-zero-64g":        craftedLogFile(t, 0, zeroLog64G),
		"log-zero-replay":     craftedLogFile(t, 0, zeroLogReplay),
	}
}

// zeroLog64G is a log whose one entry zeros 64 GiB from 4 MiB, and extends the file
// to its end.
func zeroLog64G(guid GUID, put func(int64, []byte)) {
	put(0, marshalLogEntry(5, 0, guid, craftLogOff, 4*MiB+64<<30, []logOp{{off: 4 * MiB, zeroLen: 64 << 30}}))
}

// zeroLogReplay is a log whose one entry zeros block 0, writes a sector into it, and
// zeros the 4 MiB past it, up to its last file offset, 9 MiB, a MiB past the file.
func zeroLogReplay(guid GUID, put func(int64, []byte)) {
	put(0, marshalLogEntry(5, 0, guid, craftLogOff, craftLogOff+MiB, []logOp{
		{off: 4 * MiB, zeroLen: MiB}, {off: 4*MiB + 8*KiB, data: fill(logSector, 'D')}, {off: 5 * MiB, zeroLen: 4 * MiB}}))
}

// usage is what f took: wall time, and the bytes it allocated (TotalAlloc, which
// bounds the heap it could have needed at any moment).
func usage(f func()) (time.Duration, uint64) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start := time.Now()
	f()
	d := time.Since(start)
	runtime.ReadMemStats(&after)
	return d, after.TotalAlloc - before.TotalAlloc
}

// diskUse is the file's size and the bytes it occupies (st_blocks).
func diskUse(t testing.TB, p string) (size, used int64) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Size, st.Blocks * 512
}

// openBounded opens p within openLimit and openMemLimit.
func openBounded(t *testing.T, p string, writable bool) (*Image, error) {
	t.Helper()
	var img *Image
	var err error
	d, alloc := usage(func() { img, err = Open(p, writable) })
	t.Logf("Open(writable=%v): %v, %.1f MiB allocated, err %v", writable, d.Round(time.Millisecond), float64(alloc)/MiB, err)
	if d > openLimit {
		t.Errorf("Open(writable=%v) took %v, want at most %v", writable, d, openLimit)
	}
	if alloc > openMemLimit {
		t.Errorf("Open(writable=%v) allocated %d MiB, want at most %d", writable, alloc/MiB, openMemLimit/MiB)
	}
	return img, err
}

// TestLogCraftedScan: logs with an entry header at every sector open quickly, find
// the one valid entry among them, and replay it into the file without growing it.
func TestLogCraftedScan(t *testing.T) {
	for _, logLen := range []int64{2 * MiB, 4 * MiB, 16 * MiB} {
		t.Run(fmt.Sprintf("every-sector-%dMiB", logLen/MiB), func(t *testing.T) {
			p := craftedLogFile(t, logLen, everySectorLog(logLen))
			size, used := diskUse(t, p)
			img, err := openBounded(t, p, false)
			if err != nil {
				t.Fatal(err)
			}
			if img.LogReplayed() != 1 {
				t.Errorf("replayed %d entries, want the one valid entry", img.LogReplayed())
			}
			img.Close()
			img, err = openBounded(t, p, true)
			if err != nil {
				t.Fatal(err)
			}
			img.Close()
			// The file system may add a block of its own (an extent tree block).
			if s, u := diskUse(t, p); s != size || u > used+64*KiB {
				t.Errorf("after replay the file is %d bytes using %d; before %d using %d", s, u, size, used)
			}
		})
	}
}

// TestLogCraftedZero: a zero descriptor of 64 GiB in an 8 MiB file of a 4 MiB
// disk, its last file offset past it, is more than the file can need (13 MiB: the
// file, then its 4 blocks and a sector bitmap block allocated anew): every open and
// Repair refuse the file and change nothing.
func TestLogCraftedZero(t *testing.T) {
	p := craftedLogFile(t, 0, zeroLog64G)
	size, used := diskUse(t, p)
	before := fileSum(t, p)
	img, err := openBounded(t, p, false)
	if err == nil {
		img.Close()
		t.Fatal("a read-only open accepted a 64 GiB zero descriptor in an 8 MiB file")
	}
	for _, want := range []string{p, "entry 5", "4194304", "68719476736"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %q", err, want)
		}
	}
	if !errors.Is(err, ErrCorrupt) {
		t.Errorf("error %v does not wrap ErrCorrupt", err)
	}
	if img, err := openBounded(t, p, true); err == nil || !errors.Is(err, ErrCorrupt) {
		if img != nil {
			img.Close()
		}
		t.Fatalf("writable open: %v, want ErrCorrupt", err)
	}
	if _, err := Repair(p); err == nil || !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Repair: %v, want ErrCorrupt", err)
	}
	if s, u := diskUse(t, p); s != size || u != used || fileSum(t, p) != before {
		t.Errorf("the refused file changed: %d bytes using %d, was %d using %d", s, u, size, used)
	}
}

// TestLogZeroReplay: zero descriptors the file can need (over block 0, and past the
// file's end, 8 MiB, up to its last file offset, 9 MiB) are replayed without writing zeros: the
// file takes no more space than before, and reads as zeros there.
func TestLogZeroReplay(t *testing.T) {
	p := craftedLogFile(t, 0, zeroLogReplay)
	_, used := diskUse(t, p)
	img, err := openBounded(t, p, true)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4*MiB)
	copy(want[8*KiB:], fill(logSector, 'D'))
	got := make([]byte, len(want))
	if _, err := img.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Errorf("the disk does not read as the zeroed block 0 with one sector written (%v)", err)
	}
	img.Close()
	if s, u := diskUse(t, p); s != craftLogOff+MiB || u > used {
		t.Errorf("after replay the file is %d bytes using %d; want %d bytes using at most %d", s, u, craftLogOff+MiB, used)
	}
}

// TestLogCraftedSparse: a sparse log region of 4095 MiB holding one entry near its
// end opens in bounded time and memory, shows the entry's write, and replays it.
func TestLogCraftedSparse(t *testing.T) {
	const logLen = 4095 * MiB
	p := craftedLogFile(t, logLen, func(guid GUID, put func(int64, []byte)) {
		size := uint64(craftLogOff + logLen)
		pos := int64(logLen - 16*logSector)
		put(pos, marshalLogEntry(7, uint32(pos), guid, size, size, []logOp{{off: 4*MiB + 4*KiB, data: fill(logSector, 'S')}}))
	})
	size, used := diskUse(t, p)
	want := pattern(MiB, 1)
	copy(want[4*KiB:], fill(logSector, 'S'))
	for _, writable := range []bool{false, true} {
		img, err := openBounded(t, p, writable)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, MiB)
		if _, err := img.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
			t.Errorf("writable=%v: block 0 does not show the log's write (%v)", writable, err)
		}
		if img.LogReplayed() != 1 {
			t.Errorf("writable=%v: replayed %d entries, want 1", writable, img.LogReplayed())
		}
		img.Close()
	}
	if s, u := diskUse(t, p); s != size || u > used+64*KiB {
		t.Errorf("after replay the file is %d bytes using %d; before %d using %d", s, u, size, used)
	}
}

// TestLogManyDescriptors: an active sequence of maxReplayOps descriptors (zero
// ranges over the blocks, in one entry of a 16 MiB log) replays within the limits,
// read-only and into the file; one more is refused, naming the cap.
func TestLogManyDescriptors(t *testing.T) {
	const logLen = 16 * MiB
	build := func(n int) string {
		return craftedLogFile(t, logLen, func(guid GUID, put func(int64, []byte)) {
			ops := make([]logOp, n)
			for i := range ops {
				ops[i] = logOp{off: 4*MiB + int64(i%1024)*logSector, zeroLen: logSector}
			}
			size := uint64(craftLogOff + logLen)
			put(0, marshalLogEntry(9, 0, guid, size, size, ops))
		})
	}
	p := build(maxReplayOps)
	_, used := diskUse(t, p)
	for _, writable := range []bool{false, true} {
		img, err := openBounded(t, p, writable)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 4*MiB)
		if _, err := img.ReadAt(got, 0); err != nil || !allZero(got) {
			t.Errorf("writable=%v: the zeroed blocks do not read as zeros (%v)", writable, err)
		}
		img.Close()
	}
	if _, u := diskUse(t, p); u > used {
		t.Errorf("the replay made the file use %d bytes, up from %d", u, used)
	}
	_, err := openBounded(t, build(maxReplayOps+1), false)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), fmt.Sprint(maxReplayOps)) {
		t.Errorf("Open of %d descriptors: %v, want ErrUnsupported naming the cap", maxReplayOps+1, err)
	}
}
