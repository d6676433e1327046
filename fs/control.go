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
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/merge"
	"github.com/vhdfs/vhdfs/probe"
)

// maxCommand bounds one write to control.
const maxCommand = 256

// control is the state behind the control file: one merge or snapshot at a time, its
// progress, and the result of the last command. One goroutine (run) owns the state:
// the FUSE handlers and the jobs hand it closures (ask) that read or change the state
// and return at once, never blocking. So no lock is held across a call that may come
// back to it, and a command that cannot run now is refused (EBUSY), not queued.
type control struct {
	root *Root
	reqs chan func(*ctlState)

	done, total atomic.Int64 // progress of the running merge
}

// ctlState is the control state; only the goroutine run touches it.
type ctlState struct {
	state     string // "idle", "merging", "aborting" or "snapshotting"
	job       *job   // the running merge or snapshot
	cancel    func() // aborts the running merge
	unclaimed *job   // the last job, finished, if no writer got its result yet
	aborted   *job   // the merge an abort stopped, until that abort got its result
	last      *lastResult
	detached  []string // images merged away, no longer in the chain
}

type lastResult struct {
	Command string `json:"command"`
	Errno   int    `json:"errno"`
	Error   string `json:"error,omitempty"`
	Message string `json:"message"`
	Time    string `json:"time"`
}

func newControl(r *Root) *control {
	c := &control{root: r, reqs: make(chan func(*ctlState))}
	go c.run()
	return c
}

// run owns the control state for the life of the mount.
func (c *control) run() {
	s := &ctlState{state: "idle"}
	for f := range c.reqs {
		f(s)
	}
}

// askTimeout bounds how long a request waits for the owner to take its question.
// The owner only runs closures that return at once: past this, something is wrong,
// and the request fails with a line in the log instead of hanging.
const askTimeout = 10 * time.Second

// ask runs f on the owner of the state and returns once it has run; false (with a
// log line) if the owner did not take f within askTimeout, when f never runs. f
// must not block.
func (c *control) ask(f func(*ctlState)) bool {
	ran := make(chan struct{})
	t := time.NewTimer(askTimeout)
	defer t.Stop()
	select {
	case c.reqs <- func(s *ctlState) { f(s); close(ran) }:
	case <-t.C:
		c.root.logError(fmt.Sprintf("control: the control state's owner did not answer within %v", askTimeout))
		return false
	}
	<-ran // taken: f runs now, and returns at once
	return true
}

// errStuck is the answer when the owner did not take a request (see ask).
var errStuck = fmt.Errorf("control state did not answer within %v: %w", askTimeout, errBusy)

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

func (c *control) status() (Status, error) {
	st := Status{PID: pid, ReadOnly: c.root.opts.ReadOnly}
	if !c.ask(func(s *ctlState) {
		st.State, st.Last, st.Detached = s.state, s.last, append([]string(nil), s.detached...)
		if s.job != nil {
			st.Running = s.job.line
			if s.job.merge {
				st.Progress = &Progress{Done: c.done.Load(), Total: c.total.Load()}
			}
		}
	}) {
		return st, errStuck
	}
	st.Errors = c.root.recentErrors()
	for i, l := range c.root.chain.Layers() {
		st.Chain = append(st.Chain, chain.DescribeLayer(i, l))
	}
	return st, nil
}

// record keeps the result of a command for the status and returns its errno.
func (c *control) record(cmd string, err error, msg string) syscall.Errno {
	if err != nil && msg == "" {
		msg = err.Error()
	}
	return c.recordErrno(cmd, c.root.errno("control "+cmd, err), msg)
}

func (c *control) recordErrno(cmd string, e syscall.Errno, msg string) syscall.Errno {
	r := result(cmd, e, msg)
	c.ask(func(s *ctlState) { s.last = r })
	return e
}

func result(cmd string, e syscall.Errno, msg string) *lastResult {
	r := &lastResult{Command: cmd, Errno: int(e), Message: msg, Time: time.Now().UTC().Format(time.RFC3339)}
	if e != 0 {
		r.Error = e.Error()
	}
	return r
}

var pid = os.Getpid()

