package merge

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/vhd"
)

// Recover acts on the merge journal of the chain whose top is at top, if there is
// one, before a writer opens the chain. A re-link that was cut short is completed
// (every step of it is repeated or found done); a merge from the top cut short
// before its re-link is rolled back if nothing was written to its fresh top, and
// otherwise left pending (the chain on disk is valid and shows the same data; the
// same merge run again completes it). It returns a line for people saying which,
// or "" if there was no journal.
func Recover(top string) (string, error) {
	j, err := chain.ReadJournal(top)
	if err != nil || j == nil {
		return "", err
	}
	jp := chain.JournalPath(top)
	if j.Phase == chain.PhaseCopy {
		return recoverCopy(j, jp)
	}
	if err := rollForward(j); err != nil {
		return "", fmt.Errorf("%s: completing the interrupted %q (journal %s): %w", top, j.Command, jp, err)
	}
	return fmt.Sprintf("completed the interrupted %q into %s (journal %s)", j.Command, j.Target, jp), nil
}

// recoverCopy undoes the push of a merge from the top that stopped during its copy,
// when the fresh top holds nothing.
func recoverCopy(j *chain.Journal, jp string) (string, error) {
	cur, err := vhd.Open(j.Top, false)
	if err != nil {
		return "", err
	}
	id := cur.Footer().UniqueID.String()
	allocated := cur.AllocatedBytes()
	cur.Close()
	if id != j.NewTopID {
		// The fresh top never took the top's name: the old chain is whole.
		os.Remove(j.NewTop)
		if old, err := os.Stat(j.OldTop); err == nil {
			if st, err := os.Stat(j.Top); err == nil && os.SameFile(old, st) {
				os.Remove(j.OldTop)
			}
		}
		if err := chain.SyncDir(filepath.Dir(j.Top)); err != nil {
			return "", err
		}
		if err := chain.RemoveJournal(j.Top); err != nil {
			return "", err
		}
		return fmt.Sprintf("rolled back the interrupted %q: it had not changed the chain (journal %s)", j.Command, jp), nil
	}
	if allocated > 0 {
		return fmt.Sprintf("%q was interrupted during its copy; the %d bytes written since it began are in a new top image above the old one (%s); the chain shows the same data; run the same merge again to complete it (journal %s)",
			j.Command, allocated, j.OldTop, jp), nil
	}
	if err := os.Rename(j.OldTop, j.Top); err != nil {
		return "", err
	}
	if err := chain.SyncDir(filepath.Dir(j.Top)); err != nil {
		return "", err
	}
	if err := chain.RemoveJournal(j.Top); err != nil {
		return "", err
	}
	return fmt.Sprintf("rolled back the interrupted %q: the old top is back at %s (journal %s)", j.Command, j.Top, jp), nil
}

// rollForward repeats the steps of a journaled re-link; each is done again or found
// done. The files are checked by device and inode against the journal.
func rollForward(j *chain.Journal) error {
	newID, err := vhd.ParseUUID(j.TargetNewID)
	if err != nil {
		return err
	}
	aboveID, err := vhd.ParseUUID(j.AboveID)
	if err != nil {
		return err
	}
	target, err := openChecked(j.Target, j.TargetF)
	if err != nil {
		return err
	}
	defer target.Close()
	above, err := openChecked(j.Above, j.AboveF)
	if err != nil {
		return err
	}
	defer above.Close()
	if h, _ := above.Header(); h.ParentUniqueID != newID {
		if err := above.SetParent(newID, j.Target, j.Above); err != nil {
			return err
		}
	}
	if above.Footer().UniqueID != aboveID {
		if err := above.SetUniqueID(aboveID); err != nil {
			return err
		}
	}
	// Also when the ID is in force: the copy at offset 0 may still have the old one.
	if err := target.SetUniqueID(newID); err != nil {
		return err
	}
	if j.OldTop != "" {
		if err := os.Remove(j.OldTop); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if err := above.Close(); err != nil {
		return err
	}
	if err := target.Close(); err != nil {
		return err
	}
	return chain.RemoveJournal(j.Top)
}

func openChecked(path string, id chain.FileID) (*vhd.Image, error) {
	img, err := vhd.Open(path, true)
	if err != nil {
		return nil, err
	}
	if dev, ino := img.FileID(); dev != id.Dev || ino != id.Ino {
		img.Close()
		return nil, fmt.Errorf("%s: is not the file the journal names (device/inode %d/%d, journal %d/%d): it was moved or replaced", path, dev, ino, id.Dev, id.Ino)
	}
	return img, nil
}
