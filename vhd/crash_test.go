package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

var errInjected = errors.New("injected failure")

// failFile is a File over an *os.File that lets the first budget writes through and
// fails every write after them, and every Sync and Truncate from that point on: what
// the disk holds when the process dies after budget writes.
type failFile struct {
	*os.File
	budget, writes int
	failed         bool // a call was refused
}

func (f *failFile) spent() bool { return f.writes >= f.budget }

func (f *failFile) WriteAt(p []byte, off int64) (int, error) {
	if f.spent() {
		f.failed = true
		return 0, errInjected
	}
	f.writes++
	return f.File.WriteAt(p, off)
}

func (f *failFile) Sync() error {
	if f.spent() {
		f.failed = true
		return errInjected
	}
	return f.File.Sync()
}

func (f *failFile) Truncate(size int64) error {
	if f.spent() {
		f.failed = true
		return errInjected
	}
	return f.File.Truncate(size)
}

// reservingFailFile is a failFile that reserves space with fallocate, as an *os.File
// does; a reservation counts as a write. A plain failFile cannot reserve, and the
// image writes the zero bitmap of a new block instead.
type reservingFailFile struct{ *failFile }

func (f reservingFailFile) Reserve(off, n int64) error {
	if f.spent() {
		f.failed = true
		return errInjected
	}
	f.writes++
	return reserve(f.File, off, n)
}

// crashOp is one step of the script: a write of count sectors from sector s (zeros
// if zero), or a Sync.
type crashOp struct {
	sync     bool
	s, count int64
	zero     bool
}

// crashScript makes a sequence of writes that touch every sector at most once (so each
// sector has exactly one old and one new value), with a Sync in the middle. It draws
// until the script allocates new blocks, writes into blocks allocated before it
// starts (the first four) and into blocks it allocated itself (when a block has more
// than one sector), crosses a block
// boundary and writes zeros.
func crashScript(t *testing.T, spb, blocks int64) []crashOp {
	t.Helper()
	r := newRand(t, uint64(spb))
	for try := 0; try < 1000; try++ {
		used := make([]bool, spb*blocks)
		allocated := map[int64]bool{0: true, 1: true, 2: true, 3: true}
		var ops []crashOp
		var intoOld, intoNew, across, zeros, allocs bool
		for len(ops) < 12 {
			if len(ops) == 6 {
				ops = append(ops, crashOp{sync: true})
				continue
			}
			s := r.Int64N(spb * blocks)
			count := 1 + r.Int64N(min(2*spb+1, 8*spb))
			if s+count > spb*blocks {
				continue
			}
			free := true
			for i := s; i < s+count; i++ {
				free = free && !used[i]
			}
			if !free {
				continue
			}
			op := crashOp{s: s, count: count, zero: r.IntN(4) == 0}
			for i := s; i < s+count; i++ {
				used[i] = true
			}
			first, last := s/spb, (s+count-1)/spb
			across = across || first != last
			zeros = zeros || op.zero
			for b := first; b <= last; b++ {
				switch {
				case b < 4:
					intoOld = true
				case allocated[b]:
					intoNew = true
				default:
					allocs = true
				}
				allocated[b] = true
			}
			ops = append(ops, op)
		}
		// With one sector per block no block can be written twice.
		if intoOld && (intoNew || spb == 1) && across && zeros && allocs {
			return ops
		}
	}
	t.Fatal("no script with every kind of write")
	return nil
}