// command runs one line written to control. sync and abort are done when it returns
// (an abort waits for the merge to stop, or for ctx); a merge or a snapshot is
// started and returned as a job.
func (c *control) command(ctx context.Context, line string) (*job, syscall.Errno) {
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
		return nil, c.abort(ctx, line)
	case "merge":
		opts, err := parseMerge(fields[1:])
		if err != nil {
			return nil, c.record(line, err, "")
		}
		return c.startMerge(line, opts)
	case "snapshot":
		name := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "snapshot"))
		return c.startSnapshot(line, name)
	}
	return nil, c.record(line, fmt.Errorf("unknown command %q (want merge, abort, sync or snapshot): %w", fields[0], errInvalid), "")
}

// abort stops the running merge and waits until it has stopped (or ctx ends: EINTR,
// and the merge stops all the same). A retry of an interrupted abort gets the
// result of the merge it stopped, as a retried merge does. A snapshot is not
// stopped: it is over in a moment.
func (c *control) abort(ctx context.Context, line string) syscall.Errno {
	var j *job
	var cancel func()
	if !c.ask(func(s *ctlState) {
		j, cancel = s.job, s.cancel
		if cancel == nil {
			s.unclaimed = nil // an abort, even a late one, is an answer to the last merge
			if a := s.aborted; a != nil && time.Since(a.ended) < unclaimedFor {
				j = a // the merge an interrupted abort stopped
			}
			s.aborted = nil
			return
		}
		if s.state == "merging" {
			s.state = "aborting"
		}
		s.aborted = j
	}) {
		return c.root.errno("control "+line, errStuck)
	}
	if cancel == nil && (j == nil || !j.merge) {
		msg := "no merge running"
		if j != nil {
			msg += fmt.Sprintf(" (%q is being made; a snapshot is not aborted)", j.line)
		}
		return c.record(line, nil, msg)
	}
	if cancel != nil {
		cancel()
		select {
		case <-j.finished:
		case <-ctx.Done():
			return syscall.EINTR
		}
	}
	// Whoever aborts learns the result: a later write of the merge starts it anew.
	c.claim(j, true)
	if j.errno != syscall.ECANCELED {
		// Past the copy a merge no longer stops: it had finished (or failed).
		return c.record(line, nil, "too late to abort: "+j.message)
	}
	return c.record(line, nil, "merge aborted; the chain is as it was")
}

func parseMerge(args []string) (merge.Options, error) {
	opts := merge.Options{Depth: 1}
	seen := map[string]bool{}
	for _, a := range args {
		if a == "delete" {
			// Remove the images the completed merge left invalid (merge.Options.Delete).
			if opts.Delete {
				return opts, fmt.Errorf("merge argument %q: want depth=N, from=S or delete, once each: %w", a, errInvalid)
			}
			opts.Delete = true
			continue
		}
		k, v, ok := strings.Cut(a, "=")
		if !ok || seen[k] {
			return opts, fmt.Errorf("merge argument %q: want depth=N, from=S or delete, once each: %w", a, errInvalid)
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
			return opts, fmt.Errorf("merge argument %q: want depth=N, from=S or delete: %w", k, errInvalid)
		}
	}
	return opts, nil
}

// job is a merge or a snapshot started by a write to control; the write waits for
// it, and so do writes of the same command that join it.
type job struct {
	line     string // the command as written
	merge    bool   // a merge (else a snapshot)
	finished chan struct{}
	errno    syscall.Errno // set before finished is closed
	message  string        // likewise
	ended    time.Time     // likewise
}

// unclaimedFor is how long the result of a job that no writer received (each was
// interrupted) waits for a retry of the same command, which gets it instead of
// starting that job again.
const unclaimedFor = time.Minute

// wait returns the job's errno once it is done, or EINTR if ctx (the writing
// request) is interrupted first; the job goes on either way. A writer that gets
// the result claims it: a later write of the same command starts a new job.
func (c *control) wait(ctx context.Context, j *job) syscall.Errno {
	select {
	case <-j.finished: // a result that is there is given, even to an interrupted writer
	default:
		select {
		case <-j.finished:
		case <-ctx.Done():
			return syscall.EINTR
		}
	}
	c.claim(j, false)
	return j.errno
}

// claim marks j's result as given to its writers (and, with abort, to the abort
// that stopped it).
func (c *control) claim(j *job, abort bool) {
	c.ask(func(s *ctlState) {
		if s.unclaimed == j {
			s.unclaimed = nil
		}
		if abort && s.aborted == j {
			s.aborted = nil
		}
	})
}

