package main

import (
	"fmt"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/internal/units"
	"github.com/vhdfs/vhdfs/probe"
)

// cmdSnapshot is `create --parent IMAGE NEW` that says what it made. A mounted chain
// takes its snapshots through its control file (`snapshot NEW`): its top is locked.
func cmdSnapshot(args []string) error {
	fl := newFlags("snapshot")
	pos, err := parse(fl, args, "IMAGE", "NEW")
	if err != nil {
		return err
	}
	if err := createChild(pos[0], pos[1], "", 0); err != nil {
		return err
	}
	img, err := probe.Open(pos[1], probe.ReadOnly)
	if err != nil {
		return err
	}
	defer img.Close()
	fmt.Printf("%s: differencing image on %s, virtual size %s (%d bytes), block size %s\n",
		chain.Abs(pos[1]), chain.Abs(pos[0]), units.Human(img.Size()), img.Size(), units.Human(img.BlockSize()))
	return nil
}
