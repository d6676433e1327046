package vhdx

import (
	"bytes"
	"errors"
	"testing"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
)

// Punch punches as an *os.File would; it is a step, as a write is.
func (f cutFile) Punch(off, n int64) error {
	if err := f.step(); err != nil {
		return err
	}
	return fileio.PunchFile(f.File, off, n)
}

// TestDiscardCrash cuts a script of discards and writes after every write, punch,
// fsync and truncate: a block dropped (ZERO without a parent, NOT_PRESENT in a
// differencing file), a block over parent data set to ZERO, sectors over parent data
// punched and marked present (in a PARTIALLY_PRESENT block and in a NOT_PRESENT one,
// which gets new space), part of a present block punched, a write into the dropped
// block, and Syncs. Each cut file opens (read-only, replaying its log in memory, and
// writable), Check finds no error, and every sector shows a value it had at some step
// of the script.
func TestDiscardCrash(t *testing.T) {
	type op struct {
		sync, write bool
		off, n      int64
	}
	for _, tc := range []struct {
		kind string
		ops  []op
	}{
		{"dynamic", []op{
			{off: MiB, n: MiB},                     // drop
			{off: 2*MiB + 4096, n: 64 * 1024},      // part of a present block
			{sync: true},                           //
			{write: true, off: MiB + 512, n: 8192}, // into the dropped block
			{off: 5*MiB - 512, n: MiB + 1024},      // a whole block and edges
		}},
		{"differencing", []op{
			{off: 0, n: MiB},                        // drop, nothing below
			{off: 4 * MiB, n: MiB},                  // ZERO over parent data
			{off: 5*MiB + 512, n: 8192},             // bits over parent data, PARTIALLY_PRESENT
			{off: 7*MiB + 1024, n: 16384},           // bits over parent data, a new block
			{sync: true},                            //
			{write: true, off: 4096, n: 4096},       // into the dropped block
			{off: MiB + 4096, n: 3 * 4096},          // part of a partial block, nothing below
			{off: 6 * MiB, n: MiB},                  // a ZERO block stays ZERO
			{write: true, off: 4*MiB + 512, n: 512}, // into the ZERO block
		}},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			b, parent, below := discardImage(tc.kind)
			base := writeFile(t, b.build())
			var views [][]byte
			var final []byte
			for k := 0; ; k++ {
				p, img, _ := openCut(t, base, k)
				if views == nil {
					cur := viewOver(t, img, parent)
					views = [][]byte{bytes.Clone(cur)}
					for i, o := range tc.ops {
						switch {
						case o.sync:
							continue
						case o.write:
							copy(cur[o.off:o.off+o.n], fill(o.n, byte(0x50+i)))
						default:
							clear(cur[o.off : o.off+o.n])
						}
						views = append(views, bytes.Clone(cur))
					}
					final = cur
				}
				cut := false
				for i, o := range tc.ops {
					var err error
					switch {
					case o.sync:
						err = img.Sync()
					case o.write:
						_, err = img.WriteAt(fill(o.n, byte(0x50+i)), o.off)
					default:
						err = img.Discard(o.off, o.n, below)
					}
					if err != nil {
						if !errors.Is(err, errCut) {
							t.Fatalf("cut after %d: op %d: %v", k, i, err)
						}
						cut = true
						break
					}
				}
				if err := img.Sync(); !cut && err != nil {
					if !errors.Is(err, errCut) {
						t.Fatalf("cut after %d: sync: %v", k, err)
					}
					cut = true
				}
				img.Close()
				ro, err := Open(p, false)
				if err != nil {
					t.Fatalf("cut after %d: the file does not open: %v", k, err)
				}
				got := viewOver(t, ro, parent)
				for _, pr := range problems(t, ro) {
					if pr.Severity >= image.Error {
						t.Fatalf("cut after %d: Check: %v", k, pr)
					}
				}
				ro.Close()
				for s := int64(0); s < int64(len(got))/512; s++ {
					g, ok := got[s*512:(s+1)*512], false
					for _, v := range views {
						ok = ok || bytes.Equal(g, v[s*512:(s+1)*512])
					}
					if !ok {
						t.Fatalf("cut after %d: sector %d (block %d) holds a value it never had", k, s, s*512/MiB)
					}
				}
				rw, err := Open(p, true)
				if err != nil {
					t.Fatalf("cut after %d: a writable open fails: %v", k, err)
				}
				if !bytes.Equal(viewOver(t, rw, parent), got) {
					t.Fatalf("cut after %d: replaying into the file shows another view", k)
				}
				rw.Close()
				if !cut {
					if !bytes.Equal(got, final) {
						t.Fatal("uncut: the view differs from the model")
					}
					t.Logf("%d cut points", k)
					return
				}
			}
		})
	}
}
