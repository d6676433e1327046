package vhdx

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

// TestFileRun: FileRun gives the file range that holds the image's own data, and
// nothing where the data is not stored in place.
func TestFileRun(t *testing.T) {
	dyn := newBuilder(7*MiB+512*KiB, MiB)
	for _, p := range []int64{2, 3, 4, 7} {
		dyn.states[p], dyn.data[p] = FullyPresent, pattern(MiB, byte(10*p))
	}
	dyn.data[4] = pattern(MiB, 40)
	// Block 4 lives at block 6's place: not right after block 3.
	dyn.rawBAT[dyn.geometry().payloadIndex(4)] = uint64(makeEntry(FullyPresent, dyn.blockOffset(6)))
	dynFile := dyn.build()
	copy(dynFile[dyn.blockOffset(6):], dyn.data[4])
	diff, _ := differencingImage(512)

	type want struct {
		ok      bool
		fileOff int64
		k       int64
	}
	for _, tc := range []struct {
		name   string
		file   []byte
		off, n int64
		want   want
	}{
		{"NOT_PRESENT block", dynFile, 0, MiB, want{}},
		{"within a block", dynFile, 2 * MiB, 100, want{true, dyn.blockOffset(2), 100}},
		{"across two blocks that follow in the file", dynFile, 2*MiB + 512, 10 * MiB, want{true, dyn.blockOffset(2) + 512, 2*MiB - 512}},
		{"a block elsewhere in the file ends the run", dynFile, 3 * MiB, 2 * MiB, want{true, dyn.blockOffset(3), MiB}},
		{"moved block", dynFile, 4*MiB + 5, MiB, want{true, dyn.blockOffset(6) + 5, MiB - 5}},
		{"short last block stops at Size", dynFile, 7 * MiB, 10 * MiB, want{true, dyn.blockOffset(7), 512 * KiB}},
		{"at Size", dynFile, 7*MiB + 512*KiB, 1, want{}},
		{"negative offset", dynFile, -1, 1, want{}},
		{"zero length", dynFile, 2 * MiB, 0, want{}},
		{"PARTIALLY_PRESENT, bits set", diff.build(), 0, MiB, want{true, diff.blockOffset(0), 8 * 512}},
		{"PARTIALLY_PRESENT, bit clear", diff.build(), 8 * 512, 512, want{}},
		{"PARTIALLY_PRESENT, one set sector, unaligned", diff.build(), 9*512 + 100, MiB, want{true, diff.blockOffset(0) + 9*512 + 100, 412}},
		{"PARTIALLY_PRESENT, last sector", diff.build(), MiB - 512, MiB, want{true, diff.blockOffset(0) + MiB - 512, 512}},
		{"FULLY_PRESENT in a differencing image", diff.build(), MiB + 4096, 8 * MiB, want{true, diff.blockOffset(1) + 4096, MiB - 4096}},
		{"ZERO in a differencing image", diff.build(), 2 * MiB, 512, want{}},
		{"NOT_PRESENT in a differencing image", diff.build(), 5 * MiB, 512, want{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, err := Open(writeFile(t, tc.file), false)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			f, fileOff, k, ok := img.FileRun(tc.off, tc.n)
			if got := (want{ok, fileOff, k}); got != tc.want {
				t.Fatalf("FileRun(%d, %d) = %+v, want %+v", tc.off, tc.n, got, tc.want)
			}
			if !ok {
				return
			}
			if f == nil {
				t.Fatal("no file")
			}
			a, b := make([]byte, k), make([]byte, k)
			if _, err := f.ReadAt(a, fileOff); err != nil {
				t.Fatal(err)
			}
			if _, err := img.ReadAt(b, tc.off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(a, b) {
				t.Error("the file range differs from ReadAt")
			}
		})
	}

	// A log replayed only in memory: the file does not hold what the image shows.
	f, _, _ := logImage(t)
	img, err := Open(writeFile(t, f), false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, _, _, ok := img.FileRun(0, 512); ok {
		t.Error("FileRun gives a range of a file whose log is not replayed into it")
	}
}

// TestCopyFrom: CopyFrom copies in place into FULLY_PRESENT blocks only, up to the
// block's end, and changes the ID as a write does.
func TestCopyFrom(t *testing.T) {
	b := newBuilder(8*MiB, MiB)
	b.states[1], b.data[1] = FullyPresent, fill(MiB, 1)
	b.states[2], b.data[2] = FullyPresent, fill(MiB, 2)
	b.states[3] = Zero
	p := writeFile(t, b.build())
	src := writeFile(t, pattern(4*MiB, 50))
	sf, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer sf.Close()

	ro, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.CopyFrom(sf, 0, MiB, 512); !errors.Is(err, ErrReadOnly) {
		t.Errorf("read-only: %v", err)
	}
	ro.Close()

	img, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	for _, tc := range []struct {
		name        string
		src         *os.File
		srcOff, off int64
		n, k        int64
		err         error
	}{
		{"unaligned offset", sf, 0, MiB + 100, 512, 0, ErrInvalidArg},
		{"unaligned length", sf, 0, MiB, 100, 0, ErrInvalidArg},
		{"past Size", sf, 0, 8*MiB - 512, 1024, 0, ErrOutOfRange},
		{"NOT_PRESENT block", sf, 0, 0, 512, 0, ErrNotInPlace},
		{"ZERO block", sf, 0, 3 * MiB, 512, 0, ErrNotInPlace},
		{"a pipe is refused by the kernel", pr, 0, MiB, 512, 0, ErrNoKernelCopy},
		{"within a block", sf, 4096, MiB + 512, 8192, 8192, nil},
		{"across a block's end: stops there", sf, 0, 2*MiB - 4096, 3 * MiB, 4096, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := view(t, img)
			k, err := img.CopyFrom(tc.src, tc.srcOff, tc.off, tc.n)
			if k != tc.k || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
				t.Fatalf("CopyFrom = %d, %v; want %d, %v", k, err, tc.k, tc.err)
			}
			want := before
			copy(want[tc.off:], pattern(4*MiB, 50)[tc.srcOff:tc.srcOff+k])
			if !bytes.Equal(view(t, img), want) {
				t.Error("the image does not show the copy (or shows more)")
			}
		})
	}
	if img.ID() == b.dataWrite.ID() {
		t.Error("CopyFrom kept the DataWriteGuid")
	}
	id := image.NewID()
	if err := img.SetID(id); err != nil {
		t.Fatal(err)
	}
	if _, err := img.CopyFrom(sf, 0, 2*MiB, 512); err != nil {
		t.Fatal(err)
	}
	if img.ID() != id {
		t.Error("CopyFrom after SetID changed the ID")
	}
}
