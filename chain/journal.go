package chain

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/vhdfs/vhdfs/internal/faults"
)

// A merge journal records a merge's intent beside the chain's top image, so that a
// merge cut short by a crash or power loss is completed or rolled back by the next
// writer of the chain (mount, merge, check --repair), and refused by readers while
// the chain on disk is between its old and new shape. Package merge writes and acts
// on it; this package finds it. A snapshot (Chain.Snapshot) journals its steps the
// same way, in PhaseSnapshot, and RecoverSnapshot here acts on that.

// JournalSuffix ends the name of a merge journal: "top.vhd" has "top.vhd.vhdfs-journal".
const JournalSuffix = ".vhdfs-journal"

// Journal phases.
const (
	// PhaseCopy: a fresh top was put above the old top (a merge from the top), and
	// the copy into the target runs. The chain on disk is valid and shows the same
	// data; the merge completes when it is run again.
	PhaseCopy = "copy"
	// PhasePrepare: before the copy changes a byte of the target, the target takes an
	// interim unique ID and the last merged layer records it (so that the target's
	// siblings refuse to open from then on). Between the two writes the chain on disk
	// is broken: the journal must be rolled forward before anything reads it.
	PhasePrepare = "prepare"
	// PhaseRelink: the copy is durable in the target and the re-link (new parent,
	// new unique IDs) is under way. The chain on disk may be between shapes: the
	// journal must be rolled forward before anything reads it.
	PhaseRelink = "relink"
	// PhaseSnapshot: a snapshot is freezing the top as Snapshot (a second name of the
	// top's file) and putting a fresh image, made at NewTop, at the top's name. The
	// chain on disk is valid at every step (the top's name holds the old top or the
	// fresh image above it); RecoverSnapshot completes or undoes it.
	PhaseSnapshot = "snapshot"
)

var ErrJournal = errors.New("an interrupted merge must be completed first")

// FileID identifies a file: its device and inode.
type FileID struct {
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

// Journal is the record of a merge in progress.
type Journal struct {
	Version int    `json:"version"`
	Phase   string `json:"phase"`
	Command string `json:"command"` // for people: "merge depth=2"
	// Top is the chain's top (real path); a merge from the top puts a fresh image
	// there (NewTopID) and moves the old one to OldTop.
	Top      string `json:"top"`
	OldTop   string `json:"old_top,omitempty"`
	NewTop   string `json:"new_top,omitempty"` // the fresh top's name before it is renamed to Top
	NewTopID string `json:"new_top_id,omitempty"`
	Depth    int    `json:"depth"` // layers merged
	// Above is re-linked to Target; it ends with unique ID AboveID (the old top's,
	// for a merge from the top, so that its children stay valid).
	Above   string `json:"above"`
	AboveF  FileID `json:"above_file"`
	AboveID string `json:"above_id"`
	// Target takes unique ID TargetNewID when the re-link is done.
	Target      string `json:"target"`
	TargetF     FileID `json:"target_file"`
	TargetOldID string `json:"target_old_id"`
	TargetMidID string `json:"target_mid_id,omitempty"` // the interim ID of PhasePrepare
	TargetNewID string `json:"target_new_id,omitempty"`
	// Last is the merged layer right above Target, pointed at TargetMidID.
	Last  string `json:"last,omitempty"`
	LastF FileID `json:"last_file"`
	// Snapshot is the name a snapshot (PhaseSnapshot) gives the old top's file.
	Snapshot string `json:"snapshot,omitempty"`
}

// JournalPath is where the journal of a chain whose top is at top lives: beside the
// file top names (after symlinks).
func JournalPath(top string) string {
	if real, err := filepath.EvalSymlinks(top); err == nil {
		top = real
	}
	return Abs(top) + JournalSuffix
}

// ReadJournal returns the journal of the chain whose top is at top, or nil if none.
func ReadJournal(top string) (*Journal, error) {
	p := JournalPath(top)
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("merge journal %s: %w", p, err)
	}
	var j Journal
	if err := json.Unmarshal(b, &j); err != nil || j.Version != 1 || (j.Phase != PhaseCopy && j.Phase != PhasePrepare && j.Phase != PhaseRelink && j.Phase != PhaseSnapshot) {
		return nil, fmt.Errorf("merge journal %s is unreadable (%v); move it away only if you know the merge it records is done", p, err)
	}
	return &j, nil
}

// Write stores j atomically (a temporary file, fsync, rename, fsync of the folder).
func (j *Journal) Write(top string) error {
	p := JournalPath(top)
	b, err := json.MarshalIndent(j, "", "  ")
	if err != nil {
		return err
	}
	tmp := p + ".tmp"
	if err := faults.Step(); err != nil {
		return err
	}
	// A new file, never through a symlink or over another file that someone put in
	// the top's directory.
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("merge journal: %w", err)
	}
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return fmt.Errorf("merge journal: %w", err)
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = faults.Step()
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = faults.Step()
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("merge journal %s: %w", p, err)
	}
	return SyncDir(filepath.Dir(p))
}

// RemoveJournal deletes the journal of the chain at top, durably.
func RemoveJournal(top string) error {
	p := JournalPath(top)
	if err := faults.Step(); err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("merge journal %s: %w", p, err)
	}
	return SyncDir(filepath.Dir(p))
}

// SyncDir makes the entries of a folder (a rename, a new or removed file) durable.
func SyncDir(dir string) error { return faults.SyncDir(dir) }

// checkJournal refuses a chain whose journal says the re-link was cut short: what
// is on disk may mix the old and new chain until it is rolled forward.
func checkJournal(top string) error {
	j, err := ReadJournal(top)
	if err != nil {
		return err
	}
	if j != nil && j.Phase != PhaseCopy && j.Phase != PhaseSnapshot {
		return fmt.Errorf("%s: a merge into %s was interrupted in its first or last step (journal %s); mount the chain read-write, run the merge again or run 'vhdfs check --repair %s' to complete it: %w",
			top, j.Target, JournalPath(top), top, ErrJournal)
	}
	return nil
}
