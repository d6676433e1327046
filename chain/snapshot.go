package chain

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/image"
	"github.com/vhdfs/vhdfs/internal/faults"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/probe"
)

// The hidden names beside a top image ("top.vhd": ".top.vhd" + suffix) of the files
// a merge from the top or a snapshot makes there: a merge's fresh top (NewTopSuffix)
// and the old top's second name while it merges (MergingSuffix); a snapshot's fresh
// top (snapshotSuffix).
const (
	NewTopSuffix   = ".vhdfs-new"
	MergingSuffix  = ".vhdfs-merging"
	snapshotSuffix = ".vhdfs-snapshot"
)

// Snapshot freezes the chain's current state as name and keeps the top's path as the
// live top, as an LVM or btrfs snapshot leaves its origin in place: name becomes a
// second name of the top's file (which keeps its unique ID, so its children stay
// valid through name) and a fresh, empty differencing image on it, with a new unique
// ID, takes the top's path. It returns the frozen layer, now the top's parent,
// read-only (its lock a reader's) and unchanged from then on.
//
// Every moment has a valid chain on disk: the fresh image is made at a hidden name,
// name is linked to the top's file, and the fresh image is renamed over the top's
// name, in that order, with a journal (PhaseSnapshot) that RecoverSnapshot uses to
// complete or undo a snapshot a crash cut short. Writes wait only for the link,
// the rename and the swap of the layers; reads never wait.
//
// name must be a file in the directory that holds the top image (after symlinks) and
// must not exist (an error wrapping os.ErrExist): it is linked through a descriptor
// of that directory, never through a symlink or over a file. The fresh top is owned
// like the top and has its mode. The caller serialises Snapshot with merges.
func (c *Chain) Snapshot(name string) (*Layer, error) { return c.SnapshotWith(name, nil) }

