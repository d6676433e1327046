package main

import (
	"fmt"
	"os"

	"github.com/vhdfs/vhdfs/chain"
)

func cmdExport(args []string) error {
	fs := newFlags("export")
	forceShare := fs.BoolP("force-share", "U", false, "open without locks, to read images another process has open for writing (as qemu-img -U); what it reads may be torn")
	force := fs.BoolP("progress", "p", false, "show the progress bar even when stdout is not a terminal")
	pos, err := parse(fs, args, "IMAGE", "OUT.raw")
	if err != nil {
		return err
	}
	open := chain.Open
	if *forceShare {
		open = func(p string, _ bool) (*chain.Chain, error) { return chain.OpenForceShare(p) }
	}
	c, err := open(pos[0], false)
	if err != nil {
		return err
	}
	defer c.Close()
	if st, err := os.Stat(pos[1]); err == nil {
		for _, l := range c.Layers() {
			if lst, err := os.Stat(l.Path); err == nil && os.SameFile(st, lst) {
				return fmt.Errorf("%s: is an image of the chain; refusing to overwrite it", pos[1])
			}
		}
	}
	out, err := os.OpenFile(pos[1], os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	bar := newProgress("export", c.Size(), *force)
	err = chain.Export(c, out, bar.update)
	bar.finish()
	if cerr := out.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("%s: %w", pos[1], cerr)
	}
	return err
}
