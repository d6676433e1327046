package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/vhdfs/vhdfs/chain"
)

func cmdExport(args []string) error {
	fs := newFlags("export")
	forceShare := fs.BoolP("force-share", "U", false, "open without locks, to read images another process has open for writing (as qemu-img -U); what it reads may be torn")
	force := fs.BoolP("progress", "p", false, "show the progress bar even when stdout is not a terminal")
	parents := parentFlag(fs)
	salvage := salvageFlag(fs)
	pos, err := parse(fs, args, "IMAGE", "OUT.raw")
	if err != nil {
		return err
	}
	c, err := openChain(pos[0], chain.OpenOptions{ForceShare: *forceShare, Parents: *parents, Salvage: *salvage})
	if err != nil {
		return err
	}
	defer c.Close()
	printNotes("export", c.Notes())
	bar := newProgress("export", c.Size(), *force)
	if pos[1] == "-" {
		// Standard output, in order, every byte: `vhdfs export IMAGE - | sha256sum`.
		if isTerminal(os.Stdout) {
			return usagef("refusing to write a raw disk image to a terminal; redirect stdout")
		}
		err := chain.ExportStream(c, os.Stdout, bar.update)
		bar.finish()
		return err
	}
	st, err := os.Stat(pos[1])
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err == nil {
		for _, l := range c.Layers() {
			if lst, err := os.Stat(l.Path); err == nil && os.SameFile(st, lst) {
				return fmt.Errorf("%s: is an image of the chain; refusing to overwrite it", pos[1])
			}
		}
	}
	switch {
	case err == nil && st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		return exportDevice(c, pos[1], bar)
	case err == nil && !st.Mode().IsRegular() && !st.IsDir():
		// A character device or a FIFO (/dev/stdout, a named pipe): a stream.
		out, err := os.OpenFile(pos[1], os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		err = chain.ExportStream(c, out, bar.update)
		bar.finish()
		if cerr := out.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("%s: %w", pos[1], cerr)
		}
		return err
	}
	out, err := os.OpenFile(pos[1], os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	err = chain.Export(c, out, bar.update)
	bar.finish()
	if cerr := out.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("%s: %w", pos[1], cerr)
	}
	return err
}

// exportDevice writes the chain to the start of the block device at path, and syncs
// it: a device is often unplugged right after.
func exportDevice(c *chain.Chain, path string, bar *progress) error {
	out, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	err = chain.ExportDevice(c, out, bar.update)
	bar.finish()
	if err == nil {
		if err = out.Sync(); err != nil {
			err = fmt.Errorf("%s: sync: %w", path, err)
		}
	}
	if cerr := out.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("%s: %w", path, cerr)
	}
	return err
}
