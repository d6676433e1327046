package merge

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/units"
	"github.com/vhdfs/vhdfs/probe"
)

// Recover acts on the merge or snapshot journal of the chain whose top is at top, if
// there is one, before a writer opens the chain. A snapshot cut short is completed if
// its fresh top took the top's name, else undone (chain.RecoverSnapshot). A re-link that was cut short is completed
// (every step of it is repeated or found done), and so is the interim ID of the
// target taken before the copy. A merge from the top cut short before its re-link is
// rolled back if nothing was written to its fresh top, and otherwise left pending
// (the chain on disk is valid and shows the same data; the same merge run again
// completes it). It returns a line for people saying which, or "" if there was no
// journal.
func Recover(top string) (string, error) {
	msg, err := recoverJournal(top)
	if err != nil {
		return "", err
	}
	// Then the logs of the chain's images: a crash while a merge wrote its target
	// (with or without a journal) can leave one there, which readers replay in
	// memory only, and qemu refuses.
	c, err := chain.OpenWith(top, chain.OpenOptions{ForceShare: true})
	if err != nil {
		return msg, nil // the writer's own open says why
	}
	var pending []string
	for _, l := range c.Layers() {
		if lh, ok := l.Image.(image.LogHolder); ok && lh.LogPending() {
			pending = append(pending, l.Path)
		}
	}
	c.Close()
	for _, p := range pending {
		replayed, err := replayInto(p)
		if err != nil {
			return "", fmt.Errorf("%s: %w", top, err)
		}
		if replayed {
			msg = strings.TrimPrefix(msg+"; replayed the log of "+p, "; ")
		}
	}
	return msg, nil
}

// recoverJournal is Recover's work on the journal.
func recoverJournal(top string) (string, error) {
	j, err := chain.ReadJournal(top)
	if err != nil || j == nil {
		return "", err
	}
	jp := chain.JournalPath(top)
	fail := func(err error) (string, error) {
		return "", fmt.Errorf("%s: recovering the interrupted %q (journal %s): %w", top, j.Command, jp, err)
	}
	// A cut inside a VHDX's log write leaves entries to replay: the files the merge
	// wrote get them replayed into the file first, whatever is done next.
	for _, p := range []string{j.Top, j.OldTop, j.Target, j.Last, j.Above} {
		if _, err := replayLog(p); err != nil {
			return fail(err)
		}
	}
	if j.Phase == chain.PhaseSnapshot {
		msg, err := chain.RecoverSnapshot(j)
		if err != nil {
			return fail(err)
		}
		return msg, nil
	}
	if j.Phase == chain.PhaseRelink {
		if err := rollForward(j); err != nil {
			return fail(err)
		}
		return fmt.Sprintf("completed the interrupted %q into %s (journal %s)", j.Command, j.Target, jp), nil
	}
	if j.OldTop != "" {
		pushed, err := pushDone(j)
		if err != nil {
			return fail(err)
		}
		if !pushed {
			if err := unpush(j, false); err != nil {
				return fail(err)
			}
			return fmt.Sprintf("rolled back the interrupted %q: it had not changed the chain (journal %s)", j.Command, jp), nil
		}
	}
	note := ""
	if j.Phase == chain.PhasePrepare {
		if err := completePrepare(j); err != nil {
			return fail(err)
		}
	}
	if j.TargetMidID != "" {
		note = fmt.Sprintf("; %s has a new unique ID, so its other children are no longer valid", j.Target)
	}
	if j.OldTop == "" {
		if err := chain.RemoveJournal(j.Top); err != nil {
			return fail(err)
		}
		return fmt.Sprintf("rolled back the interrupted %q: the chain is as it was%s (journal %s)", j.Command, note, jp), nil
	}
	cur, err := probe.Open(j.Top, probe.ReadOnly)
	if err != nil {
		return fail(err)
	}
	allocated := cur.AllocatedBytes()
	cur.Close()
	if allocated > 0 {
		j.Phase = chain.PhaseCopy
		if err := j.Write(j.Top); err != nil {
			return fail(err)
		}
		return fmt.Sprintf("%q was interrupted during its copy; what was written since it began (%s) is in a new top image above the old one (%s); the chain shows the same data; run the same merge again to complete it%s (journal %s)",
			j.Command, units.Text(allocated), j.OldTop, note, jp), nil
	}
	if err := unpush(j, true); err != nil {
		return fail(err)
	}
	return fmt.Sprintf("rolled back the interrupted %q: the old top is back at %s%s (journal %s)", j.Command, j.Top, note, jp), nil
}

