package test

import (
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDiscardDuringMerge: punches and writes into disk.raw go on while `merge
// from=1` copies the middle of a three-image chain into the base (they take the
// writes' lock, so they neither wait for that merge nor tear it), then across a live
// snapshot (the old top, now below, holds data the new top must hide with zeros).
// disk.raw shows the model throughout, and afterwards check is clean and export and
// a merge of the snapshot keep the view.
func TestDiscardDuringMerge(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "32M"}, Writes: 30, Seed: 1807})
		model := c.Model()
		top := c.Top()
		env, reached, resume := pausePoint(t, "copy-start")
		mnt := mountEnv(t, top, []string{env})
		disk := filepath.Join(mnt, "disk.raw")
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		gen := newWriteGen(1808, c.Size, 512, 3<<20)
		var mu sync.Mutex // guards model and gen while the writer runs
		step := 0
		some := func(n int) {
			for range n {
				mu.Lock()
				w := gen.next()
				step++
				if step%2 == 0 {
					off, k := w.Off+int64(step%7)*111, int64(len(w.Data))
					if err := unix.Fallocate(int(f.Fd()), punchMode, off, k); err != nil {
						mu.Unlock()
						t.Errorf("punch %d bytes at %d: %v", k, off, err)
						return
					}
					clear(model[off:min(off+k, c.Size)])
				} else {
					if _, err := f.WriteAt(w.Data, w.Off); err != nil {
						mu.Unlock()
						t.Errorf("write %v: %v", w, err)
						return
					}
					copy(model[w.Off:], w.Data)
				}
				mu.Unlock()
			}
		}
		some(10)
		done := make(chan syscall.Errno, 1)
		go func() { done <- control(mnt, "merge from=1 depth=1") }()
		reached()
		some(30) // the merge is under way
		stop, writerDone := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(writerDone)
			for {
				select {
				case <-stop:
					return
				default:
					some(1)
				}
			}
		}()
		resume()
		e := <-done
		close(stop)
		<-writerDone
		if e != 0 {
			t.Fatalf("merge from=1 depth=1: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		assertSameBytes(t, "disk.raw after the merge", fileBytes(t, disk), model)

		snap := imageName(format, "snap", true)
		if e := control(mnt, "snapshot "+snap); e != 0 {
			t.Fatalf("snapshot: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		some(30) // the old top is below now
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		assertSameBytes(t, "disk.raw after the snapshot", fileBytes(t, disk), model)
		// This merge stops at the failpoint too.
		go func() { done <- control(mnt, "merge") }()
		reached()
		resume()
		if e := <-done; e != 0 {
			t.Fatalf("merge of the snapshot: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		assertSameBytes(t, "disk.raw after merging the snapshot", fileBytes(t, disk), model)
		f.Close()
		mustVhdfs(t, "umount", mnt)
		snapPath := filepath.Join(filepath.Dir(top), snap)
		mCheck(t, snapPath)
		assertFileEquals(t, exportImage(t, snapPath), model)
	})
}
