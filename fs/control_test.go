package fs

import (
	"context"
	"io"
	"log"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/vhd"
)

// newTestControl opens a chain of a dynamic base and a child with data in the child,
// and returns the control of a Root serving it (not mounted: the commands are called
// directly) whose merges call hook at each point.
func newTestControl(t *testing.T, hook func(string)) *control {
	t.Helper()
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.vhd"), filepath.Join(dir, "top.vhd")
	if err := vhd.Create(base, vhd.CreateOptions{Type: vhd.TypeDynamic, Size: 8 << 20, ExactSize: true}); err != nil {
		t.Fatal(err)
	}
	testChild(t, base, top)
	c, err := chain.Open(top, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.WriteAt(make([]byte, 4<<20), 0); err != nil {
		t.Fatal(err)
	}
	r := NewRoot(c, Options{MergeHook: hook, Logger: log.New(io.Discard, "", 0)})
	return r.ctl
}

// TestAbortRetry: an abort whose writer is interrupted still stops the merge, and its
// retry gets the result of the merge it stopped, not "no merge running".
func TestAbortRetry(t *testing.T) {
	reached, release := make(chan struct{}), make(chan struct{})
	c := newTestControl(t, func(p string) {
		if p == "copy-start" {
			close(reached)
			<-release
		}
	})
	j, e := c.command(context.Background(), "merge")
	if e != 0 || j == nil {
		t.Fatalf("merge: %v", e)
	}
	<-reached
	interrupted, cancel := context.WithCancel(context.Background())
	cancel()
	if e := c.abort(interrupted, "abort"); e != syscall.EINTR {
		t.Fatalf("interrupted abort: %v, want EINTR", e)
	}
	// Busy meanwhile, whatever else comes.
	if _, e := c.command(context.Background(), "snapshot x.vhd"); e != syscall.EBUSY {
		t.Errorf("snapshot while the merge is aborting: %v, want EBUSY", e)
	}
	close(release)
	<-j.finished
	if j.errno != syscall.ECANCELED {
		t.Errorf("the merge after the abort: %v (%s), want ECANCELED", j.errno, j.message)
	}
	if e := c.abort(context.Background(), "abort"); e != 0 {
		t.Fatalf("retried abort: %v", e)
	}
	st, err := c.status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Last == nil || st.Last.Message != "merge aborted; the chain is as it was" {
		t.Errorf("retried abort said %+v, want the result of the merge it stopped", st.Last)
	}
	// Once told, a further abort has nothing to say of it.
	c.abort(context.Background(), "abort")
	if st, _ := c.status(); st.Last == nil || st.Last.Message != "no merge running" || st.State != "idle" {
		t.Errorf("a third abort: %+v, state %s", st.Last, st.State)
	}
}

// testChild creates top, an empty differencing VHD on base.
func testChild(t *testing.T, base, top string) {
	t.Helper()
	parent, err := vhd.Open(base, false)
	if err != nil {
		t.Fatal(err)
	}
	err = vhd.Create(top, vhd.CreateOptions{Type: vhd.TypeDifferencing, Parent: parent, ParentPath: base})
	parent.Close()
	if err != nil {
		t.Fatal(err)
	}
}
