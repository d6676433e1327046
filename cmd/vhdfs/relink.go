package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/pflag"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/probe"
)

// parentFlag adds the repeatable --parent flag of info, mount, export and check.
func parentFlag(fs *pflag.FlagSet) *[]string {
	return fs.StringArray("parent", nil, "the parent image, by hand (repeat, top down: the top's parent, then its parent, ...); still checked by unique ID")
}

// salvageFlag adds --salvage of info, export, check and mount -r.
func salvageFlag(fs *pflag.FlagSet) *bool {
	return fs.Bool("salvage", false, "read a damaged image as far as it can (never writing it): a fixed VHD with a bad or missing footer as its data, blocks past a truncated end and a missing parent as zeros; each fallback is said on stderr")
}

// printNotes says on stderr, one line each, what opening the images did that sound
// images would not need (a footer read from its copy, damage read around).
func printNotes(cmd string, notes []string) {
	for _, n := range notes {
		fmt.Fprintf(os.Stderr, "vhdfs %s: warning: %s\n", cmd, n)
	}
}

// forceRWFlag adds --force-rw of mount, merge, relink and check; the caller passes
// its value to fileio.AllowWriteProtected once the flags are parsed.
func forceRWFlag(fs *pflag.FlagSet) *bool {
	return fs.Bool("force-rw", false, "write image files that have no write bits (write-protected, as evidence is kept), which are otherwise refused (mount: mounted read-only)")
}

// openChain opens the chain at path with o, saying which flag an excess of parents
// came from.
func openChain(path string, o chain.OpenOptions) (*chain.Chain, error) {
	c, err := chain.OpenWith(path, o)
	return c, parentErr(err)
}

func parentErr(err error) error {
	if errors.Is(err, chain.ErrTooManyParents) {
		return fmt.Errorf("--parent: %w", err)
	}
	return err
}

// cmdRelink writes into IMAGE new locators that point at PARENT, once PARENT's
// unique ID is the one IMAGE records: qemu-img rebase -u, with the check.
func cmdRelink(args []string) error {
	fs := newFlags("relink")
	forceRW := forceRWFlag(fs)
	pos, err := parse(fs, args, "IMAGE", "PARENT")
	if err != nil {
		return err
	}
	fileio.AllowWriteProtected(*forceRW)
	path, parent := pos[0], pos[1]
	// A merge journal names the chain as it was when the merge began: the merge
	// (or check --repair) finishes first.
	if j, err := chain.ReadJournal(path); err != nil {
		return err
	} else if j != nil && j.Phase == chain.PhaseSnapshot {
		return fmt.Errorf("%s: %q was interrupted (journal %s); mount it read-write or run 'vhdfs check --repair %s' first", path, j.Command, chain.JournalPath(path), path)
	} else if j != nil {
		return fmt.Errorf("%s: a merge into %s is pending (journal %s); run the merge again or 'vhdfs check --repair %s' first", path, j.Target, chain.JournalPath(path), path)
	}
	// The parent is opened (and checked) the way a chain opens it, as the only
	// candidate; the image is opened for writing, so a mount or a qemu using it makes
	// this fail.
	img, err := probe.Open(path, probe.Writable)
	if err != nil {
		return mountedErr(path, err, "")
	}
	id, err := relink(img, path, parent)
	if err != nil {
		img.Close()
		return err
	}
	if err := img.Close(); err != nil {
		return err
	}
	fmt.Printf("%s: parent %s is now %s (locators and parent name rewritten)\n", path, id, parent)
	return nil
}

func relink(img image.Image, path, parent string) (image.ID, error) {
	if img.Type() != image.Differencing {
		return image.ID{}, fmt.Errorf("%s: a %v image has no parent", path, img.Type())
	}
	p, err := chain.FindParentAt(img, path, parent)
	if err != nil {
		return image.ID{}, err
	}
	id := p.Image.ID()
	p.Image.Close()
	return id, img.SetParent(id, chain.Abs(parent), chain.Abs(path))
}
