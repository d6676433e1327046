package main

import (
	"fmt"
	"os"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/merge"
	"github.com/vhdfs/vhdfs/vhd"
)

// checkFailed is returned when check found errors; they were already printed.
type checkFailed struct{}

func (checkFailed) Error() string { return "check found errors" }

func cmdCheck(args []string) error {
	fs := newFlags("check")
	forceShare := fs.BoolP("force-share", "U", false, "open without locks, to read images another process has open for writing (as qemu-img -U); what it reads may be torn")
	parents := parentFlag(fs)
	repair := fs.Bool("repair", false, "complete or roll back an interrupted merge; restore a damaged end footer from the copy at offset 0")
	pos, err := parse(fs, args, "IMAGE")
	if err != nil {
		return err
	}
	if *repair && *forceShare {
		return usagef("--repair writes; it cannot be combined with --force-share")
	}
	if *repair {
		msg, err := merge.Recover(pos[0])
		if err != nil {
			return err
		}
		if msg != "" {
			fmt.Printf("%s: repaired: %s\n", pos[0], msg)
		}
	}
	checkChain := func(path string) []vhd.Problem {
		return chain.CheckWith(path, chain.OpenOptions{ForceShare: *forceShare, Parents: *parents})
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
			if st, err := vhdFooterState(p.File); err != nil || st != vhd.FooterCopyOnly {
				continue
			}
			fixed, err := vhd.RepairFooter(p.File)
			if err != nil {
				return err
			}
			if fixed {
				fmt.Printf("%s: repaired: footer at the end restored from the copy at offset 0\n", p.File)
				repaired = true
			}
		}
		if repaired {
			problems = checkChain(pos[0])
		}
	}
	errs := 0
	for _, p := range problems {
		if p.Severity == vhd.Error {
			errs++
			fmt.Fprintln(os.Stderr, p)
		} else {
			fmt.Println(p)
		}
	}
	if errs > 0 {
		return checkFailed{}
	}
	fmt.Printf("%s: chain is consistent\n", pos[0])
	return nil
}

func vhdFooterState(path string) (vhd.FooterState, error) {
	img, err := vhd.Open(path, false)
	if err != nil {
		return 0, err
	}
	defer img.Close()
	st, _ := img.FooterState()
	return st, nil
}