// SnapshotWith is Snapshot that calls hook, if set, at each of its steps on disk:
// "snapshot-journal" once the journal is written, "snapshot-made" once the fresh top
// is made, "snapshot-linked" once name is linked to the top's file, and
// "snapshot-renamed" once the fresh top has the top's name; tests kill the process
// there.
func (c *Chain) SnapshotWith(name string, hook func(point string)) (*Layer, error) {
	if hook == nil {
		hook = func(string) {}
	}
	top := c.Layers()[0]
	if !top.Image.Writable() {
		return nil, fmt.Errorf("snapshot of %s: %w", top.Path, ErrReadOnly)
	}
	if c.Len() >= MaxDepth {
		return nil, fmt.Errorf("snapshot of %s: the chain already holds %d images, the most a chain may: %w", top.Path, c.Len(), ErrTooDeep)
	}
	real, err := filepath.EvalSymlinks(top.Path)
	if err != nil {
		return nil, fmt.Errorf("snapshot of %s: %w", top.Path, err)
	}
	real = Abs(real)
	if j, err := ReadJournal(real); err != nil {
		return nil, err
	} else if j != nil && j.Phase == PhaseSnapshot {
		// Left by a snapshot that failed to clean up after itself: what is on disk is
		// what this chain has open (the swap happens exactly when the rename did).
		if _, err := RecoverSnapshot(j); err != nil {
			return nil, fmt.Errorf("snapshot of %s: %w", top.Path, err)
		}
	} else if j != nil {
		return nil, fmt.Errorf("snapshot of %s: %q is pending (journal %s); run it again first: %w", top.Path, j.Command, JournalPath(real), ErrPending)
	}
	dir, base := filepath.Split(name)
	dirFD, err := snapshotDir(dir, real, top.Image)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", name, err)
	}
	defer unix.Close(dirFD)
	topBase := filepath.Base(real)
	newPath := filepath.Join(filepath.Dir(real), base)
	var st unix.Stat_t
	if err := unix.Fstatat(dirFD, base, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
		return nil, fmt.Errorf("snapshot %s: %w", name, os.ErrExist)
	} else if err != unix.ENOENT {
		return nil, fmt.Errorf("snapshot %s: %w", name, err)
	}
	if reservedName(base) {
		return nil, fmt.Errorf("snapshot %s: vhdfs keeps names like this for its own work files (journals, fresh tops), which it removes or replaces: %w", name, image.ErrInvalidArg)
	}
	hidden := "." + topBase + snapshotSuffix
	// No journal names it: a leftover of nothing we know. Never the top itself.
	if err := unix.Fstatat(dirFD, hidden, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
		if dev, ino := top.Image.FileID(); uint64(st.Dev) == dev && st.Ino == ino {
			return nil, fmt.Errorf("snapshot of %s: %s is a second name of the top; remove it first", top.Path, hidden)
		}
		unix.Unlinkat(dirFD, hidden, 0)
	}
	j := &Journal{Version: 1, Phase: PhaseSnapshot, Command: "snapshot " + base, Top: real,
		NewTop: filepath.Join(filepath.Dir(real), hidden), Snapshot: newPath}
	if err := j.Write(real); err != nil {
		return nil, err
	}
	hook("snapshot-journal")
	linked := false
	var img image.Image
	fail := func(err error) (*Layer, error) {
		if img != nil {
			img.Close()
		}
		faults.Durably(func() error { return unix.Unlinkat(dirFD, hidden, 0) })
		if linked {
			faults.Durably(func() error { return unix.Unlinkat(dirFD, base, 0) })
		}
		if jerr := RemoveJournal(real); jerr != nil {
			err = fmt.Errorf("%w; %v", err, jerr)
		}
		return nil, err
	}
	via := fmt.Sprintf("/proc/self/fd/%d/%s", dirFD, hidden)
	// Made before the write lock, which holds writes off only for the swap (the
	// fresh top's parent ID is checked again under it).
	if err := top.Image.CreateChild(via, image.ChildOptions{ParentPath: newPath, LocatorPath: real}); err != nil {
		return fail(fmt.Errorf("snapshot %s: %w", name, err))
	}
	// Owned like the top, through a descriptor: a link put in the hidden name's
	// place is refused, never chmod'ed or chown'ed.
	dev, ino, err := fileio.OwnLike(via, real)
	if err != nil {
		return fail(fmt.Errorf("snapshot %s: %w", name, err))
	}
	// Opened (and locked) before the rename: nothing can fail between the rename and
	// the swap that would leave the chain writing to the frozen file.
	if img, err = probe.Open(via, probe.Writable); err != nil {
		return fail(fmt.Errorf("snapshot %s: %w", name, err))
	}
	if d, i := img.FileID(); d != dev || i != ino {
		return fail(fmt.Errorf("snapshot %s: the file was replaced while it was made", name))
	}
	hook("snapshot-made")
	unlock := c.WriteLock()
	defer unlock()
	layers := c.Layers()
	old := layers[0]
	if old != top {
		return fail(fmt.Errorf("snapshot of %s: the top changed meanwhile", top.Path))
	}
	if err := c.SyncLocked(); err != nil {
		return fail(err)
	}
	// A write since the fresh top was made may have given the top a new ID (a VHDX's
	// first change of data does; no write reaches it after the swap): the fresh top
	// records the one it has now.
	if id := old.Image.ID(); !img.AcceptsParent(id) {
		if err := img.SetParent(id, newPath, real); err != nil {
			return fail(err)
		}
	}
	// Through the descriptor, so before or after the rename alike; before it, so that
	// nothing fails between the rename and the swap.
	ro, err := old.Image.Reopen(false)
	if err != nil {
		return fail(err)
	}
	// The frozen name: a new link, refused (EEXIST) over anything there, and made of
	// the name the top's file has in the directory, never through a symlink.
	err = faults.Durably(func() error { return unix.Linkat(dirFD, topBase, dirFD, base, 0) })
	if err == nil {
		linked = true
		if err = unix.Fstatat(dirFD, base, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
			if dev, ino := old.Image.FileID(); uint64(st.Dev) != dev || st.Ino != ino {
				err = fmt.Errorf("%s no longer names the top image", real)
			}
		}
	}
	if err != nil {
		ro.Close()
		if errors.Is(err, unix.EEXIST) {
			err = os.ErrExist
		}
		return fail(fmt.Errorf("snapshot %s: %w", name, err))
	}
	hook("snapshot-linked")
	if err := faults.Durably(func() error { return unix.Renameat(dirFD, hidden, dirFD, topBase) }); err != nil {
		ro.Close()
		return fail(fmt.Errorf("snapshot %s: rename %s to %s: %w", name, hidden, topBase, err))
	}
	// The rename happened: the chain on disk is the new one, and so is this one from
	// here on. The journal's removal syncs the directory again.
	syncErr := SyncDir(filepath.Dir(real))
	hook("snapshot-renamed")
	img.SetName(real)
	ro.SetName(newPath)
	fresh := &Layer{Image: img, Path: top.Path}
	frozen := &Layer{Image: ro, Path: newPath, FoundBy: FirstLocator(img)}
	c.Replace(append([]*Layer{fresh, frozen}, layers[1:]...))
	// The swap is done and synced: a failing close loses nothing written.
	cerr := old.Image.Close()
	if err := RemoveJournal(real); err != nil {
		return frozen, fmt.Errorf("snapshot %s made (the top %s is a new image on it), but its journal stays: %w", name, top.Path, err)
	}
	if syncErr != nil {
		return frozen, fmt.Errorf("snapshot %s made (the top %s is a new image on it); syncing %s: %w", name, top.Path, filepath.Dir(real), syncErr)
	}
	if cerr != nil {
		return frozen, fmt.Errorf("snapshot %s made; closing the old top's writable handle: %w", name, cerr)
	}
	return frozen, nil
}

