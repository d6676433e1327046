package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdfs/vhdfs/internal/fileio"
)

// Punch punches as an *os.File would; it counts as a write.
func (f *failFile) Punch(off, n int64) error {
	if f.spent() {
		f.failed = true
		return errInjected
	}
	f.writes++
	return fileio.PunchFile(f.File, off, n)
}

// discardOp is one step of a discard script: a Discard of count sectors from s, a
// write of random data there (write), or a Sync.
type discardOp struct {
	sync, write bool
	s, count    int64
}

// TestDiscardCrash cuts a script of discards and writes after every k-th write,
// punch, fsync and truncate, as TestCrashOrder does for writes. The script drops a
// whole block with nothing below, punches part of an allocated block, marks sectors
// over parent data present with their data punched (in an allocated block and in a
// new one), writes into the dropped block again (a new block, elsewhere), and ends
// with a Sync. After every cut the file opens without repair, Check finds no
// error, and every sector shows a value it had at some step of the script: never
// parent data where the top had data, never anything else.
func TestDiscardCrash(t *testing.T) {
	const blocks = 16
	for _, typ := range []DiskType{TypeDynamic, TypeDifferencing} {
		for _, bs := range []int64{4 * kib, 64 * kib} {
			t.Run(fmt.Sprintf("%v/%d", typ, bs), func(t *testing.T) {
				spb := bs / SectorSize
				size := blocks * bs
				dir := t.TempDir()
				r := newRand(t, uint64(bs)+uint64(typ)+18)
				var template string
				var parent []byte
				var below func(off, n int64) (bool, error)
				if typ == TypeDifferencing {
					// The parent holds data in blocks 8-15 only.
					pp := createImage(t, dir, "parent.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: bs})
					pimg := openImage(t, pp, true)
					parent = make([]byte, size)
					copy(parent[8*bs:], randBytes(r, int(8*bs)))
					if _, err := pimg.WriteAt(parent[8*bs:], 8*bs); err != nil {
						t.Fatal(err)
					}
					if err := pimg.Close(); err != nil {
						t.Fatal(err)
					}
					template = createDiff(t, dir, "template.vhd", pp, bs)
					below = parentBlocks(bs, 8, 16)
				} else {
					template = createImage(t, dir, "template.vhd", CreateOptions{Type: TypeDynamic, Size: size, ExactSize: true, BlockSize: bs})
				}
				// Blocks 0-3 and 8-9 allocated; in a differencing image every third
				// sector is present.
				img := openImage(t, template, true)
				for _, b := range []int64{0, 1, 2, 3, 8, 9} {
					for s := b * spb; s < (b+1)*spb; s++ {
						if typ == TypeDynamic || s%3 == 0 {
							if _, err := img.WriteAt(randBytes(r, SectorSize), s*SectorSize); err != nil {
								t.Fatal(err)
							}
						}
					}
				}
				if err := img.Close(); err != nil {
					t.Fatal(err)
				}
				img = openImage(t, template, false)
				views := [][]byte{view(t, img, parent)}
				img.Close()

				half := max(spb/2, 1)
				ops := []discardOp{
					{s: 1 * spb, count: spb},                            // drop a block, nothing below
					{s: 2*spb + spb/4, count: half},                     // part of an allocated block, nothing below
					{s: 9*spb + spb/4, count: half},                     // sectors over parent data, allocated block
					{s: 12*spb + spb/4, count: half},                    // sectors over parent data, a new block
					{s: 8 * spb, count: spb},                            // a whole block over parent data
					{sync: true},                                        //
					{write: true, s: spb + spb/4, count: half},          // into the dropped block
					{s: 3*spb + spb/2, count: spb},                      // across a block boundary
					{s: 14*spb + spb - half, count: 2*spb - spb + half}, // to the end
				}
				data := make([][]byte, len(ops))
				cur := bytes.Clone(views[0])
				for i, op := range ops {
					if op.sync {
						continue
					}
					b := cur[op.s*SectorSize : (op.s+op.count)*SectorSize]
					if op.write {
						data[i] = randBytes(r, len(b))
						copy(b, data[i])
					} else {
						clear(b)
					}
					views = append(views, bytes.Clone(cur))
				}
				final := cur

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
					img, err := OpenFile(reservingFailFile{ff}, work, true)
					if err != nil {
						t.Fatalf("k=%d: OpenFile: %v", k, err)
					}
					var scriptErr error
					for i, op := range ops {
						switch {
						case op.sync:
							scriptErr = img.Sync()
						case op.write:
							_, scriptErr = img.WriteAt(data[i], op.s*SectorSize)
						default:
							scriptErr = img.Discard(op.s*SectorSize, op.count*SectorSize, below)
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

					after, err := Open(work, false)
					if err != nil {
						t.Fatalf("k=%d: reopen after the crash: %v", k, err)
					}
					if st, why := after.FooterState(); st != FooterAtEnd {
						t.Fatalf("k=%d: FooterState = %v (%v), want FooterAtEnd", k, st, why)
					}
					if ps := problems(after.Check(), Error); len(ps) > 0 {
						t.Fatalf("k=%d: Check: %v", k, ps)
					}
					got := view(t, after, parent)
					after.Close()
					for s := int64(0); s < size/SectorSize; s++ {
						g := got[s*SectorSize:][:SectorSize]
						ok := false
						for _, v := range views {
							ok = ok || bytes.Equal(g, v[s*SectorSize:][:SectorSize])
						}
						if !ok {
							t.Fatalf("k=%d: sector %d (block %d) holds a value it never had", k, s, s/spb)
						}
					}
					if completed {
						if !bytes.Equal(got, final) {
							t.Fatalf("k=%d: the script completed but the view is not the model at %d", k, firstDiff(got, final))
						}
						t.Logf("script completed with %d writes; every earlier cut was safe", ff.writes)
						break
					}
				}
			})
		}
	}
}
