package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/internal/units"
)

// cmdSnapshot freezes IMAGE's current state as NEW (beside it) and keeps IMAGE as the
// live top, a new empty differencing image on NEW (chain.SnapshotFile). The top of a
// chain mounted read-write is locked by its mount: that mount makes the snapshot
// (`snapshot NEW` to its control file), as `vhdfs merge` has it merge.
func cmdSnapshot(args []string) error {
	fl := newFlags("snapshot")
	pos, err := parse(fl, args, "IMAGE", "NEW")
	if err != nil {
		return err
	}
	rec, st, err := servingMount(pos[0])
	if err != nil {
		return err
	}
	if rec != nil && !st.ReadOnly {
		return snapshotMounted(rec, pos[0], pos[1])
	}
	s, err := chain.SnapshotFile(pos[0], pos[1])
	if s.Frozen == "" {
		return err
	}
	fmt.Printf("%s: the state of %s, frozen; %s stays the live top, a new differencing image on it, virtual size %s (%d bytes), block size %s\n",
		s.Frozen, s.Top, s.Top, units.Human(s.Size), s.Size, units.Human(s.BlockSize))
	return err
}

// snapshotMounted has the mount rec serves make NEW on its top. The mount makes it
// beside its top image (see fs's snapshotName): NEW goes as an absolute path, which
// the mount refuses, changing nothing, when it names another directory.
func snapshotMounted(rec *mountRecord, top, name string) error {
	mnt := rec.Mountpoint
	abs := chain.Abs(name)
	if _, err := os.Lstat(abs); err == nil {
		return fmt.Errorf("%s: %w", name, os.ErrExist)
	}
	if real, err := filepath.EvalSymlinks(top); err == nil {
		dir := filepath.Dir(chain.Abs(real))
		a, aerr := os.Stat(filepath.Dir(abs))
		b, berr := os.Stat(dir)
		if aerr != nil || berr != nil || !os.SameFile(a, b) {
			return fmt.Errorf("%s: %s is mounted at %s, whose snapshots are made beside it, in %s; name one there, or unmount it (vhdfs umount %s) to make one elsewhere",
				name, top, mnt, dir, mnt)
		}
	}
	line := "snapshot " + abs
	fmt.Fprintf(os.Stderr, "vhdfs snapshot: %s is mounted at %s: the mount makes the snapshot (%q to %s)\n",
		top, mnt, line, filepath.Join(mnt, "control"))
	d := waitTimeout()
	if err := writeControlOf(mnt, line, d); err != nil {
		if errors.Is(err, errNoAnswer) {
			return fmt.Errorf("%s: mount process %d serving %s did not answer %q within %v", top, rec.PID, mnt, line, d)
		}
		if lost := lostMount(err, rec, "snapshot"); lost != nil {
			if _, serr := os.Lstat(abs); serr == nil {
				// Made, or cut short: the next mount of the top finishes or undoes it.
				return fmt.Errorf("the mount process (pid %d) ended while it made the snapshot %s; %s is the live top either way: `vhdfs umount %s`, mount %s again (it finishes or undoes the snapshot), and see with vhdfs info whether %s is in its chain",
					rec.PID, abs, top, mnt, top, abs)
			}
			return lost
		}
		return fmt.Errorf("%s: %v", top, err)
	}
	st, err := statusOf(mnt, d)
	if err != nil {
		return fmt.Errorf("%s: snapshot %s made through %s, but its status: %v", top, abs, mnt, noAnswer(err, fmt.Sprintf("mount process %d", rec.PID), d))
	}
	if len(st.Chain) < 2 {
		return fmt.Errorf("%s: snapshot %s made through %s, but its chain has %d layer(s)", top, abs, mnt, len(st.Chain))
	}
	l, p := st.Chain[0], st.Chain[1]
	block := "-"
	if l.BlockSize > 0 {
		block = units.Human(l.BlockSize)
	}
	fmt.Printf("%s: the state of %s, frozen; %s stays the live top, a new differencing image on it, virtual size %s (%d bytes), block size %s (the mount at %s)\n",
		chain.Abs(p.Path), chain.Abs(l.Path), chain.Abs(l.Path), units.Human(l.VirtualSize), l.VirtualSize, block, mnt)
	return nil
}

// lostMount words a control write that lost its mount process (the FUSE connection
// ended under it: ECONNABORTED for the write in flight, ENOTCONN after), or nil for
// another error. A merge or snapshot cut short this way leaves the chain as it was
// (a merge's journal is finished or rolled back by the next mount or check --repair).
func lostMount(err error, rec *mountRecord, what string) error {
	if !errors.Is(err, syscall.ECONNABORTED) && !errors.Is(err, syscall.ENOTCONN) {
		return nil
	}
	how := "ended"
	if !exitedSoon(rec) {
		how = "lost its FUSE connection"
	}
	return fmt.Errorf("the mount process (pid %d) %s; the chain is intact: `vhdfs umount %s`, mount again and repeat the %s",
		rec.PID, how, rec.Mountpoint, what)
}
