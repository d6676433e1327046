package vhd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
)

// relinkFixture makes two parents with different data and a child of the first that
// holds data of its own in some sectors.
type relinkFixture struct {
	dir, p1, p2, child string
	data2              []byte // p2's disk
	own                []byte // what the child stores where present
	present            []bool // by sector
}

func newRelinkFixture(t *testing.T) *relinkFixture {
	t.Helper()
	const size = 64 * kib
	x := &relinkFixture{dir: t.TempDir()}
	r := newRand(t, 77)
	x.p1 = createImage(t, x.dir, "p1.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: 4 * kib})
	x.p2 = createImage(t, x.dir, "p2.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: 4 * kib})
	img := openImage(t, x.p2, true)
	x.data2 = randBytes(r, size)
	if _, err := img.WriteAt(x.data2, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	x.child = createDiff(t, x.dir, "child.vhd", x.p1, 0)
	x.own = make([]byte, size)
	x.present = make([]bool, size/SectorSize)
	img = openImage(t, x.child, true)
	for _, s := range []int64{0, 1, 9, 40, 41, 42, 127} {
		p := randBytes(r, SectorSize)
		if _, err := img.WriteAt(p, s*SectorSize); err != nil {
			t.Fatal(err)
		}
		copy(x.own[s*SectorSize:], p)
		x.present[s] = true
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return x
}

func TestSetParent(t *testing.T) {
	x := newRelinkFixture(t)
	img := openImage(t, x.child, true)
	// A pending write must be on disk before the header points elsewhere.
	p := bytes.Repeat([]byte{0xcd}, SectorSize)
	if _, err := img.WriteAt(p, 100*SectorSize); err != nil {
		t.Fatal(err)
	}
	copy(x.own[100*SectorSize:], p)
	x.present[100] = true
	parent := openImage(t, x.p2, false)
	if err := img.SetParent(parent.Footer().UniqueID, x.p2, x.child); err != nil {
		t.Fatalf("SetParent: %v", err)
	}
	h, _ := img.Header()
	if h.ParentUniqueID != parent.Footer().UniqueID {
		t.Errorf("the open image's header still has parent %v", h.ParentUniqueID)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	img = openImage(t, x.child, false)
	h, _ = img.Header()
	if h.ParentUniqueID != parent.Footer().UniqueID {
		t.Errorf("parent unique ID %v, want p2's %v", h.ParentUniqueID, parent.Footer().UniqueID)
	}
	if h.ParentTimestamp != 0 {
		t.Errorf("parent time stamp %v, want 0", Time(h.ParentTimestamp))
	}
	locs, err := img.ParentLocations()
	if err != nil {
		t.Fatal(err)
	}
	if want := []ParentLocation{{"W2ru", `.\p2.vhd`}, {"MacX", "file://./p2.vhd"}, {"name", "p2.vhd"}}; !reflect.DeepEqual(locs, want) {
		t.Errorf("ParentLocations = %q, want %q", locs, want)
	}
	want := make([]byte, len(x.data2))
	for s := range x.present {
		src := x.data2
		if x.present[s] {
			src = x.own
		}
		copy(want[s*SectorSize:(s+1)*SectorSize], src[s*SectorSize:])
	}
	if got := view(t, img, x.data2); !bytes.Equal(got, want) {
		t.Errorf("the child over p2 differs at %d", firstDiff(got, want))
	}
	if ps := problems(img.Check(), Warning); len(ps) > 0 {
		t.Errorf("Check: %v", ps)
	}
	// The relinked image keeps taking writes after its new locators.
	img.Close()
	img = openImage(t, x.child, true)
	if _, err := img.WriteAt(p, 64*SectorSize); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	img = openImage(t, x.child, false)
	if ps := problems(img.Check(), Error); len(ps) > 0 {
		t.Errorf("Check after a write: %v", ps)
	}
	if got, _ := img.ParentLocations(); !reflect.DeepEqual(got, locs) {
		t.Errorf("a write changed the locators: %q", got)
	}
}

func TestSetParentErrors(t *testing.T) {
	x := newRelinkFixture(t)
	parent := openImage(t, x.p2, false)
	before := readFile(t, x.child)
	ro := openImage(t, x.child, false)
	if err := ro.SetParent(parent.Footer().UniqueID, x.p2, x.child); !errors.Is(err, ErrReadOnly) {
		t.Errorf("SetParent on a read-only image: %v, want ErrReadOnly", err)
	}
	ro.Close()
	dyn := openImage(t, x.p1, true)
	if err := dyn.SetParent(parent.Footer().UniqueID, x.p2, x.p1); !errors.Is(err, ErrInvalidArg) {
		t.Errorf("SetParent on a dynamic image: %v, want ErrInvalidArg", err)
	}
	if !bytes.Equal(readFile(t, x.child), before) {
		t.Errorf("a refused SetParent changed the file")
	}
}

// TestSetParentCrashOrder runs SetParent (after a write whose metadata is pending)
// through a failFile with budgets k = 0, 1, 2, … as TestCrashOrder does: after any
// crash the image opens without repair, passes Check, and points at p1 or p2 with
// locators and name that agree; the child's own sectors are present with their data
// or absent. When nothing was refused it points at p2.
//
// The child is vhdfs-made, so the new locators go into the room reserved at create;
// the second run re-links it to p2 and back to p1 first, so the crashing re-link
// writes over the locator data of an earlier one, which the header no longer uses.
func TestSetParentCrashOrder(t *testing.T) {
	for _, relinked := range []bool{false, true} {
		t.Run(fmt.Sprintf("relinked before %v", relinked), func(t *testing.T) {
			x := newRelinkFixture(t)
			if relinked {
				img := openImage(t, x.child, true)
				for _, p := range []string{x.p2, x.p1} {
					pi := openImage(t, p, false)
					if err := img.SetParent(pi.Footer().UniqueID, p, x.child); err != nil {
						t.Fatal(err)
					}
				}
				if err := img.Close(); err != nil {
					t.Fatal(err)
				}
			}
			testSetParentCrashOrder(t, x)
		})
	}
}

func testSetParentCrashOrder(t *testing.T, x *relinkFixture) {
	parent := openImage(t, x.p2, false)
	id1 := openImage(t, x.p1, false).Footer().UniqueID
	id2 := parent.Footer().UniqueID
	extra := bytes.Repeat([]byte{0xee}, 2*SectorSize)
	const extraSector = 70 // in a block the child has not allocated
	work := filepath.Join(x.dir, "work.vhd")
	for k := 0; ; k++ {
		if k > 1000 {
			t.Fatal("SetParent never completed")
		}
		copyFile(t, x.child, work)
		f, err := os.OpenFile(work, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		ff := &failFile{File: f, budget: k}
		img, err := OpenFile(ff, work, true)
		if err != nil {
			t.Fatal(err)
		}
		_, err = img.WriteAt(extra, extraSector*SectorSize)
		if err == nil {
			err = img.SetParent(parent.Footer().UniqueID, x.p2, work)
		}
		closeErr := img.Close()
		if err != nil && !errors.Is(err, errInjected) || closeErr != nil && !errors.Is(closeErr, errInjected) {
			t.Fatalf("k=%d: unexpected error: %v, %v", k, err, closeErr)
		}
		completed := !ff.failed

		after, err := Open(work, false)
		if err != nil {
			t.Fatalf("k=%d: reopen: %v", k, err)
		}
		if st, why := after.FooterState(); st != FooterAtEnd {
			t.Fatalf("k=%d: FooterState = %v (%v), want FooterAtEnd", k, st, why)
		}
		if ps := problems(after.Check(), Error); len(ps) > 0 {
			t.Fatalf("k=%d: Check: %v", k, ps)
		}
		h, _ := after.Header()
		locs, err := after.ParentLocations()
		if err != nil {
			t.Fatalf("k=%d: ParentLocations: %v", k, err)
		}
		wantName := "p1.vhd"
		switch h.ParentUniqueID {
		case id1:
		case id2:
			wantName = "p2.vhd"
		default:
			t.Fatalf("k=%d: parent unique ID %v is neither p1's nor p2's", k, h.ParentUniqueID)
		}
		if completed && wantName != "p2.vhd" {
			t.Fatalf("k=%d: SetParent completed but the image points at p1", k)
		}
		for _, l := range locs {
			if !strings.HasSuffix(l.Path, `\`+wantName) && !strings.HasSuffix(l.Path, "/"+wantName) && l.Path != wantName {
				t.Fatalf("k=%d: parent ID of %s but %s locator %q", k, wantName, l.Source, l.Path)
			}
		}
		for s := int64(0); s < after.Size()/SectorSize; s++ {
			n, present, err := after.Run(s*SectorSize, SectorSize)
			if err != nil || n != SectorSize {
				t.Fatalf("k=%d: Run(sector %d) = %d, %v", k, s, n, err)
			}
			want := x.own[s*SectorSize:][:SectorSize]
			wasPresent := x.present[s]
			if s == extraSector || s == extraSector+1 {
				want = extra[:SectorSize]
				if completed && !present {
					t.Fatalf("k=%d: the write before SetParent is lost", k)
				}
			} else if present != wasPresent {
				t.Fatalf("k=%d: sector %d present=%v, was %v", k, s, present, wasPresent)
			}
			if present {
				got := make([]byte, SectorSize)
				if _, err := after.ReadAt(got, s*SectorSize); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("k=%d: sector %d holds the wrong data", k, s)
				}
			}
		}
		assertLocatorsInRoom(t, after)
		after.Close()
		if completed {
			t.Logf("SetParent completed with %d writes; every earlier crash point was safe", ff.writes)
			break
		}
	}
}

// TestSetParentConcurrent relinks an image while other goroutines read it and ask for
// its header and locators, as a mount does during a merge; run with -race.
func TestSetParentConcurrent(t *testing.T) {
	x := newRelinkFixture(t)
	img := openImage(t, x.child, true)
	parent := openImage(t, x.p2, false)
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4*kib)
			for {
				select {
				case <-done:
					return
				default:
				}
				if _, err := img.ReadAt(buf, 0); err != nil {
					t.Error(err)
					return
				}
				if _, _, err := img.Run(0, img.Size()); err != nil {
					t.Error(err)
					return
				}
				_, _ = img.Header()
				if _, err := img.ParentLocations(); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	err := img.SetParent(parent.Footer().UniqueID, x.p2, x.child)
	close(done)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
}

// TestSetUniqueIDCrashOrder cuts the writes of SetUniqueID after each one, as a power
// loss would: the image opens without repair with its old or its new ID (the new one
// once the call completed), and a second SetUniqueID, which a merge journal's
// recovery runs, leaves both footers with the new ID and Check clean.
func TestSetUniqueIDCrashOrder(t *testing.T) {
	for _, typ := range []DiskType{TypeFixed, TypeDynamic, TypeDifferencing} {
		t.Run(typ.String(), func(t *testing.T) {
			dir := t.TempDir()
			path := malformedBase(t, dir, typ)
			orig := openImage(t, path, false)
			oldID := orig.Footer().UniqueID
			want := view(t, orig, nil)
			orig.Close()
			newID := NewUUID()
			work := filepath.Join(dir, "work.vhd")
			for k := 0; ; k++ {
				if k > 20 {
					t.Fatal("SetUniqueID never completed")
				}
				copyFile(t, path, work)
				f, err := os.OpenFile(work, os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				ff := &failFile{File: f, budget: k}
				img, err := OpenFile(ff, work, true)
				if err != nil {
					t.Fatal(err)
				}
				err = img.SetUniqueID(newID)
				img.Close()
				if err != nil && !errors.Is(err, errInjected) {
					t.Fatalf("k=%d: %v", k, err)
				}
				completed := !ff.failed

				after, err := Open(work, false)
				if err != nil {
					t.Fatalf("k=%d: reopen: %v", k, err)
				}
				got := after.Footer().UniqueID
				if got != oldID && got != newID || completed && got != newID {
					t.Fatalf("k=%d (completed %v): unique ID %s, old %s, new %s", k, completed, got, oldID, newID)
				}
				if completed {
					if ps := problems(after.Check(), Warning); len(ps) > 0 {
						t.Fatalf("k=%d: Check after SetUniqueID: %v", k, ps)
					}
				}
				if !bytes.Equal(view(t, after, nil), want) {
					t.Fatalf("k=%d: the data changed", k)
				}
				after.Close()
				if completed {
					return
				}
				// Recovery: the same call again, with every write let through.
				img = openImage(t, work, true)
				if err := img.SetUniqueID(newID); err != nil {
					t.Fatalf("k=%d: SetUniqueID again: %v", k, err)
				}
				img.Close()
				again := openImage(t, work, false)
				if ps := problems(again.Check(), Warning); len(ps) > 0 || again.Footer().UniqueID != newID {
					t.Fatalf("k=%d: after recovery ID %s, Check %v", k, again.Footer().UniqueID, ps)
				}
				again.Close()
			}
		})
	}
}

// assertLocatorsInRoom fails unless every parent locator's data space ends before the
// first data block, as blktap's check requires ("block N clobbers headers").
func assertLocatorsInRoom(t *testing.T, img *Image) {
	t.Helper()
	h, _ := img.Header()
	img.mu.RLock()
	first := int64(-1)
	for _, e := range img.bat.allocated() {
		if o := int64(e) * SectorSize; first < 0 || o < first {
			first = o
		}
	}
	img.mu.RUnlock()
	for i, l := range h.ParentLocators {
		sp, _ := l.SpaceBytes()
		if l.PlatformCode != PlatformNone && first >= 0 && int64(l.PlatformDataOffset)+sp > first {
			t.Fatalf("parent locator %d at %d+%d runs past the first data block at %d", i, l.PlatformDataOffset, sp, first)
		}
	}
}

// TestSetParentInRoom: re-linking a vhdfs-made image again and again keeps its
// locators in the room reserved at create, before the first data block, and never
// grows the file.
func TestSetParentInRoom(t *testing.T) {
	x := newRelinkFixture(t)
	size := fileSize(t, x.child)
	img := openImage(t, x.child, true)
	for i := 0; i < 5; i++ {
		p := []string{x.p2, x.p1}[i%2]
		pi := openImage(t, p, false)
		if err := img.SetParent(pi.Footer().UniqueID, p, x.child); err != nil {
			t.Fatalf("re-link %d: %v", i, err)
		}
		assertLocatorsInRoom(t, img)
		if got := fileSize(t, x.child); got != size {
			t.Fatalf("re-link %d: file grew from %d to %d", i, size, got)
		}
		locs, err := img.ParentLocations()
		if err != nil {
			t.Fatal(err)
		}
		if want := filepath.Base(p); locs[len(locs)-1].Path != want || locs[0].Path != `.\`+want {
			t.Fatalf("re-link %d: locations %q, want %s", i, locs, want)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if ps := problems(openImage(t, x.child, false).Check(), Warning); len(ps) > 0 {
		t.Errorf("Check: %v", ps)
	}
}

// TestSetParentNoRoom re-links an image made by a tool that reserves no locator room:
// its locators are packed after the BAT and its first block follows them at once.
// SetParent then appends the locators past the end: the image opens, its block is
// intact, its locators name the new parent, and check warns about the placement
// blktap rejects (and errs about nothing).
func TestSetParentNoRoom(t *testing.T) {
	x := newRelinkFixture(t)
	path := createDiff(t, x.dir, "packed.vhd", x.p1, 4*kib)
	img := openImage(t, path, false)
	h, _ := img.Header()
	foot := img.Footer()
	img.Close()
	b := readFile(t, path)
	batEnd := int64(h.TableOffset) + roundUp(int64(h.MaxTableEntries)*4, SectorSize)
	cur := batEnd
	packed := make([]byte, batEnd)
	copy(packed, b[:batEnd])
	for i, l := range h.ParentLocators {
		if l.PlatformCode == PlatformNone {
			continue
		}
		data := b[l.PlatformDataOffset : l.PlatformDataOffset+uint64(l.PlatformDataLength)]
		space := roundUp(int64(len(data)), SectorSize)
		packed = append(packed, make([]byte, space)...)
		copy(packed[cur:], data)
		h.ParentLocators[i].PlatformDataOffset = uint64(cur)
		h.ParentLocators[i].PlatformDataSpace = uint32(space)
		cur += space
	}
	// Block 0 right after the locators: a bitmap with sector 0 set, then the data.
	bm := make([]byte, bitmapBytes(h.BlockSize))
	bm[0] = 0x80
	data := bytes.Repeat([]byte{0x5e}, int(h.BlockSize))
	blockAt := cur
	packed = append(append(packed, bm...), data...)
	binary.BigEndian.PutUint32(packed[h.TableOffset:], uint32(blockAt/SectorSize))
	copy(packed[foot.DataOffset:], h.Marshal())
	packed = append(packed, foot.Marshal()...)
	writeFile(t, path, packed)

	before := openImage(t, path, false)
	if ps := problems(before.Check(), Error); len(ps) > 0 {
		t.Fatalf("the packed image does not check: %v", ps)
	}
	before.Close()
	p2 := openImage(t, x.p2, false)
	id2 := p2.Footer().UniqueID
	p2.Close()
	w := openImage(t, path, true)
	if err := w.SetParent(id2, x.p2, path); err != nil {
		t.Fatalf("SetParent without room: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	after := openImage(t, path, false)
	hh, _ := after.Header()
	if hh.ParentUniqueID != id2 {
		t.Errorf("parent unique ID %s, want p2's %s", hh.ParentUniqueID, id2)
	}
	for i, l := range hh.ParentLocators {
		if l.PlatformCode != PlatformNone && int64(l.PlatformDataOffset) < blockAt {
			t.Errorf("locator %d at %d: there was no room before the block at %d, it should have been appended", i, l.PlatformDataOffset, blockAt)
		}
	}
	locs, err := after.ParentLocations()
	if err != nil || len(locs) == 0 {
		t.Fatalf("ParentLocations: %v, %v", locs, err)
	}
	for _, l := range locs {
		if !strings.HasSuffix(l.Path, "p2.vhd") {
			t.Errorf("%s locator %q does not name p2.vhd", l.Source, l.Path)
		}
	}
	got := make([]byte, SectorSize)
	if n, present, err := after.Run(0, SectorSize); err != nil || !present || n != SectorSize {
		t.Fatalf("Run(0) = %d, %v, %v; want the block's sector present", n, present, err)
	}
	if _, err := after.ReadAt(got, 0); err != nil || !bytes.Equal(got, data[:SectorSize]) {
		t.Errorf("the block's data after the re-link: %v, %x…", err, got[:8])
	}
	ps := after.Check()
	if e := problems(ps, Error); len(e) > 0 {
		t.Errorf("Check after the re-link: %v", e)
	}
	if !strings.Contains(problemText(ps), "lies inside the space of the header") && !strings.Contains(problemText(ps), "after the first data block") {
		t.Logf("check says: %s", problemText(ps))
		t.Errorf("Check does not warn that the locators lie past a data block")
	}
}
