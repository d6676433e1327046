package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/units"
	"github.com/vhdfs/vhdfs/probe"
)

func cmdCreate(args []string) error {
	fs := newFlags("create")
	sizeStr := fs.String("size", "", "virtual `SIZE`: bytes, or 1.5G, 512M, 2T (K, M, G, T count in 1024s as qemu-img does; KB, MB, GB, TB in 1000s)")
	typ := fs.String("type", "dynamic", "dynamic or fixed")
	format := fs.String("format", "", "vhd or vhdx (default: from the name: .vhdx and .avhdx are VHDX, anything else VHD; with --parent, the parent's)")
	blockStr := fs.String("block-size", "", "block `SIZE` (default: VHD 2M; VHDX 32M, and 2M for a differencing image, as Hyper-V makes them)")
	logical := fs.Int64("logical-sector", 0, "VHDX logical sector `BYTES`: 512 (default) or 4096")
	physical := fs.Int64("physical-sector", 0, "VHDX physical sector `BYTES`: 512 or 4096 (default)")
	exact := fs.Bool("exact-size", false, "VHD: keep the size exact instead of rounding up to a CHS geometry")
	parent := fs.String("parent", "", "create a differencing image (a snapshot) of `PARENT`; size, type and format come from it")
	asJSON := fs.Bool("json", false, "print the new image as info --json shows a layer")
	quiet := fs.BoolP("quiet", "q", false, "print no line about the new image (--json still prints)")
	pos, err := parse(fs, args, "IMAGE")
	if err != nil {
		return err
	}
	var blockSize int64
	if *blockStr != "" {
		if blockSize, err = parseSize(*blockStr); err != nil {
			return usagef("--block-size: %v", err)
		}
	}
	named := probe.FormatOfName(pos[0])
	if *format != "" && *format != "vhd" && *format != "vhdx" {
		return usagef("--format %q: want vhd or vhdx", *format)
	}
	if *parent != "" {
		if *sizeStr != "" || fs.Changed("type") || *exact || *logical != 0 || *physical != 0 {
			return usagef("--parent takes the size, type and sector sizes from the parent: drop --size, --type, --exact-size, --logical-sector and --physical-sector")
		}
		if err := createChild(*parent, pos[0], *format, blockSize); err != nil {
			return err
		}
		return report(pos[0], *parent, 0, *asJSON, *quiet)
	}
	if *sizeStr == "" {
		return usagef("--size or --parent is required")
	}
	size, err := parseSize(*sizeStr)
	if err != nil {
		return usagef("--size: %v", err)
	}
	if *typ != "dynamic" && *typ != "fixed" {
		return usagef("--type %q: want dynamic or fixed", *typ)
	}
	if *typ == "fixed" && *blockStr != "" && cmp.Or(*format, named) == "vhd" {
		return usagef("--block-size applies to dynamic images only")
	}
	opts := probe.CreateOptions{Format: cmp.Or(*format, named), Type: image.Dynamic, Size: size, BlockSize: blockSize,
		ExactSize: *exact, LogicalSector: *logical, PhysicalSector: *physical}
	if *typ == "fixed" {
		opts.Type = image.Fixed
	}
	if opts.Format == "vhdx" && *exact {
		return usagef("--exact-size is for VHD: a VHDX keeps the size asked for")
	}
	if opts.Format == "vhd" && (*logical != 0 || *physical != 0) {
		return usagef("--logical-sector and --physical-sector are for VHDX: a VHD has 512-byte sectors")
	}
	if max := probe.MaxSize(opts.Format, opts.Type); max > 0 && size > max {
		return tooLarge(pos[0], size, max, opts.Format, *format)
	}
	if opts.Format == "vhd" && blockSize > probe.DefaultBlockSize("vhd", false) {
		warnBlockSize("create", blockSize)
	}
	err = probe.Create(pos[0], opts)
	if err != nil {
		if errors.Is(err, image.ErrInvalidArg) {
			// A size or block size the format cannot take: the command line is wrong.
			return usagef("%v", err)
		}
		return err
	}
	return report(pos[0], "", size, *asJSON, *quiet)
}