// start runs the job of line with check (on the owner, while idle: it returns the
// error that refuses the command) and then body (in a goroutine of its own). A
// retry of the running job's command joins it; one of the last job's, after it
// ended, gets its result (an interrupted writer's retry must not run it twice).
// A retry is matched before check: the job it repeats may have changed the chain.
func (c *control) start(line, state string, check func(s *ctlState) error, body func(j *job)) (*job, syscall.Errno) {
	var j *job
	var refused error
	if !c.ask(func(s *ctlState) {
		if s.state != "idle" {
			if s.job != nil && s.job.line == line {
				j = s.job // the same command again, from any open: a retry after EINTR
				return
			}
			refused = fmt.Errorf("%s is running: %w", s.job.line, errBusy)
			return
		}
		if u := s.unclaimed; u != nil {
			if u.line == line && time.Since(u.ended) < unclaimedFor {
				// It stays unclaimed until wait gives it (this retry may be
				// interrupted too, and the next one must not start it again).
				j = u
				return
			}
			s.unclaimed = nil
		}
		if refused = check(s); refused != nil {
			return
		}
		j = &job{line: line, merge: state == "merging", finished: make(chan struct{})}
		s.state, s.job = state, j
		s.last = result(line, 0, "started")
		go func() {
			body(j)
			j.ended = time.Now()
			c.reqs <- func(s *ctlState) {
				s.last = result(line, j.errno, j.message)
				s.state, s.job, s.cancel = "idle", nil, nil
				s.unclaimed = j
				close(j.finished)
			}
		}()
	}) {
		return nil, c.record(line, errStuck, "")
	}
	if refused != nil {
		return nil, c.record(line, refused, "")
	}
	return j, 0
}

func (c *control) startMerge(line string, opts merge.Options) (*job, syscall.Errno) {
	if c.root.opts.ReadOnly {
		return nil, c.record(line, fmt.Errorf("read-only mount: %w", chain.ErrReadOnly), "")
	}
	var mctx context.Context
	var cancel func()
	return c.start(line, "merging", func(s *ctlState) error {
		// Only while idle: no merge or snapshot can be replacing the layers now,
		// so the chain's lock is free for this read.
		if err := opts.Validate(c.root.chain.Len()); err != nil {
			return fmt.Errorf("%v: %w", err, errInvalid)
		}
		c.done.Store(0)
		c.total.Store(0)
		// The merge's own context: not the request's, which any signal interrupts.
		mctx, cancel = context.WithCancel(context.Background())
		s.cancel = cancel
		return nil
	}, func(j *job) {
		c.root.opts.Logger.Printf("%s: started", line)
		opts.Progress = func(done, total int64) {
			c.done.Store(done)
			c.total.Store(total)
		}
		opts.Logf = c.root.debugf
		opts.Hook = c.root.opts.MergeHook
		var res *merge.Result
		err := c.asOwner(func() error {
			var err error
			res, err = merge.Merge(mctx, c.root.chain, opts)
			return err
		})
		cancel()
		switch {
		case errors.Is(err, context.Canceled):
			j.message, j.errno = "aborted; the chain is as it was", syscall.ECANCELED
		case errors.Is(err, image.ErrWriteProtected):
			// A file it would write has no write bits: as a write to a read-only file.
			j.message, j.errno = "merge failed: "+err.Error(), syscall.EROFS
		case err != nil:
			// Whatever else stops a merge is EIO for the writer; the message says why.
			j.message, j.errno = "merge failed: "+err.Error(), syscall.EIO
		default:
			j.message = res.Message()
		}
		c.root.opts.Logger.Printf("%s: %s", line, map[bool]string{true: "done: ", false: ""}[err == nil]+j.message)
		if res != nil && len(res.Detached) > 0 {
			c.ask(func(s *ctlState) { s.detached = append(s.detached, res.Detached...) })
		}
	})
}

// asOwner runs a merge or a snapshot with the authority of the top image's owner
// (see fileio.AsOwnerOf): whoever may write control (root, or that owner) gets no
// file created, written, linked or removed that the owner could not.
func (c *control) asOwner(f func() error) error {
	return fileio.AsOwnerOf(chain.Abs(c.root.chain.Layers()[0].Path), f)
}

