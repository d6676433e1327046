package fs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/merge"
)

// maxCommand bounds one write to control.
const maxCommand = 256

// control is the state behind the control file: one merge at a time, its progress,
// and the result of the last command.
type control struct {
	root *Root

	mu        sync.Mutex
	state     string        // guarded by mu: "idle", "merging", "aborting" or "snapshotting"
	running   string        // guarded by mu: the merge command running
	cancel    func()        // guarded by mu: aborts the running merge
	finished  chan struct{} // guarded by mu: closed when the running merge ends
	job       *mergeJob     // guarded by mu: the running merge
	unclaimed *mergeJob     // guarded by mu: the last merge, finished, if no writer got its result yet
	last      *lastResult   // guarded by mu
	detached  []string      // guarded by mu: images merged away, no longer in the chain

	done, total atomic.Int64 // progress of the running merge
}

type lastResult struct {
	Command string `json:"command"`
	Errno   int    `json:"errno"`
	Error   string `json:"error,omitempty"`
	Message string `json:"message"`
	Time    string `json:"time"`
}

func newControl(r *Root) *control { return &control{root: r, state: "idle"} }

// Status is what reading control returns.
type Status struct {
	PID      int               `json:"pid"`
	ReadOnly bool              `json:"read_only"`
	State    string            `json:"state"`
	Running  string            `json:"running,omitempty"`
	Progress *Progress         `json:"progress,omitempty"`
	Chain    []chain.LayerInfo `json:"chain"`
	Detached []string          `json:"detached,omitempty"`
	Last     *lastResult       `json:"last,omitempty"`
	Errors   []string          `json:"errors,omitempty"` // the latest I/O errors, oldest first
}

// Progress of a running merge in bytes.
type Progress struct {
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
}

func (c *control) status() Status {
	c.mu.Lock()
	st := Status{PID: pid, ReadOnly: c.root.opts.ReadOnly, State: c.state, Running: c.running, Last: c.last,
		Detached: append([]string(nil), c.detached...), Errors: c.root.recentErrors()}
	if c.job != nil {
		st.Progress = &Progress{Done: c.done.Load(), Total: c.total.Load()}
	}
	c.mu.Unlock()
	for i, l := range c.root.chain.Layers() {
		st.Chain = append(st.Chain, chain.DescribeLayer(i, l))
	}
	return st
}

// record keeps the result of a command for the status and returns its errno.
func (c *control) record(cmd string, err error, msg string) syscall.Errno {
	if err != nil && msg == "" {
		msg = err.Error()
	}
	return c.recordErrno(cmd, c.root.errno("control "+cmd, err), msg)
}

func (c *control) recordErrno(cmd string, e syscall.Errno, msg string) syscall.Errno {
	r := &lastResult{Command: cmd, Errno: int(e), Message: msg, Time: time.Now().UTC().Format(time.RFC3339)}
	if e != 0 {
		r.Error = e.Error()
	}
	c.mu.Lock()
	c.last = r
	c.mu.Unlock()
	return e
}

var pid = os.Getpid()

