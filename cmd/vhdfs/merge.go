package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/merge"
)

func cmdMerge(args []string) error {
	fl := newFlags("merge")
	depth := fl.Int("depth", 1, "merge the top and the N-1 images below it into the image N levels down")
	from := fl.Int("from", 0, "merge a middle range starting at this depth (the top stays)")
	force := fl.BoolP("progress", "p", false, "show the progress bar even when stdout is not a terminal")
	del := fl.Bool("delete", false, "once the merge is complete, delete the images it left invalid, but not one an image in their directories records as its parent; children in other directories are not looked for (find them first with vhdfs scan -r)")
	forceRW := forceRWFlag(fl)
	pos, err := parse(fl, args, "IMAGE")
	if err != nil {
		return err
	}
	fileio.AllowWriteProtected(*forceRW)
	if *depth < 1 {
		return usagef("--depth %d: depth must be at least 1", *depth)
	}
	opts := merge.Options{From: *from, Depth: *depth, Delete: *del}
	// A chain mounted read-write has its top locked: its mount does the merge.
	rec, st, err := servingMount(pos[0])
	if err != nil {
		return err
	}
	if rec != nil && !st.ReadOnly {
		if err := opts.Validate(len(st.Chain)); err != nil {
			return usagef("%v", err)
		}
		return mergeMounted(rec, pos[0], opts, *force)
	}
	msg, err := merge.Recover(pos[0])
	if err != nil {
		return err
	}
	if msg != "" {
		fmt.Fprintf(os.Stderr, "vhdfs: %s: %s\n", pos[0], msg)
	}
	c, err := chain.Open(pos[0], true)
	if err != nil {
		return err
	}
	defer c.Close()
	opts.Hook = mergeHook()
	if err := opts.Validate(c.Len()); err != nil {
		return usagef("%v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	bar := newProgress("merge", 0, *force)
	opts.Progress = bar.set
	res, err := merge.Merge(ctx, c, opts)
	bar.finish()
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%s: merge interrupted; the chain is as it was and the same merge can be run again", pos[0])
		}
		return err
	}
	fmt.Println(res.Message())
	return nil
}
