package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/units"
	"github.com/vhdfs/vhdfs/probe"
)

// azureUnit is what Azure wants a VHD's virtual size to be a whole number of.
const azureUnit = 1 << 20

// cmdConvert flattens the chain whose top is IN into OUT, a new fixed or dynamic image
// of either format. OUT is made under a temporary name in its folder and renamed into
// place once synced: it never exists half-written.
func cmdConvert(args []string) error {
	fs := newFlags("convert")
	format := fs.String("format", "", "vhd or vhdx (default: from OUT's name: .vhdx and .avhdx are VHDX, anything else VHD)")
	typ := fs.String("type", "dynamic", "dynamic or fixed")
	blockStr := fs.String("block-size", "", "block `SIZE` of a dynamic OUT (default: VHD 2M, VHDX 32M)")
	azure := fs.Bool("azure", false, "a fixed VHD whose virtual size is a whole number of MiB (rounded up, with a note) and exact in the footer, as Azure requires")
	force := fs.BoolP("progress", "p", false, "show the progress bar even when stdout is not a terminal")
	forceShare := fs.BoolP("force-share", "U", false, "open without locks, to read images another process has open for writing (as qemu-img -U); what it reads may be torn")
	parents := parentFlag(fs)
	quiet := fs.BoolP("quiet", "q", false, "print no line about the new image")
	pos, err := parse(fs, args, "IN", "OUT")
	if err != nil {
		return err
	}
	in, out := pos[0], pos[1]
	if *format != "" && *format != "vhd" && *format != "vhdx" {
		return usagef("--format %q: want vhd or vhdx", *format)
	}
	if *typ != "dynamic" && *typ != "fixed" {
		return usagef("--type %q: want dynamic or fixed", *typ)
	}
	o := probe.CreateOptions{Format: cmp.Or(*format, probe.FormatOfName(out)), Type: image.Dynamic}
	if *typ == "fixed" {
		o.Type = image.Fixed
	}
	if *azure {
		switch {
		case o.Format == "vhdx" && *format != "":
			return usagef("--azure makes a fixed VHD: it cannot be combined with --format vhdx")
		case o.Format == "vhdx":
			return usagef("--azure makes a fixed VHD, and %s is named as a VHDX: name it .vhd", out)
		case fs.Changed("type") && o.Type != image.Fixed:
			return usagef("--azure makes a fixed VHD: it cannot be combined with --type %s", *typ)
		}
		o.Type = image.Fixed
	}
	if *blockStr != "" {
		if o.Type == image.Fixed {
			return usagef("--block-size applies to dynamic images only")
		}
		if o.BlockSize, err = parseSize(*blockStr); err != nil {
			return usagef("--block-size: %v", err)
		}
	}
	if chain.Abs(in) == chain.Abs(out) {
		return fmt.Errorf("%s: is IN; convert writes a new image and refuses to overwrite its input", out)
	}
	if _, err := os.Lstat(out); err == nil {
		return fmt.Errorf("%s: exists; refusing to overwrite it", out)
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}

	c, err := openChain(in, chain.OpenOptions{ForceShare: *forceShare, Parents: *parents})
	if err != nil {
		return err
	}
	defer c.Close()
	size := c.Size()
	o.Size = size
	if sector := c.Layers()[0].Image.SectorSize(); o.Format == "vhd" && sector != 512 {
		fmt.Fprintf(os.Stderr, "vhdfs convert: warning: %s has %d-byte logical sectors and a VHD has 512-byte ones: a guest finds no partition table written for %d-byte sectors; --format vhdx keeps them\n", in, sector, sector)
	}
	if o.Format == "vhd" {
		// The disk keeps its size; the footer says it exactly (with the 65535/16/255
		// geometry when no CHS geometry does), as create --exact-size writes it.
		o.ExactSize = true
	} else {
		o.LogicalSector = c.Layers()[0].Image.SectorSize()
	}
	if *azure && size%azureUnit != 0 {
		o.Size = (size + azureUnit - 1) / azureUnit * azureUnit
		fmt.Fprintf(os.Stderr, "vhdfs convert: note: %s: virtual size %s rounded up to %s, a whole number of MiB, as Azure requires; the new space reads as zeros\n",
			out, units.Text(size), units.Text(o.Size))
	}
	// Signals are caught before the temporary file exists, so none leaves it behind.
	// A signal is said at once, once the work is told to stop: the stop is then
	// certain, whatever the work was doing.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	go func() {
		s := <-sigs
		cancel()
		fmt.Fprintf(os.Stderr, "vhdfs convert: %v: stopping; %s will not be made\n", s, out)
	}()
	tmp := convertTemp(out)
	if err := probe.Create(tmp, o); err != nil {
		// The temporary name means nothing to the user yet: the error names OUT.
		msg := strings.ReplaceAll(err.Error(), tmp, out)
		if errors.Is(err, image.ErrInvalidArg) {
			return usagef("%s", msg)
		}
		return errors.New(msg)
	}
	if o.Format == "vhd" && o.BlockSize > probe.DefaultBlockSize("vhd", false) {
		warnBlockSize("convert", o.BlockSize)
	}
	made, err := convertInto(ctx, c, tmp, *force)
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	if err == nil {
		err = renameNew(tmp, out)
	}
	if err != nil {
		os.Remove(tmp)
		if ctx.Err() != nil {
			return fmt.Errorf("%s: convert interrupted; %s was not made and the chain is as it was", out, out)
		}
		return err
	}
	if err := chain.SyncDir(filepath.Dir(out)); err != nil {
		return fmt.Errorf("%s: %w", out, err)
	}
	if !*quiet {
		fmt.Printf("converted %s (%d %s) to %s: %s\n", in, c.Len(), plural(c.Len(), "image", "images"), out, made)
	}
	return nil
}

