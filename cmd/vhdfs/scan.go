package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/vhdfs/vhdfs/chain"
)

// cmdScan lists the images of directories as chains, by ID, without locking them.
func cmdScan(args []string) error {
	fs := newFlags("scan")
	asJSON := fs.Bool("json", false, "print JSON: {\"images\": [...], \"skipped\": [...]}")
	recursive := fs.BoolP("recursive", "r", false, "scan subdirectories too")
	pos, err := parse(fs, args, "DIR...")
	if err != nil {
		return err
	}
	res, err := chain.Scan(pos, chain.ScanOptions{Recursive: *recursive})
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	var b strings.Builder
	for _, im := range res.Images {
		fmt.Fprintf(&b, "%-7s %s", im.State, strings.Join(im.Chain, " -> "))
		switch {
		case im.BrokenAt == "":
		case im.State == chain.StateStale:
			// The chain's last image records a parent whose ID changed.
			last := res.Images[indexOf(res.Images, im.BrokenAt)]
			fmt.Fprintf(&b, " -x %s (its ID changed: merged into or written since)", last.Parent)
		default:
			last := res.Images[indexOf(res.Images, im.BrokenAt)]
			fmt.Fprintf(&b, " -> ? (parent %s not found)", last.ParentID)
		}
		if len(im.Siblings) > 0 {
			fmt.Fprintf(&b, "  [siblings: %s]", strings.Join(im.Siblings, ", "))
		}
		b.WriteString("\n")
	}
	if _, err := os.Stdout.WriteString(b.String()); err != nil {
		return err
	}
	for _, s := range res.Skipped {
		fmt.Fprintf(os.Stderr, "vhdfs scan: skipped %s: %s\n", s.Path, s.Reason)
	}
	return nil
}

func indexOf(images []chain.ScannedImage, path string) int {
	for i, im := range images {
		if im.Path == path {
			return i
		}
	}
	return -1
}