// RecoverSnapshot completes or undoes the snapshot journal j records (PhaseSnapshot)
// and says which: if the fresh top was renamed to the top's name the snapshot is
// done, and only the journal goes; otherwise the fresh file and the frozen name (only
// while it is a second name of the top's file) go, and the chain is as it was.
func RecoverSnapshot(j *Journal) (string, error) {
	if j.Phase != PhaseSnapshot || j.Top == "" || j.NewTop == "" || j.Snapshot == "" ||
		filepath.Dir(j.NewTop) != filepath.Dir(j.Top) || filepath.Dir(j.Snapshot) != filepath.Dir(j.Top) {
		return "", fmt.Errorf("snapshot journal %s does not name a snapshot beside %s: %w", JournalPath(j.Top), j.Top, ErrJournal)
	}
	top, err := os.Lstat(j.Top)
	if err != nil {
		return "", fmt.Errorf("snapshot journal %s: the top: %w", JournalPath(j.Top), err)
	}
	// Never a name of the top's file: after the rename the hidden name is gone, and
	// before it the top is the old one.
	if st, err := os.Lstat(j.NewTop); err == nil && !os.SameFile(st, top) {
		if err := faults.Durably(func() error { return os.Remove(j.NewTop) }); err != nil {
			return "", err
		}
	}
	done := true
	if st, err := os.Lstat(j.Snapshot); err != nil || os.SameFile(st, top) {
		// Not linked, or linked and the rename not done (a second name of the top).
		done = false
		if err == nil {
			if err := faults.Durably(func() error { return os.Remove(j.Snapshot) }); err != nil {
				return "", err
			}
		}
	}
	if err := SyncDir(filepath.Dir(j.Top)); err != nil {
		return "", err
	}
	if err := RemoveJournal(j.Top); err != nil {
		return "", err
	}
	if done {
		return fmt.Sprintf("completed the interrupted %q: %s is the state it froze, %s the live top on it (journal %s)", j.Command, j.Snapshot, j.Top, JournalPath(j.Top)), nil
	}
	return fmt.Sprintf("rolled back the interrupted %q: the chain is as it was (journal %s)", j.Command, JournalPath(j.Top)), nil
}

// reservedName reports whether base is a name of the kind vhdfs gives its work files
// beside a top image (a journal, its temporary file, the hidden fresh top of a merge
// or a snapshot), which it removes or renames over: a snapshot must not be one.
func reservedName(base string) bool {
	if strings.HasSuffix(base, JournalSuffix) || strings.HasSuffix(base, JournalSuffix+".tmp") {
		return true
	}
	return strings.HasPrefix(base, ".") && (strings.HasSuffix(base, MergingSuffix) || strings.HasSuffix(base, NewTopSuffix) || strings.HasSuffix(base, snapshotSuffix))
}

// snapshotDir opens dir, which must be the directory that holds the top image (at
// real, open as img), for creating in it by descriptor.
func snapshotDir(dir, real string, img image.Image) (int, error) {
	if filepath.Clean(dir) != filepath.Dir(real) {
		return -1, fmt.Errorf("a snapshot is made in the directory of the top image, %s, not in %s: %w", filepath.Dir(real), dir, image.ErrInvalidArg)
	}
	fd, err := unix.Open(filepath.Dir(real), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", filepath.Dir(real), err)
	}
	var st unix.Stat_t
	dev, ino := img.FileID()
	if err := unix.Fstatat(fd, filepath.Base(real), &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || uint64(st.Dev) != dev || st.Ino != ino {
		unix.Close(fd)
		return -1, fmt.Errorf("%s no longer holds the top image %s", filepath.Dir(real), real)
	}
	return fd, nil
}

// SnapshotInfo says what SnapshotFile did.
type SnapshotInfo struct {
	Frozen    string // the new name of the old top's file: the state frozen
	Top       string // the top's path, now a new empty differencing image on Frozen
	Size      int64  // virtual size
	BlockSize int64  // the new top's block size
}

// SnapshotFile is Snapshot of the chain whose top is at top, opened for writing (so
// refused while a mount or another program writes it); name, relative to the working
// directory, must name a file beside the top's (after symlinks) whose extension
// fits the chain's format.
func SnapshotFile(top, name string) (SnapshotInfo, error) {
	c, err := Open(top, true)
	if err != nil {
		return SnapshotInfo{}, err
	}
	defer c.Close()
	name = Abs(name)
	if err := probe.CheckChildName(filepath.Base(name), c.Layers()[0].Image.Format()); err != nil {
		return SnapshotInfo{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	frozen, err := c.Snapshot(name)
	if frozen == nil {
		return SnapshotInfo{}, err
	}
	live := c.Layers()[0].Image
	info := SnapshotInfo{Frozen: frozen.Path, Top: Abs(top), Size: live.Size(), BlockSize: live.BlockSize()}
	if cerr := c.Close(); err == nil {
		err = cerr
	}
	return info, err
}
