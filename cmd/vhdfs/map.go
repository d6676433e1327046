package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/internal/units"
)

// cmdMap prints which layer holds each run of the disk, as qemu-img map does.
func cmdMap(args []string) error {
	fs := newFlags("map")
	forceShare := fs.BoolP("force-share", "U", false, "open without locks, to read images another process has open for writing (as qemu-img -U); what it reads may be torn")
	asJSON := fs.Bool("json", false, "print JSON, in qemu-img map --output=json's shape, with each run's \"file\"")
	depth := fs.Int("depth", chain.MapAll, "list only what the layer at depth N (0 = the top) stores itself: its change set")
	parents := parentFlag(fs)
	pos, err := parse(fs, args, "IMAGE")
	if err != nil {
		return err
	}
	c, err := openChain(pos[0], chain.OpenOptions{ForceShare: *forceShare, Parents: *parents})
	if err != nil {
		return err
	}
	defer c.Close()
	if *depth != chain.MapAll && (*depth < 0 || *depth >= c.Len()) {
		return usagef("--depth %d: the chain has %d image(s), depths 0 to %d", *depth, c.Len(), c.Len()-1)
	}
	runs, err := chain.Map(c, *depth)
	if err != nil {
		return err
	}
	if *asJSON {
		return printMapJSON(runs)
	}
	return printMap(c, runs, *depth)
}

// printMapJSON writes runs as qemu-img map --output=json does: an array, one run a
// line, the fields in qemu's order, then "file".
func printMapJSON(runs []chain.MapRun) error {
	var b strings.Builder
	b.WriteString("[")
	for i, r := range runs {
		if i > 0 {
			b.WriteString(",\n")
		}
		fmt.Fprintf(&b, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
			r.Start, r.Length, r.Depth, r.Present, r.Zero, r.Data)
		if r.Offset != nil {
			fmt.Fprintf(&b, `, "offset": %d`, *r.Offset)
		}
		if r.File != "" {
			name, err := json.Marshal(r.File)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, `, "file": %s`, name)
		}
		b.WriteString("}")
	}
	b.WriteString("]\n")
	_, err := os.Stdout.WriteString(b.String())
	return err
}

// printMap writes the data runs as qemu-img map's human format does (offset in the
// disk, length, offset in the file, file), then a summary per layer.
func printMap(c *chain.Chain, runs []chain.MapRun, depth int) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	layers := c.Layers()
	data := make([]int64, len(layers)+1)
	zero := make([]int64, len(layers)+1)
	for _, r := range runs {
		if r.Data {
			data[r.Depth] += r.Length
		} else {
			zero[r.Depth] += r.Length
		}
		if !r.Data {
			continue
		}
		at := "-"
		if r.Offset != nil {
			at = hex(*r.Offset)
		}
		fmt.Fprintf(&b, "%-16s%-16s%-16s%s\n", hex(r.Start), hex(r.Length), at, r.File)
	}
	fmt.Fprintf(&b, "\n%d run(s)\n", len(runs))
	for d, l := range layers {
		if depth != chain.MapAll && d != depth {
			continue
		}
		fmt.Fprintf(&b, "depth %d %s: %s data", d, l.Path, units.Human(data[d]))
		if zero[d] > 0 {
			fmt.Fprintf(&b, ", %s stored as zeros", units.Human(zero[d]))
		}
		b.WriteString("\n")
	}
	if depth == chain.MapAll {
		fmt.Fprintf(&b, "in no layer (reads zeros): %s\n", units.Human(zero[len(layers)]))
	}
	_, err := os.Stdout.WriteString(b.String())
	return err
}

// hex prints n as qemu-img map does (%#x: 0 without a prefix).
func hex(n int64) string {
	if n == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", n)
}