// command runs one line written to control. sync and abort are done when it returns;
// a merge is started and returned as a job.
func (c *control) command(line string) (*mergeJob, syscall.Errno) {
	fields := strings.Fields(line)
	if len(fields) == 0 {
		return nil, c.record(line, fmt.Errorf("empty command: %w", errInvalid), "")
	}
	switch fields[0] {
	case "sync":
		if len(fields) > 1 {
			return nil, c.record(line, fmt.Errorf("sync takes no arguments: %w", errInvalid), "")
		}
		if c.root.opts.ReadOnly {
			return nil, c.record(line, nil, "read-only mount: nothing to sync")
		}
		err := c.root.chain.Sync()
		return nil, c.record(line, err, "synced")
	case "abort":
		if len(fields) > 1 {
			return nil, c.record(line, fmt.Errorf("abort takes no arguments: %w", errInvalid), "")
		}
		c.mu.Lock()
		cancel, job := c.cancel, c.job
		if cancel == nil {
			c.unclaimed = nil // an abort, even a late one, is an answer to the last merge
		}
		c.mu.Unlock()
		if cancel == nil {
			return nil, c.record(line, nil, "no merge running")
		}
		cancel()
		c.mu.Lock()
		if c.state == "merging" {
			c.state = "aborting"
		}
		c.mu.Unlock()
		<-job.finished
		// Whoever aborts learns the result: a later write of the merge starts it anew.
		c.mu.Lock()
		if c.unclaimed == job {
			c.unclaimed = nil
		}
		c.mu.Unlock()
		if job.errno != syscall.ECANCELED {
			// Past the copy a merge no longer stops: it had finished (or failed).
			return nil, c.record(line, nil, "too late to abort: "+job.message)
		}
		return nil, c.record(line, nil, "merge aborted; the chain is as it was")
	case "merge":
		opts, err := parseMerge(fields[1:])
		if err != nil {
			return nil, c.record(line, err, "")
		}
		return c.startMerge(line, opts)
	case "snapshot":
		name := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "snapshot"))
		return nil, c.snapshot(line, name)
	}
	return nil, c.record(line, fmt.Errorf("unknown command %q (want merge, abort, sync or snapshot): %w", fields[0], errInvalid), "")
}

func parseMerge(args []string) (merge.Options, error) {
	opts := merge.Options{Depth: 1}
	seen := map[string]bool{}
	for _, a := range args {
		k, v, ok := strings.Cut(a, "=")
		if !ok || seen[k] {
			return opts, fmt.Errorf("merge argument %q: want depth=N or from=S, once each: %w", a, errInvalid)
		}
		seen[k] = true
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > chain.MaxDepth {
			return opts, fmt.Errorf("merge %s=%q is not a number from 0 to %d: %w", k, v, chain.MaxDepth, errInvalid)
		}
		switch k {
		case "depth":
			if n < 1 {
				// Validate takes depth 0 for "default"; here it is a mistake.
				return opts, fmt.Errorf("merge depth=%d: depth must be at least 1: %w", n, errInvalid)
			}
			opts.Depth = n
		case "from":
			if n < 1 {
				return opts, fmt.Errorf("merge from=%d: from must be at least 1 (from the top is plain merge depth=N): %w", n, errInvalid)
			}
			opts.From = n
		default:
			return opts, fmt.Errorf("merge argument %q: want depth=N or from=S: %w", k, errInvalid)
		}
	}
	return opts, nil
}

// mergeJob is a merge started by a write to control; the write waits for it, and so
// do writes of the same command that join it.
type mergeJob struct {
	line     string // the command as written
	finished chan struct{}
	errno    syscall.Errno // set before finished is closed
	message  string        // likewise
	ended    time.Time     // likewise
}

// unclaimedFor is how long the result of a merge that no writer received (each was
// interrupted) waits for a retry of the same command, which gets it instead of
// starting that merge again.
const unclaimedFor = time.Minute

// wait returns the merge's errno once it is done, or EINTR if ctx (the writing
// request) is interrupted first; the merge goes on either way. A writer that gets
// the result claims it: a later write of the same command starts a new merge.
func (c *control) wait(ctx context.Context, j *mergeJob) syscall.Errno {
	select {
	case <-j.finished: // a result that is there is given, even to an interrupted writer
	default:
		select {
		case <-j.finished:
		case <-ctx.Done():
			return syscall.EINTR
		}
	}
	c.mu.Lock()
	if c.unclaimed == j {
		c.unclaimed = nil
	}
	c.mu.Unlock()
	return j.errno
}