// tooLarge is the usage error for a size more than a format holds: it says the
// limit and, for a VHD, that a VHDX holds more, and how to ask for one.
func tooLarge(path string, size, max int64, format, asked string) error {
	if format != "vhd" {
		return usagef("%s: %s is more than a VHDX holds, %s", path, units.Text(size), units.Exact(max))
	}
	how := "name it " + strings.TrimSuffix(path, filepath.Ext(path)) + ".vhdx"
	if asked == "vhd" {
		how += " and drop --format vhd"
	}
	return usagef("%s: %s is more than a dynamic VHD holds, %s; a VHDX holds up to %s: %s",
		path, units.Text(size), units.Exact(max), units.Human(probe.MaxSize("vhdx", image.Dynamic)), how)
}

// warnBlockSize warns that a VHD's block size above 2 MiB is not for every reader.
func warnBlockSize(cmd string, blockSize int64) {
	fmt.Fprintf(os.Stderr, "vhdfs %s: warning: block size %s is above 2 MiB: blktap (XCP-ng, XenServer, Xen Orchestra's imports) cannot open the image, and Microsoft's tools are reported to handle 2 MiB only\n", cmd, units.Human(blockSize))
}

// report prints what create made, in one line, and a second one when the size was
// rounded up to a CHS geometry; with asJSON, the layer entry info --json shows.
func report(path, parent string, asked int64, asJSON, quiet bool) error {
	if quiet && !asJSON {
		return nil
	}
	img, err := probe.Open(path, probe.ReadOnly)
	if err != nil {
		return err
	}
	defer img.Close()
	li := chain.DescribeLayer(0, &chain.Layer{Image: img, Path: path})
	if asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(li)
	}
	line := fmt.Sprintf("created %s: %s %s, %s", path, li.Format, li.Type, units.Text(li.VirtualSize))
	if li.BlockSize > 0 {
		line += ", block size " + units.Human(li.BlockSize)
	}
	if parent != "" {
		line += ", parent " + parent
	}
	fmt.Println(line)
	if asked > 0 && li.VirtualSize != asked {
		fmt.Printf("note: %s was rounded up to %s to fit a CHS geometry, as qemu-img does; --exact-size keeps the size asked for\n",
			units.Text(asked), units.Text(li.VirtualSize))
	}
	return nil
}

// createChild creates name, a new empty differencing image on parent, in the
// parent's format: a chain is one format throughout. format is what the user asked
// for, "" if nothing.
func createChild(parent, name, format string, blockSize int64) error {
	// Opening the whole chain proves the parent is usable before we link to it.
	c, err := chain.Open(parent, false)
	if err != nil {
		return err
	}
	defer c.Close()
	if c.Len() >= chain.MaxDepth {
		return fmt.Errorf("%s: the chain of %s already holds %d images, the most a chain may: %w", name, parent, c.Len(), chain.ErrTooDeep)
	}
	top := c.Layers()[0].Image
	if format != "" && format != top.Format() {
		return usagef("--format %s: the parent %s is %s, and a chain is one format throughout", format, parent, strings.ToUpper(top.Format()))
	}
	if format == "" {
		if err := probe.CheckChildName(name, top.Format()); err != nil {
			return usagef("%v (the parent %s is %s)", strings.TrimSuffix(err.Error(), ": "+image.ErrInvalidArg.Error()), parent, strings.ToUpper(top.Format()))
		}
	}
	if blockSize == 0 && top.Format() == "vhdx" {
		blockSize = probe.DefaultBlockSize("vhdx", true)
	}
	return top.CreateChild(name, image.ChildOptions{ParentPath: parent, BlockSize: blockSize})
}
