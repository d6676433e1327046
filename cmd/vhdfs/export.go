package main

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"os"
	"sync"

	"github.com/vhdfs/vhdfs/chain"
)

// exportHashes are the digests export --hash prints.
var exportHashes = map[string]func() hash.Hash{"sha256": sha256.New, "md5": md5.New}

func cmdExport(args []string) error {
	fs := newFlags("export")
	forceShare := fs.BoolP("force-share", "U", false, "open without locks, to read images another process has open for writing (as qemu-img -U); what it reads may be torn")
	showProgress := fs.BoolP("progress", "p", false, "show the progress bar even when stdout is not a terminal")
	hashName := fs.String("hash", "", "print the sha256 or md5 digest of the whole disk written, as sha256sum prints it (on stderr when OUT is stdout)")
	force := fs.Bool("force", false, "overwrite OUT, a regular file that is not empty")
	parents := parentFlag(fs)
	salvage := salvageFlag(fs)
	pos, err := parse(fs, args, "IMAGE", "OUT.raw")
	if err != nil {
		return err
	}
	newHash := exportHashes[*hashName]
	if *hashName != "" && newHash == nil {
		return usagef("--hash: %q: want sha256 or md5", *hashName)
	}
	c, err := openChain(pos[0], chain.OpenOptions{ForceShare: *forceShare, Parents: *parents, Salvage: *salvage})
	if err != nil {
		return err
	}
	defer c.Close()
	printNotes("export", c.Notes())
	write, toStdout, err := exportTarget(c, pos[1], *force)
	if err != nil {
		return err
	}
	bar := newProgress("export", c.Size(), *showProgress)
	if newHash == nil {
		err := write(bar.update)
		bar.finish()
		return err
	}
	h := newHash()
	err = exportHashing(c, write, h, bar.update)
	bar.finish()
	if err != nil {
		return err
	}
	line := fmt.Sprintf("%x  %s\n", h.Sum(nil), pos[1])
	if toStdout {
		_, err = os.Stderr.WriteString(line)
	} else {
		_, err = os.Stdout.WriteString(line)
	}
	return err
}

// exportTarget checks out, the export's destination, and returns the function that
// writes the chain there, and whether out is standard output (where a digest must
// not go). An image of the chain is refused, and so is a regular file that is not
// empty unless force.
func exportTarget(c *chain.Chain, out string, force bool) (write func(progress func(int64)) error, toStdout bool, err error) {
	if out == "-" {
		// Standard output, in order, every byte: `vhdfs export IMAGE - | sha256sum`.
		if isTerminal(os.Stdout) {
			return nil, false, usagef("refusing to write a raw disk image to a terminal; redirect stdout")
		}
		return func(progress func(int64)) error { return chain.ExportStream(c, os.Stdout, progress) }, true, nil
	}
	st, err := os.Stat(out)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, false, err
	}
	if err == nil {
		for _, l := range c.Layers() {
			if lst, err := os.Stat(l.Path); err == nil && os.SameFile(st, lst) {
				return nil, false, fmt.Errorf("%s: is an image of the chain; refusing to overwrite it", out)
			}
		}
		if sst, err := os.Stdout.Stat(); err == nil && os.SameFile(st, sst) {
			toStdout = true // /dev/stdout, /proc/self/fd/1
		}
	}
	switch {
	case err == nil && st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		return func(progress func(int64)) error { return exportDevice(c, out, progress) }, toStdout, nil
	case err == nil && !st.Mode().IsRegular() && !st.IsDir():
		// A character device or a FIFO (/dev/stdout, a named pipe): a stream.
		return func(progress func(int64)) error {
			f, err := os.OpenFile(out, os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			err = chain.ExportStream(c, f, progress)
			if cerr := f.Close(); err == nil && cerr != nil {
				err = fmt.Errorf("%s: %w", out, cerr)
			}
			return err
		}, toStdout, nil
	case err == nil && st.Mode().IsRegular() && st.Size() > 0 && !force:
		return nil, false, fmt.Errorf("%s: exists and is not empty; refusing to overwrite it without --force", out)
	}
	return func(progress func(int64)) error {
		f, err := os.OpenFile(out, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return err
		}
		err = chain.Export(c, f, progress)
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("%s: %w", out, cerr)
		}
		return err
	}, toStdout, nil
}

// exportHashing runs write and, beside it, hashes the chain's view into h; progress
// sees the slower of the two. The export's error comes first.
func exportHashing(c *chain.Chain, write func(progress func(int64)) error, h hash.Hash, progress func(int64)) error {
	var mu sync.Mutex
	var written, hashed int64
	report := func(p *int64) func(int64) {
		return func(done int64) {
			mu.Lock()
			*p = done
			least := min(written, hashed)
			mu.Unlock()
			progress(least)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hashErr := make(chan error, 1)
	go func() { hashErr <- chain.HashView(ctx, c, h, report(&hashed)) }()
	err := write(report(&written))
	if err != nil {
		cancel()
	}
	herr := <-hashErr
	if err != nil {
		return err
	}
	return herr
}

// exportDevice writes the chain to the start of the block device at path, and syncs
// it: a device is often unplugged right after.
func exportDevice(c *chain.Chain, path string, progress func(int64)) error {
	out, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	err = chain.ExportDevice(c, out, progress)
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