func (c *control) startMerge(line string, opts merge.Options) (*mergeJob, syscall.Errno) {
	if c.root.opts.ReadOnly {
		return nil, c.record(line, fmt.Errorf("read-only mount: %w", chain.ErrReadOnly), "")
	}
	// A retry joins its merge, or gets its unclaimed result, before the command is
	// checked against the chain: the merge it repeats changed the chain's length.
	c.mu.Lock()
	if c.state != "idle" {
		if c.job != nil && c.job.line == line {
			// The same command again, from any open: a script's retry after EINTR.
			job := c.job
			c.mu.Unlock()
			return job, 0
		}
		c.mu.Unlock()
		return nil, c.record(line, fmt.Errorf("%s is running: %w", c.busyWith(), errBusy), "")
	}
	if u := c.unclaimed; u != nil {
		if u.line == line && time.Since(u.ended) < unclaimedFor {
			// The retry came after the merge ended: it gets the result nobody got.
			// It stays unclaimed until wait gives it (this retry may be interrupted
			// too, and the next one must not start the merge again).
			c.mu.Unlock()
			return u, 0
		}
		c.unclaimed = nil
	}
	if err := opts.Validate(c.root.chain.Len()); err != nil {
		c.mu.Unlock()
		return nil, c.record(line, fmt.Errorf("%v: %w", err, errInvalid), "")
	}
	// The merge's own context: not the request's, which any signal interrupts.
	mctx, cancel := context.WithCancel(context.Background())
	job := &mergeJob{line: line, finished: make(chan struct{})}
	c.state, c.running, c.cancel, c.finished, c.job = "merging", line, cancel, job.finished, job
	c.done.Store(0)
	c.total.Store(0)
	c.mu.Unlock()
	c.recordErrno(line, 0, "started")
	c.root.opts.Logger.Printf("%s: started", line)

	opts.Progress = func(done, total int64) {
		c.done.Store(done)
		c.total.Store(total)
	}
	opts.Logf = c.root.debugf
	opts.Hook = c.root.opts.MergeHook
	go func() {
		res, err := merge.Merge(mctx, c.root.chain, opts)
		cancel()
		switch {
		case errors.Is(err, context.Canceled):
			job.message = "aborted; the chain is as it was"
			job.errno = c.recordErrno(line, syscall.ECANCELED, job.message)
		case err != nil:
			// Whatever stops a merge is EIO for the writer; the message says why.
			job.message = "merge failed: " + err.Error()
			job.errno = c.recordErrno(line, syscall.EIO, job.message)
		default:
			job.message = res.Message()
			c.recordErrno(line, 0, job.message)
		}
		c.root.opts.Logger.Printf("%s: %s", line, map[bool]string{true: "done: ", false: ""}[err == nil]+job.message)
		job.ended = time.Now()
		c.mu.Lock()
		if res != nil {
			c.detached = append(c.detached, res.Detached...)
		}
		c.state, c.running, c.cancel, c.finished, c.job = "idle", "", nil, nil, nil
		c.unclaimed = job
		c.mu.Unlock()
		close(job.finished)
	}()
	return job, 0
}

// busyWith names what runs; the caller holds mu.
func (c *control) busyWith() string {
	if c.running != "" {
		return c.running
	}
	return c.state
}

// snapshot makes name (relative to the top's directory unless absolute) a new empty
// differencing image on the top and the top of the chain. It is refused while a merge
// runs; a merge is refused while it runs.
func (c *control) snapshot(line, name string) syscall.Errno {
	if name == "" {
		return c.record(line, fmt.Errorf("snapshot takes the path of the new image: %w", errInvalid), "")
	}
	if c.root.opts.ReadOnly {
		return c.record(line, fmt.Errorf("read-only mount: %w", chain.ErrReadOnly), "")
	}
	top := c.root.chain.Layers()[0]
	if !filepath.IsAbs(name) {
		name = filepath.Join(filepath.Dir(chain.Abs(top.Path)), name)
	}
	name = filepath.Clean(name)
	c.mu.Lock()
	if c.state != "idle" {
		defer c.mu.Unlock()
		return c.record(line, fmt.Errorf("%s is running: %w", c.busyWith(), errBusy), "")
	}
	c.state = "snapshotting"
	c.mu.Unlock()
	_, err := c.root.chain.Snapshot(name)
	c.mu.Lock()
	c.state = "idle"
	c.mu.Unlock()
	if err != nil {
		if errors.Is(err, chain.ErrTooDeep) || errors.Is(err, chain.ErrPending) {
			err = fmt.Errorf("%w: %w", err, errInvalid)
		}
		c.root.opts.Logger.Printf("%s: %v", line, err)
		return c.record(line, err, "")
	}
	msg := fmt.Sprintf("snapshot %s made; it is the top, %s below it is read-only", name, top.Path)
	c.root.opts.Logger.Printf("%s: %s", line, msg)
	return c.record(line, nil, msg)
}