// startSnapshot freezes the chain's state as name, beside the top, and keeps the top's
// path as the live top, a new empty differencing image on it (see chain.Snapshot and
// snapshotName). It is refused while a merge runs,
// and a merge is refused while it runs.
func (c *control) startSnapshot(line, name string) (*job, syscall.Errno) {
	if c.root.opts.ReadOnly {
		return nil, c.record(line, fmt.Errorf("read-only mount: %w", chain.ErrReadOnly), "")
	}
	top := c.root.chain.Layers()[0]
	path, err := snapshotName(top, name)
	if err != nil {
		return nil, c.record(line, err, "")
	}
	return c.start(line, "snapshotting", func(*ctlState) error { return nil }, func(j *job) {
		top := c.root.chain.Layers()[0]
		if err := c.asOwner(func() error {
			_, err := c.root.chain.SnapshotWith(path, c.root.opts.MergeHook)
			return err
		}); err != nil {
			if errors.Is(err, chain.ErrTooDeep) || errors.Is(err, chain.ErrPending) {
				err = fmt.Errorf("%w: %w", err, errInvalid)
			}
			j.message, j.errno = err.Error(), c.root.errno("control "+line, err)
		} else {
			j.message = fmt.Sprintf("snapshot %s made: it holds the disk as it was, read-only; %s stays the live top, a new image on it", path, top.Path)
		}
		c.root.opts.Logger.Printf("%s: %s", line, j.message)
	})
}

// snapshotName is the name `snapshot NAME` gives the frozen state: NAME in the
// directory of the top image (after symlinks). A path is taken for its base name when
// it names that directory, and refused when it names another; the name's extension
// must not name the other format.
func snapshotName(top *chain.Layer, name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("snapshot takes the name of the new image, made beside the top image: %w", errInvalid)
	}
	real, err := filepath.EvalSymlinks(top.Path)
	if err != nil {
		return "", fmt.Errorf("snapshot: the top image %s: %w", top.Path, err)
	}
	dir := filepath.Dir(chain.Abs(real))
	base := filepath.Base(name)
	if strings.ContainsRune(name, '/') {
		given := filepath.Dir(filepath.Clean(filepath.Join(dir, name)))
		if filepath.IsAbs(name) {
			given = filepath.Dir(filepath.Clean(name))
		}
		a, aerr := os.Stat(given)
		b, berr := os.Stat(dir)
		if given != dir && (aerr != nil || berr != nil || !os.SameFile(a, b)) {
			return "", fmt.Errorf("snapshot %s: a snapshot is made beside the top image, in %s; give a name, not a path to another directory: %w", name, dir, errInvalid)
		}
	}
	if base == "." || base == ".." || base == "/" || strings.ContainsAny(base, "\x00") {
		return "", fmt.Errorf("snapshot %q: not a file name: %w", name, errInvalid)
	}
	if err := probe.CheckChildName(base, top.Image.Format()); err != nil {
		return "", fmt.Errorf("snapshot: %w", err)
	}
	return filepath.Join(dir, base), nil
}

// abortAll stops a running merge, if any, and waits for it (for shutdown). It
// returns the command of the merge it stopped, or "" when none ran.
func (c *control) abortAll() string {
	var j *job
	var cancel func()
	c.ask(func(s *ctlState) { j, cancel = s.job, s.cancel })
	if j == nil {
		return ""
	}
	if cancel != nil {
		cancel()
	}
	<-j.finished
	if !j.merge {
		return ""
	}
	return j.line
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
	job     *job   // guarded by mu: the merge this handle's write started
	jobLine string // guarded by mu: the command that started it
}

var _ = (fs.NodeGetattrer)((*controlNode)(nil))

func (n *controlNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.root.fillControlAttr(&out.Attr)
	if h, ok := fh.(*controlHandle); ok {
		out.Size = uint64(len(h.content))
	}
	return 0
}

var _ = (fs.NodeOpener)((*controlNode)(nil))

func (n *controlNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	st, err := n.root.ctl.status()
	if err != nil {
		return nil, 0, n.root.errno("control status", err)
	}
	b, err := json.MarshalIndent(st, "", "  ")
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
	// A command waits for its job (a merge, for as long as it runs): it is not one
	// of the requests Stop waits for, but none starts once the mount is stopped.
	if n.root.stopped.Load() {
		return 0, syscall.EIO
	}
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
		job, e = n.root.ctl.command(ctx, line)
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
func (h *controlHandle) ownJob(line string) *job {
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

func (h *controlHandle) setJob(job *job, line string) {
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
