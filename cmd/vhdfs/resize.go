package main

import (
	"errors"
	"fmt"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/internal/units"
)

// cmdResize changes the virtual size of IMAGE (the top of its chain), offline, as
// ResizeVirtualDisk does.
func cmdResize(args []string) error {
	fs := newFlags("resize")
	exact := fs.Bool("exact-size", false, "VHD: keep the size exact instead of rounding up to a CHS geometry")
	force := fs.Bool("force", false, "shrink even past partitions and stored data (they are cut off), and grow a differencing image over a larger parent's data")
	smallest := fs.Bool("smallest", false, "shrink to the end of the last partition (and a GPT's backup), rounded up as the format needs; no SIZE")
	forceRW := forceRWFlag(fs)
	pos, err := parse(fs, args, "IMAGE", "SIZE")
	if *smallest && fs.NArg() == 1 && errors.As(err, new(usageError)) {
		pos, err = fs.Args(), nil
	}
	if err != nil {
		return err
	}
	fileio.AllowWriteProtected(*forceRW)
	o := chain.ResizeOptions{ExactSize: *exact, Smallest: *smallest, Force: *force}
	if *smallest && len(pos) > 1 {
		return usagef("--smallest computes the size: drop SIZE")
	}
	if !*smallest {
		if o.Size, err = parseSize(pos[1]); err != nil {
			return usagef("SIZE: %v", err)
		}
		if o.Size <= 0 {
			return usagef("SIZE %q: must be positive", pos[1])
		}
	}
	path := pos[0]
	if rec, err := findMount(path); err != nil {
		return err
	} else if rec != nil {
		return fmt.Errorf("%s is mounted at %s (mount process %d): unmount it first ('vhdfs umount %s'); resize works offline only", path, rec.Mountpoint, rec.PID, rec.Mountpoint)
	}
	if j, err := chain.ReadJournal(path); err != nil {
		return err
	} else if j != nil {
		return fmt.Errorf("%s: a merge into %s is pending (journal %s); run the merge again or 'vhdfs check --repair %s' first", path, j.Target, chain.JournalPath(path), path)
	}
	c, err := chain.Open(path, true)
	if err != nil {
		return err
	}
	res, err := chain.Resize(c, o)
	if cerr := c.Close(); err == nil {
		err = cerr
	}
	if errors.Is(err, image.ErrInvalidArg) && !errors.Is(err, chain.ErrUnsafeResize) {
		return usagef("%v", err)
	}
	if err != nil {
		return err
	}
	switch {
	case res.New == res.Old:
		fmt.Printf("%s: size stays %s\n", path, units.Text(res.Old))
	default:
		fmt.Printf("%s: resized from %s to %s\n", path, units.Text(res.Old), units.Text(res.New))
		if res.Table != nil && res.Table.Scheme == "gpt" && res.New < res.Old {
			fmt.Printf("note: the backup GPT was at the old end; 'sgdisk -e' or fdisk's write puts it at the new end\n")
		}
	}
	return nil
}
