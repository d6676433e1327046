package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/merge"
	"github.com/vhdfs/vhdfs/probe"
)

// checkFailed is returned when check found errors; they were already printed.
type checkFailed struct{}

func (checkFailed) Error() string { return "check found errors" }

func cmdCheck(args []string) error {
	fs := newFlags("check")
	forceShare := fs.BoolP("force-share", "U", false, "open without locks, to read images another process has open for writing (as qemu-img -U); what it reads may be torn")
	parents := parentFlag(fs)
	repair := fs.Bool("repair", false, "complete or roll back an interrupted merge; restore a damaged end footer from the copy at offset 0")
	asJSON := fs.Bool("json", false, "print the result as JSON: every finding with its severity, and the chain as info --json shows it")
	verbose := fs.BoolP("verbose", "v", false, "also print the notes: what is unusual but harmless, such as how the tool that made an image writes it")
	forceRW := forceRWFlag(fs)
	salvage := salvageFlag(fs)
	pos, err := parse(fs, args, "IMAGE")
	if err != nil {
		return err
	}
	fileio.AllowWriteProtected(*forceRW)
	if *repair && *salvage {
		return usagef("--repair writes; it cannot be combined with --salvage")
	}
	if *repair && *forceShare {
		return usagef("--repair writes; it cannot be combined with --force-share")
	}
	if !*forceShare {
		// The top of a read-write mount is not to be opened, even to read: say where
		// it is mounted. (A repair opens for writing only what it repairs.)
		if img, err := probe.Open(pos[0], probe.ReadOnly); err == nil {
			img.Close()
		} else if errors.Is(err, image.ErrLocked) {
			instead := "vhdfs check -U to read it as it is"
			if *repair {
				instead = ""
			}
			return mountedErr(pos[0], err, instead)
		}
	}
	var repairs []string
	if *repair {
		msg, err := merge.Recover(pos[0])
		if err != nil {
			return err
		}
		if msg != "" {
			repairs = append(repairs, fmt.Sprintf("%s: repaired: %s", pos[0], msg))
		}
	}
	checkChain := func(path string) []image.Problem {
		return chain.CheckWith(path, chain.OpenOptions{ForceShare: *forceShare, Parents: *parents, Salvage: *salvage})
	}
	problems := checkChain(pos[0])
	if *repair {
		repaired := false
		done := map[string]bool{}
		for _, p := range problems {
			if done[p.File] {
				continue
			}
			done[p.File] = true
			msg, err := probe.Repair(p.File)
			if err != nil {
				return mountedErr(p.File, err, "")
			}
			if msg != "" {
				repairs = append(repairs, p.File+": repaired: "+msg)
				repaired = true
			}
		}
		if repaired {
			problems = checkChain(pos[0])
		}
	}
	errs := 0
	for _, p := range problems {
		if p.Severity == image.Error {
			errs++
		}
	}
	if *asJSON {
		out := checkJSON{Image: pos[0], Consistent: errs == 0, Repaired: repairs, Problems: []problemJSON{}}
		for _, p := range problems {
			out.Problems = append(out.Problems, problemJSON{Severity: p.Severity.String(), File: p.File, Message: p.Message})
		}
		if info, err := chain.Inspect(pos[0], chain.OpenOptions{ForceShare: *forceShare, Parents: *parents, Salvage: *salvage}); err == nil || len(info.Layers) > 0 {
			out.Chain = &info
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return err
		}
		if errs > 0 {
			return checkFailed{}
		}
		return nil
	}
	for _, line := range repairs {
		fmt.Println(line)
	}
	for _, p := range problems {
		switch {
		case p.Severity == image.Error:
			fmt.Fprintln(os.Stderr, p)
		case p.Severity == image.Note && !*verbose:
		default:
			fmt.Println(p)
		}
	}
	if errs > 0 {
		return checkFailed{}
	}
	fmt.Printf("%s: chain is consistent\n", pos[0])
	return nil
}

// checkJSON is check --json's output; the chain has info --json's schema (and the
// control file status's layers).
type checkJSON struct {
	Image      string        `json:"image"`
	Consistent bool          `json:"consistent"`
	Repaired   []string      `json:"repaired,omitempty"`
	Problems   []problemJSON `json:"problems"`
	Chain      *chain.Info   `json:"chain,omitempty"`
}

type problemJSON struct {
	Severity string `json:"severity"`
	File     string `json:"file"`
	Message  string `json:"message"`
}