// replayLog replays into the file the log entries an image at path holds, if its
// format has a log and the log is not empty, and says whether it did. No file
// there, or one another process has open, is left as it is (a reader replays the
// log in memory).
func replayLog(path string) (bool, error) {
	if path == "" {
		return false, nil
	}
	img, err := probe.Open(path, probe.ForceShare)
	if err != nil {
		return false, nil // the steps that need the file say why
	}
	lh, ok := img.(image.LogHolder)
	pending := ok && lh.LogPending()
	img.Close()
	if !pending {
		return false, nil
	}
	return replayInto(path)
}

// replayInto opens path for writing, which replays its log into the file, and says
// whether it could (not when another process has the file open).
func replayInto(path string) (bool, error) {
	w, err := probe.Open(path, probe.Writable)
	if errors.Is(err, image.ErrLocked) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return true, w.Close()
}

// pushDone reports whether the fresh top of a merge from the top took the top's
// name: the old top then has its second name, and only that one. (Not by the fresh
// top's ID: a VHDX changes its ID when it is first written.)
func pushDone(j *chain.Journal) (bool, error) {
	old, err := os.Stat(j.OldTop)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	top, err := os.Stat(j.Top)
	if err != nil {
		return false, err
	}
	return !os.SameFile(old, top), nil
}

// unpush takes the fresh top of a merge from the top away: when it has the top's
// name (done), the old top is renamed back over it; otherwise the fresh file and
// the second name of the old top go. Then the journal goes.
func unpush(j *chain.Journal, done bool) error {
	if done {
		if err := os.Rename(j.OldTop, j.Top); err != nil {
			return err
		}
	} else {
		os.Remove(j.NewTop)
		if old, err := os.Stat(j.OldTop); err == nil {
			if st, err := os.Stat(j.Top); err == nil && os.SameFile(old, st) {
				os.Remove(j.OldTop)
			}
		}
	}
	if err := chain.SyncDir(filepath.Dir(j.Top)); err != nil {
		return err
	}
	return chain.RemoveJournal(j.Top)
}

// completePrepare repeats the two writes of a merge's prepare step.
func completePrepare(j *chain.Journal) error {
	mid, err := image.ParseID(j.TargetMidID)
	if err != nil {
		return err
	}
	return repoint(j.Target, j.TargetF, mid, j.Last, j.LastF, nil)
}

// rollForward repeats the steps of a journaled re-link; each is done again or found
// done. The files are checked by device and inode against the journal.
func rollForward(j *chain.Journal) error {
	newID, err := image.ParseID(j.TargetNewID)
	if err != nil {
		return err
	}
	aboveID, err := image.ParseID(j.AboveID)
	if err != nil {
		return err
	}
	if err := repoint(j.Target, j.TargetF, newID, j.Above, j.AboveF, &aboveID); err != nil {
		return err
	}
	if j.OldTop != "" {
		if err := os.Remove(j.OldTop); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return chain.RemoveJournal(j.Top)
}

// repoint makes the image child record targetID as its parent's unique ID (with
// locators to target), gives it childID if that is set, and then gives the target
// targetID, in the order a merge does; each write is repeated or found done. The ID
// writes are always repeated: a VHD's footer copy at offset 0 may lag the one at the end.
func repoint(target string, targetF chain.FileID, targetID image.ID, child string, childF chain.FileID, childID *image.ID) error {
	t, err := openChecked(target, targetF)
	if err != nil {
		return err
	}
	c, err := openChecked(child, childF)
	if err != nil {
		t.Close()
		return err
	}
	if c.ParentID() != targetID {
		err = c.SetParent(targetID, target, child)
	}
	if err == nil && childID != nil {
		err = c.SetID(*childID)
	}
	if err == nil {
		err = t.SetID(targetID)
	}
	if cerr := c.Close(); err == nil {
		err = cerr
	}
	if cerr := t.Close(); err == nil {
		err = cerr
	}
	return err
}

func openChecked(path string, id chain.FileID) (image.Image, error) {
	img, err := probe.Open(path, probe.Writable)
	if err != nil {
		return nil, err
	}
	if dev, ino := img.FileID(); dev != id.Dev || ino != id.Ino {
		img.Close()
		return nil, fmt.Errorf("%s: is not the file the journal names (device/inode %d/%d, journal %d/%d): it was moved or replaced", path, dev, ino, id.Dev, id.Ino)
	}
	return img, nil
}