// convertTemp is the name OUT is written under until it is complete: hidden, beside
// OUT (the rename stays in one file system), and saying what made it.
func convertTemp(out string) string {
	return filepath.Join(filepath.Dir(out), "."+filepath.Base(out)+".vhdfs-convert-"+strconv.Itoa(os.Getpid()))
}

// convertInto writes the chain into the new image at tmp, syncs and closes it, and
// says what it is. The VHDFS_FAILPOINT "convert-half" is reached once half the chain
// is done.
func convertInto(ctx context.Context, c *chain.Chain, tmp string, force bool) (string, error) {
	dst, err := probe.Open(tmp, probe.Writable)
	if err != nil {
		return "", err
	}
	bar := newProgress("convert", c.Size(), force)
	progress := bar.update
	if hook := mergeHook(); hook != nil {
		var half sync.Once
		progress = func(done int64) {
			bar.update(done)
			if done*2 >= c.Size() {
				half.Do(func() { hook("convert-half") })
			}
		}
	}
	err = chain.Convert(ctx, c, dst, progress)
	bar.finish()
	if err == nil {
		err = dst.Sync()
	}
	made := fmt.Sprintf("%s %s, %s", strings.ToUpper(dst.Format()), dst.Type(), units.Text(dst.Size()))
	if bs := dst.BlockSize(); bs > 0 {
		made += ", block size " + units.Human(bs)
	}
	if cerr := dst.Close(); err == nil && cerr != nil {
		err = cerr
	}
	return made, err
}

// renameNew renames tmp to out unless out exists (renameat2 RENAME_NOREPLACE; a link
// and an unlink where the file system cannot).
func renameNew(tmp, out string) error {
	err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, out, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		if err = os.Link(tmp, out); err == nil {
			return os.Remove(tmp)
		}
	}
	switch {
	case errors.Is(err, unix.EEXIST) || errors.Is(err, os.ErrExist):
		return fmt.Errorf("%s: appeared while converting; refusing to overwrite it", out)
	case err != nil:
		return fmt.Errorf("%s: rename %s to it: %w", out, tmp, err)
	}
	return nil
}

// plural is one or many, by n.
func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
