package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/probe"
	"github.com/vhdfs/vhdfs/vhd"
)

func cmdCreate(args []string) error {
	fs := newFlags("create")
	sizeStr := fs.String("size", "", "virtual `SIZE`: bytes, or 1.5G, 512M, 2T (K, M, G, T count in 1024s as qemu-img does; KB, MB, GB, TB in 1000s)")
	typ := fs.String("type", "dynamic", "dynamic or fixed")
	blockStr := fs.String("block-size", "", "block `SIZE` of a dynamic image (default 2M)")
	exact := fs.Bool("exact-size", false, "keep the size exact instead of rounding up to a CHS geometry")
	parent := fs.String("parent", "", "create a differencing image (a snapshot) of `PARENT`; size and type come from it")
	asJSON := fs.Bool("json", false, "print the new image as info --json shows a layer")
	quiet := fs.BoolP("quiet", "q", false, "print no line about the new image (--json still prints)")
	pos, err := parse(fs, args, "IMAGE")
	if err != nil {
		return err
	}
	opts := vhd.CreateOptions{ExactSize: *exact}
	if *blockStr != "" {
		if opts.BlockSize, err = parseSize(*blockStr); err != nil {
			return usagef("--block-size: %v", err)
		}
		if opts.BlockSize > vhd.DefaultBlockSize {
			fmt.Fprintf(os.Stderr, "vhdfs create: warning: block size %s is above 2 MiB: blktap (XCP-ng, XenServer, Xen Orchestra's imports) cannot open the image, and Microsoft's tools are reported to handle 2 MiB only\n", *blockStr)
		}
	}
	if *parent != "" {
		if *sizeStr != "" || fs.Changed("type") || *exact {
			return usagef("--parent takes the size and type from the parent: drop --size, --type and --exact-size")
		}
		if err := createChild(*parent, pos[0], opts.BlockSize); err != nil {
			return err
		}
		return report(pos[0], *parent, 0, *asJSON, *quiet)
	}
	if *sizeStr == "" {
		return usagef("--size or --parent is required")
	}
	if opts.Size, err = parseSize(*sizeStr); err != nil {
		return usagef("--size: %v", err)
	}
	switch *typ {
	case "dynamic":
		opts.Type = vhd.TypeDynamic
	case "fixed":
		opts.Type = vhd.TypeFixed
		if *blockStr != "" {
			return usagef("--block-size applies to dynamic images only")
		}
	default:
		return usagef("--type %q: want dynamic or fixed", *typ)
	}
	if err := vhd.Create(pos[0], opts); err != nil {
		if errors.Is(err, vhd.ErrInvalidArg) {
			// A size or block size the format cannot take: the command line is wrong.
			return usagef("%v", err)
		}
		return err
	}
	return report(pos[0], "", opts.Size, *asJSON, *quiet)
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
	line := fmt.Sprintf("created %s: %s %s, %s", path, li.Format, li.Type, sizeText(li.VirtualSize))
	if li.BlockSize > 0 {
		line += ", block size " + human(li.BlockSize)
	}
	if parent != "" {
		line += ", parent " + parent
	}
	fmt.Println(line)
	if asked > 0 && li.VirtualSize != asked {
		fmt.Printf("note: %s became %s to fit a CHS geometry, as qemu-img does; --exact-size keeps the size asked for\n",
			sizeText(asked), human(li.VirtualSize))
	}
	return nil
}

// createChild creates name, a new empty differencing image on parent.
func createChild(parent, name string, blockSize int64) error {
	// Opening the whole chain proves the parent is usable before we link to it.
	c, err := chain.Open(parent, false)
	if err != nil {
		return err
	}
	defer c.Close()
	if c.Len() >= chain.MaxDepth {
		return fmt.Errorf("%s: the chain of %s already holds %d images, the most a chain may: %w", name, parent, c.Len(), chain.ErrTooDeep)
	}
	return c.Layers()[0].Image.CreateChild(name, image.ChildOptions{ParentPath: parent, BlockSize: blockSize})
}

// sizeText gives a size for people and in bytes: "1.5 GiB (1610612736 bytes)", "1 byte".
func sizeText(n int64) string {
	switch {
	case n == 1:
		return "1 byte"
	case n < 1024:
		return fmt.Sprintf("%d bytes", n)
	}
	return fmt.Sprintf("%s (%d bytes)", human(n), n)
}
