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

	"github.com/moby/sys/mountinfo"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/fs"
	"github.com/vhdfs/vhdfs/merge"
)

// mountOf finds the vhdfs mount whose top image is image: the fuse.vhdfs mounts of
// /proc/self/mountinfo whose control status names it as chain[0]. It returns "" when
// none does; mounts it cannot read are skipped.
func mountOf(image string) (string, *fs.Status, error) {
	want, werr := os.Stat(image)
	abs := chain.Abs(image)
	ms, err := mountinfo.GetMounts(mountinfo.FSTypeFilter("fuse.vhdfs"))
	if err != nil {
		return "", nil, err
	}
	for _, m := range ms {
		mnt := m.Mountpoint
		st, err := readStatus(mnt)
		if err != nil || len(st.Chain) == 0 {
			continue
		}
		top := st.Chain[0].Path
		if top == abs {
			return mnt, st, nil
		}
		if got, err := os.Stat(top); err == nil && werr == nil && os.SameFile(got, want) {
			return mnt, st, nil
		}
	}
	return "", nil, nil
}

// mergeMounted runs the merge through the control file of the mount at mnt, showing
// its progress from the status while the write waits, and returns its result.
// SIGINT and SIGTERM abort it, as they stop an offline merge.
func mergeMounted(mnt, image string, opts merge.Options, force bool) error {
	line := fmt.Sprintf("merge depth=%d", opts.Depth)
	if opts.From > 0 {
		line = fmt.Sprintf("merge from=%d depth=%d", opts.From, opts.Depth)
	}
	fmt.Fprintf(os.Stderr, "vhdfs merge: %s is mounted at %s: the mount merges (%q to %s)\n", image, mnt, line, filepath.Join(mnt, "control"))
	ctl := filepath.Join(mnt, "control")
	f, err := os.OpenFile(ctl, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	bar := newProgress("merge", 0, force)
	done := make(chan struct{})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		tick := time.NewTicker(redrawEvery)
		defer tick.Stop()
		aborted := false
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				if !aborted {
					aborted = true
					// The write then returns ECANCELED (or the merge's result, if it
					// was past the point where it stops).
					os.WriteFile(ctl, []byte("abort\n"), 0)
				}
			case <-tick.C:
			}
			if st, err := readStatus(mnt); err == nil && st.Running == line && st.Progress != nil {
				bar.set(st.Progress.Done, st.Progress.Total)
			}
		}
	}()
	werr := writeRetry(f, []byte(line+"\n"))
	close(done)
	<-polled
	if werr == nil {
		bar.complete()
	}
	bar.finish()
	st, serr := readStatus(mnt)
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