// waitIdle blocks until no merge runs.
func (c *control) waitIdle() {
	c.mu.Lock()
	f := c.finished
	c.mu.Unlock()
	if f != nil {
		<-f
	}
}

// controlNode is the control file: each open reads a fresh JSON snapshot; each
// write is one command.
type controlNode struct {
	fs.Inode
	root *Root
}

type controlHandle struct {
	content []byte

	mu      sync.Mutex
	job     *mergeJob // guarded by mu: the merge this handle's write started
	jobLine string    // guarded by mu: the command that started it
}

var _ = (fs.NodeGetattrer)((*controlNode)(nil))

func (n *controlNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.root.fillAttr(&out.Attr, true)
	if h, ok := fh.(*controlHandle); ok {
		out.Size = uint64(len(h.content))
	}
	return 0
}

var _ = (fs.NodeOpener)((*controlNode)(nil))

func (n *controlNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	b, err := json.MarshalIndent(n.root.ctl.status(), "", "  ")
	if err != nil {
		return nil, 0, n.root.errno("control status", err)
	}
	return &controlHandle{content: append(b, '\n')}, fuse.FOPEN_DIRECT_IO, 0
}

var _ = (fs.NodeReader)((*controlNode)(nil))

func (n *controlNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, ok := fh.(*controlHandle)
	if !ok {
		return nil, syscall.EBADF
	}
	if off >= int64(len(h.content)) {
		return fuse.ReadResultData(nil), 0
	}
	return fuse.ReadResultData(h.content[off:min(off+int64(len(dest)), int64(len(h.content)))]), 0
}

var _ = (fs.NodeWriter)((*controlNode)(nil))

func (n *controlNode) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if len(data) > maxCommand {
		return 0, n.root.ctl.record(fmt.Sprintf("(%d bytes)", len(data)), fmt.Errorf("command of %d bytes exceeds %d: %w", len(data), maxCommand, errInvalid), "")
	}
	line := strings.TrimRight(string(data), "\n")
	if strings.ContainsAny(line, "\n\x00") {
		return 0, n.root.ctl.record(strconv.Quote(line), fmt.Errorf("one command per write: %w", errInvalid), "")
	}
	n.root.debugf("control: %q", line)
	h, _ := fh.(*controlHandle)
	job := h.ownJob(line)
	var e syscall.Errno
	if job == nil {
		// A merge command joins the running merge of the same command, or gets the
		// unclaimed result of the last one (see startMerge).
		job, e = n.root.ctl.command(line)
	}
	if e == 0 && job != nil {
		// The write returns when the merge is done. An interrupted writer gets EINTR
		// and the merge goes on; `abort` stops it (ECANCELED). Go retries a write on
		// EINTR, and any signal, even the SIGURG of Go's scheduler, interrupts one.
		h.setJob(job, line)
		e = n.root.ctl.wait(ctx, job)
	}
	if e != 0 {
		return 0, e
	}
	return uint32(len(data)), 0
}

// ownJob returns the merge this handle's earlier write of line started or joined,
// running or not: the same write again after EINTR gets that merge's result.
func (h *controlHandle) ownJob(line string) *mergeJob {
	if h == nil {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.job == nil || h.jobLine != line {
		return nil
	}
	return h.job
}

func (h *controlHandle) setJob(job *mergeJob, line string) {
	if h == nil {
		return
	}
	h.mu.Lock()
	h.job, h.jobLine = job, line
	h.mu.Unlock()
}

var _ = (fs.NodeSetattrer)((*controlNode)(nil))

// Setattr accepts the truncate of `echo cmd > control` and nothing changes.
func (n *controlNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if e := setattrErrno(in); e != 0 {
		return e
	}
	return n.Getattr(ctx, fh, out)
}