// TestCrashOrder proves the write order of allocateLocked and syncLocked safe for a
// process that dies after any number of writes. The order under test:
//
//   - allocateLocked: (1) the footer at its new place past the new block, (2) the
//     block's space reserved (fallocate) or, on a file that cannot reserve, its zero
//     bitmap written; a failure there cuts the file back to its old end; then the
//     caller writes (3) the data into the block, which no BAT entry references yet;
//   - writes into allocated blocks go in place, their bitmap bits stay in memory;
//   - syncLocked: fsync, (4) bitmaps, (5) BAT sectors, fsync.
//
// Both kinds of file run: one that reserves and one that cannot.
//
// For budget k = 0, 1, 2, … writes, the script runs against a copy of the image
// through a failFile that refuses everything after the k-th write; then the file is
// reopened read-only. It must open without repair (the footer at the end is valid),
// pass Check without errors, and show for every sector either its value before the
// script or its value after it. The first k at which nothing was refused must show
// only new values.
func TestCrashOrder(t *testing.T) {
	const blocks = 24
	for _, typ := range []DiskType{TypeDynamic, TypeDifferencing} {
		for _, bs := range []int64{512, 4 * kib, 64 * kib} {
			for _, reserving := range []bool{false, true} {
				t.Run(fmt.Sprintf("%v/%d/reserve=%v", typ, bs, reserving), func(t *testing.T) {
					spb := bs / SectorSize
					size := blocks * bs
					dir := t.TempDir()
					r := newRand(t, uint64(bs)+uint64(typ))

					// The image before the script: blocks 0-3 allocated; in a differencing
					// image only every third sector is present, over a parent full of data.
					var template string
					var parent []byte
					if typ == TypeDifferencing {
						pp := createImage(t, dir, "parent.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: bs})
						pimg := openImage(t, pp, true)
						parent = randBytes(r, int(size))
						if _, err := pimg.WriteAt(parent, 0); err != nil {
							t.Fatal(err)
						}
						if err := pimg.Close(); err != nil {
							t.Fatal(err)
						}
						template = createDiff(t, dir, "template.vhd", pp, bs)
					} else {
						template = createImage(t, dir, "template.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: bs})
					}
					img := openImage(t, template, true)
					for s := int64(0); s < 4*spb; s++ {
						if typ == TypeDynamic || s%3 == 0 {
							if _, err := img.WriteAt(randBytes(r, SectorSize), s*SectorSize); err != nil {
								t.Fatal(err)
							}
						}
					}
					if err := img.Close(); err != nil {
						t.Fatal(err)
					}
					img = openImage(t, template, false)
					oldView := view(t, img, parent)
					img.Close()

					ops := crashScript(t, spb, blocks)
					data := make([][]byte, len(ops))
					newView := append([]byte(nil), oldView...)
					for i, op := range ops {
						if op.sync {
							continue
						}
						data[i] = make([]byte, op.count*SectorSize)
						if !op.zero {
							data[i] = randBytes(r, len(data[i]))
						}
						copy(newView[op.s*SectorSize:], data[i])
					}

					work := filepath.Join(dir, "work.vhd")
					for k := 0; ; k++ {
						if k > 10000 {
							t.Fatal("the script never completed")
						}
						copyFile(t, template, work)
						f, err := os.OpenFile(work, os.O_RDWR, 0)
						if err != nil {
							t.Fatal(err)
						}
						ff := &failFile{File: f, budget: k}
						var file File = ff
						if reserving {
							file = reservingFailFile{ff}
						}
						img, err := OpenFile(file, work, true)
						if err != nil {
							t.Fatalf("k=%d: OpenFile: %v", k, err)
						}
						var scriptErr error
						for i, op := range ops {
							if op.sync {
								scriptErr = img.Sync()
							} else {
								_, scriptErr = img.WriteAt(data[i], op.s*SectorSize)
							}
							if scriptErr != nil {
								break
							}
						}
						closeErr := img.Close()
						if scriptErr != nil && !errors.Is(scriptErr, errInjected) || closeErr != nil && !errors.Is(closeErr, errInjected) {
							t.Fatalf("k=%d: unexpected error: %v, %v", k, scriptErr, closeErr)
						}
						completed := !ff.failed
						if completed != (scriptErr == nil && closeErr == nil) {
							t.Fatalf("k=%d: failFile refused a call (%v) but the errors were %v, %v", k, ff.failed, scriptErr, closeErr)
						}

						after, err := Open(work, false)
						if err != nil {
							t.Fatalf("k=%d: reopen after the crash: %v", k, err)
						}
						if st, why := after.FooterState(); st != FooterAtEnd {
							t.Fatalf("k=%d: FooterState = %v (%v), want FooterAtEnd: a crash needs no repair", k, st, why)
						}
						if ps := problems(after.Check(), Error); len(ps) > 0 {
							t.Fatalf("k=%d: Check: %v", k, ps)
						}
						got := view(t, after, parent)
						after.Close()
						for s := int64(0); s < size/SectorSize; s++ {
							g, o, n := got[s*SectorSize:][:SectorSize], oldView[s*SectorSize:][:SectorSize], newView[s*SectorSize:][:SectorSize]
							if !bytes.Equal(g, o) && !bytes.Equal(g, n) {
								t.Fatalf("k=%d: sector %d (block %d) holds neither its old nor its new content", k, s, s/spb)
							}
							if completed && !bytes.Equal(g, n) {
								t.Fatalf("k=%d: the script completed but sector %d (block %d) is not new", k, s, s/spb)
							}
						}
						if completed {
							t.Logf("script of %d steps completed with %d writes; every earlier crash point was safe", len(ops), ff.writes)
							break
						}
					}
				})
			}
		}
	}
}
