package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vhdfs/vhdfs/fs"
	"github.com/vhdfs/vhdfs/merge"
)

// servingMount returns the mount that serves image as its writable top, checked by
// identity (see findMount), with its status; nil when image has none. A mount that
// cannot be asked (its process stopped, its mount not in this namespace, no answer
// within the deadline) is an error that names the process and the mount point.
func servingMount(image string) (*mountRecord, *fs.Status, error) {
	rec, err := findMount(image)
	if err != nil || rec == nil || rec.ReadOnly {
		return nil, nil, err
	}
	if rec.stopped() {
		return nil, nil, fmt.Errorf("%s is mounted, but mount process %d serving %s is stopped; continue it (kill -CONT %d) or end it",
			image, rec.PID, rec.Mountpoint, rec.PID)
	}
	if !rec.mountedHere() {
		return nil, nil, fmt.Errorf("%s is mounted by mount process %d, whose mount %s is not in this mount namespace",
			image, rec.PID, rec.Mountpoint)
	}
	d := waitTimeout()
	st, err := statusOf(rec.Mountpoint, d)
	if errors.Is(err, errNoAnswer) {
		return nil, nil, fmt.Errorf("%s is mounted, but mount process %d serving %s did not answer within %v", image, rec.PID, rec.Mountpoint, d)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%s is mounted at %s (mount process %d): status: %w", image, rec.Mountpoint, rec.PID, err)
	}
	return rec, st, nil
}

// mergeMounted runs the merge through the control file of the mount rec serves,
// showing its progress from the status while the write waits, and returns its
// result. A child does the write and another reads the status (see ask.go): a
// status that stops answering for waitTimeout ends the wait, not the length of the
// merge. SIGINT and SIGTERM abort it, as they stop an offline merge.
func mergeMounted(rec *mountRecord, image string, opts merge.Options, force bool) error {
	mnt := rec.Mountpoint
	ctl := filepath.Join(mnt, "control")
	line := fmt.Sprintf("merge depth=%d", opts.Depth)
	if opts.From > 0 {
		line = fmt.Sprintf("merge from=%d depth=%d", opts.From, opts.Depth)
	}
	if opts.Delete {
		line += " delete"
	}
	fmt.Fprintf(os.Stderr, "vhdfs merge: %s is mounted at %s: the mount merges (%q to %s)\n", image, mnt, line, ctl)
	d := waitTimeout()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	writer, err := startChild("write", mnt, line)
	if err != nil {
		return err
	}
	written := make(chan error, 1)
	go func() {
		_, err := readAnswer(writer)
		written <- err
	}()
	statuses, stopWatch, err := watchStatus(mnt)
	if err != nil {
		writer.kill()
		return err
	}
	defer stopWatch()

	bar := newProgress("merge", 0, force)
	quiet := time.NewTimer(d)
	defer quiet.Stop()
	interrupted := ctx.Done()
	var werr error
wait:
	for {
		select {
		case werr = <-written:
			break wait
		case w, ok := <-statuses:
			if !ok {
				statuses = nil
				continue
			}
			if w.err != nil {
				continue // a dead mount fails the write too
			}
			quiet.Reset(d)
			if w.st.Running == line && w.st.Progress != nil {
				bar.set(w.st.Progress.Done, w.st.Progress.Total)
			}
		case <-interrupted:
			interrupted = nil
			// The write then returns ECANCELED (or the merge's result, if it was past
			// the point where it stops).
			go writeControlOf(mnt, "abort", d)
		case <-quiet.C:
			writer.kill()
			bar.finish()
			if rec.stopped() {
				return fmt.Errorf("%s: mount process %d serving %s is stopped; the merge waits there", image, rec.PID, mnt)
			}
			return fmt.Errorf("%s: mount process %d serving %s gave no status for %v; the merge may still run there", image, rec.PID, mnt, d)
		}
	}
	if werr == nil {
		bar.complete()
	}
	bar.finish()
	if lost := lostMount(werr, rec, "merge"); lost != nil {
		return lost
	}
	st, serr := statusOf(mnt, d)
	msg := ""
	if serr == nil && st.Last != nil && st.Last.Command == line {
		msg = st.Last.Message
	}
	switch {
	case werr == nil:
		if msg != "" {
			fmt.Println(msg)
		}
		return nil
	case errors.Is(werr, syscall.ECANCELED):
		return fmt.Errorf("%s: merge interrupted; the chain is as it was and the same merge can be run again", image)
	case msg != "":
		return fmt.Errorf("%s: %s (%v)", image, msg, werr)
	}
	return fmt.Errorf("%s: %s: %w", ctl, line, werr)
}

// writeRetry writes b in one write(2), again on EINTR: the mount takes the same
// command again as a wait for the merge it started.
func writeRetry(f *os.File, b []byte) error {
	for {
		_, err := syscall.Write(int(f.Fd()), b)
		if err != syscall.EINTR {
			return err
		}
	}
}
