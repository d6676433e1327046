package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/units"
)

// cmdCompact drops the all-zero blocks of IMAGE where that keeps the view and moves
// the last blocks into the holes, so the file shrinks (Optimize-VHD); offline only.
func cmdCompact(args []string) error {
	fl := newFlags("compact")
	dryRun := fl.BoolP("dry-run", "n", false, "say what compact would free (blocks dropped, bytes the file would shrink by) and write nothing")
	force := fl.BoolP("progress", "p", false, "show the progress bar even when stdout is not a terminal")
	forceRW := forceRWFlag(fl)
	pos, err := parse(fl, args, "IMAGE")
	if err != nil {
		return err
	}
	fileio.AllowWriteProtected(*forceRW)
	path := pos[0]
	// A mounted image is compacted by nobody but its owner, once unmounted.
	// (A path that is not there is the open's to report, naming it.)
	if rec, err := findMount(path); err == nil && rec != nil {
		return fmt.Errorf("%s is mounted at %s (mount process %d): unmount it first ('vhdfs umount %s'), then compact it", path, rec.Mountpoint, rec.PID, rec.Mountpoint)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	bar := newProgress("compact", 0, *force)
	res, err := chain.Compact(ctx, path, image.CompactOptions{DryRun: *dryRun, Progress: bar.set})
	bar.finish()
	switch {
	case errors.Is(err, image.ErrLocked):
		return fmt.Errorf("%w (compact works offline: unmount the chain or stop the program that has it open first)", err)
	case err != nil && ctx.Err() != nil:
		return fmt.Errorf("%s: compact interrupted; the image is valid and shows the same data, and can be compacted again", path)
	case err != nil:
		return err
	}
	fmt.Println(compactMessage(path, res, *dryRun))
	return nil
}

// compactMessage says what compact did, or would do.
func compactMessage(path string, r image.CompactResult, dryRun bool) string {
	kept := ""
	if r.Kept > 0 {
		kept = fmt.Sprintf(" (%d all-zero blocks kept: the parent has data there)", r.Kept)
	}
	if dryRun {
		return fmt.Sprintf("%s: would drop %d of %d blocks%s and move %d; the file would shrink by %s, from %s to %s",
			path, r.Dropped, r.Blocks, kept, r.Moved, units.Text(r.Freed()), units.Text(r.OldSize), units.Text(r.NewSize))
	}
	return fmt.Sprintf("%s: dropped %d of %d blocks%s and moved %d; the file shrank by %s, from %s to %s",
		path, r.Dropped, r.Blocks, kept, r.Moved, units.Text(r.Freed()), units.Text(r.OldSize), units.Text(r.NewSize))
}
