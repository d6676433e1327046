package main

import (
	"fmt"

	"github.com/vhdfs/vhdfs/chain"
)

// cmdSnapshot freezes IMAGE's current state as NEW (beside it) and keeps IMAGE as the
// live top, a new empty differencing image on NEW (chain.SnapshotFile). A mounted
// chain takes its snapshots through its control file (`snapshot NEW`): its top is locked.
func cmdSnapshot(args []string) error {
	fl := newFlags("snapshot")
	pos, err := parse(fl, args, "IMAGE", "NEW")
	if err != nil {
		return err
	}
	s, err := chain.SnapshotFile(pos[0], pos[1])
	if s.Frozen == "" {
		return err
	}
	fmt.Printf("%s: the state of %s, frozen; %s stays the live top, a new differencing image on it, virtual size %s (%d bytes), block size %s\n",
		s.Frozen, s.Top, s.Top, human(s.Size), s.Size, human(s.BlockSize))
	return err
}
