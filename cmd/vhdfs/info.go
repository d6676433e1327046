package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/units"
)

func cmdInfo(args []string) error {
	fs := newFlags("info")
	forceShare := fs.BoolP("force-share", "U", false, "open without locks, to read images another process has open for writing (as qemu-img -U); what it reads may be torn")
	asJSON := fs.Bool("json", false, "print JSON")
	parents := parentFlag(fs)
	salvage := salvageFlag(fs)
	pos, err := parse(fs, args, "IMAGE")
	if err != nil {
		return err
	}
	info, err := chain.Inspect(pos[0], chain.OpenOptions{ForceShare: *forceShare, Parents: *parents, Salvage: *salvage})
	if errors.Is(err, image.ErrLocked) && len(info.Layers) == 0 {
		// The top of a read-write mount: its mount describes the chain it has open.
		rec, st, merr := servingMount(pos[0])
		if merr != nil {
			return merr
		}
		if rec == nil || st.ReadOnly || len(st.Chain) == 0 {
			return mountedErr(pos[0], err, "vhdfs info -U to read it as it is")
		}
		fmt.Fprintf(os.Stderr, "vhdfs info: %s is mounted at %s (mount process %d): the chain as that mount has it open\n", pos[0], rec.Mountpoint, rec.PID)
		info, err = mountInfo(st.Chain), nil
	}
	printNotes("info", info.Notes)
	if err = parentErr(err); err != nil && len(info.Layers) == 0 {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if jerr := enc.Encode(info); jerr != nil {
			return jerr
		}
		return err
	}
	if err := printInfo(info); err != nil {
		return err
	}
	if mp := info.MissingParent; mp != nil {
		fmt.Printf("parent %s of %s not opened; looked at: %s\n", mp.UniqueID, mp.Child, strings.Join(mp.Tried, ", "))
	}
	return err
}

// mountInfo is the Info of the chain a mount's status shows. The format's own fields
// come as a map there (Details): the text output has them in the order of their names.
func mountInfo(layers []chain.LayerInfo) chain.Info {
	info := chain.Info{Layers: layers}
	if len(layers) > 0 {
		info.VirtualSize = layers[0].VirtualSize
	}
	for i, l := range layers {
		keys := make([]string, 0, len(l.Details))
		for k := range l.Details {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			layers[i].Fields = append(layers[i].Fields, [2]string{k, l.Details[k]})
		}
	}
	return info
}

func printInfo(info chain.Info) error {
	fmt.Printf("chain of %d image(s), virtual size %s (%d bytes)\n", len(info.Layers), units.Human(info.VirtualSize), info.VirtualSize)
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "DEPTH\tPATH\tFORMAT\tTYPE\tSIZE\tBLOCK\tALLOCATED\tCREATOR\tID\tFOUND BY")
	for _, l := range info.Layers {
		block := "-"
		if l.BlockSize > 0 {
			block = units.Human(l.BlockSize)
		}
		found := l.FoundBy
		if found == "" {
			found = "(given)"
		}
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", l.Depth, l.Path, l.Format, l.Type, units.Human(l.VirtualSize), block,
			units.Human(l.AllocatedBytes), strings.TrimSpace(l.Creator), l.UniqueID, found)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	// What only some formats record (a VHDX's sector sizes and GUIDs), a block per layer.
	for _, l := range info.Layers {
		if len(l.Fields) == 0 {
			continue
		}
		fmt.Printf("\n%d %s:\n", l.Depth, l.Path)
		for _, f := range l.Fields {
			fmt.Printf("  %s: %s\n", f[0], f[1])
		}
	}
	return nil
}
