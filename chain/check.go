package chain

import (
	"fmt"
	"os"
	"time"

	"github.com/vhdfs/vhdfs/image"
)

// Check opens the chain at path image by image and returns every problem found, top
// first. It writes nothing. An image that cannot be opened is one error and ends the
// walk (its parents cannot be found without it).
func Check(path string) []image.Problem { return CheckWith(path, OpenOptions{}) }

// CheckWith is Check with the ForceShare and Parents of o; it never writes, whatever
// o.Writable says.
func CheckWith(path string, o OpenOptions) []image.Problem {
	var out []image.Problem
	switch j, err := ReadJournal(path); {
	case err != nil:
		out = append(out, image.Problem{Severity: image.Error, File: path, Message: err.Error()})
	case j != nil && j.Phase == PhaseSnapshot:
		out = append(out, image.Problem{Severity: image.Warning, File: path, Message: fmt.Sprintf("snapshot journal %s: %q was interrupted; the chain is valid; mounting it read-write or 'vhdfs check --repair' completes or undoes it", JournalPath(path), j.Command)})
	case j != nil && j.Phase != PhaseCopy:
		out = append(out, image.Problem{Severity: image.Error, File: path, Message: fmt.Sprintf("merge journal %s: %q into %s was interrupted in its %s step; 'vhdfs check --repair' completes it", JournalPath(path), j.Command, j.Target, j.Phase)})
		return out
	case j != nil:
		out = append(out, image.Problem{Severity: image.Warning, File: path, Message: fmt.Sprintf("merge journal %s: %q into %s is pending (a new top holds the writes made since it began); run the same merge again to complete it", JournalPath(path), j.Command, j.Target)})
	}
	img, err := openImage(path, o.mode())
	if err != nil {
		return append(out, image.Problem{Severity: image.Error, File: path, Message: err.Error()})
	}
	cur := &Layer{Image: img, Path: path}
	opened := []*Layer{cur}
	defer func() {
		for _, l := range opened {
			l.Image.Close()
		}
	}()
	seen := map[image.ID]string{img.ID(): path}
	for {
		out = append(out, cur.Image.Check()...)
		if cur.Image.Type() != image.Differencing {
			break
		}
		if len(opened) >= MaxDepth {
			return append(out, image.Problem{Severity: image.Error, File: path, Message: fmt.Sprintf("more than %d images in the chain", MaxDepth)})
		}
		parent, err := findParent(cur.Image, cur.Path, givenParent(o.Parents, len(opened)-1), o.mode())
		var notes []string
		if orphaned(o, cur, err, &notes) {
			out = append(out, image.Problem{Severity: image.Warning, File: cur.Path, Message: notes[0]})
			break
		}
		if err != nil {
			return append(out, image.Problem{Severity: image.Error, File: cur.Path, Message: err.Error()})
		}
		opened = append(opened, parent)
		id := parent.Image.ID()
		if prev, ok := seen[id]; ok {
			return append(out, image.Problem{Severity: image.Error, File: cur.Path, Message: fmt.Sprintf("parent %s is already in the chain as %s: cycle", parent.Path, prev)})
		}
		seen[id] = parent.Path
		ts := cur.Image.Describe().ParentTimestamp
		if st, err := os.Stat(parent.Path); err == nil && !ts.IsZero() && !ts.Equal(st.ModTime().Truncate(time.Second)) {
			out = append(out, image.Problem{Severity: image.Note, File: cur.Path, Message: fmt.Sprintf("the parent's time stamp recorded here, %s, is not the parent's modification time, %s: the parent was copied or changed after this image was made; vhdfs does not rely on it",
				ts.UTC().Format("2006-01-02 15:04:05"), st.ModTime().UTC().Format("2006-01-02 15:04:05"))})
		}
		if cur.Image.Size() < parent.Image.Size() {
			out = append(out, image.Problem{Severity: image.Warning, File: cur.Path, Message: fmt.Sprintf("virtual size %d is smaller than its parent's %d", cur.Image.Size(), parent.Image.Size())})
		}
		cur = parent
	}
	if n := len(opened) - 1; len(o.Parents) > n {
		out = append(out, image.Problem{Severity: image.Error, File: path, Message: fmt.Sprintf("%d parents given, but the chain has %d: %v", len(o.Parents), n, ErrTooManyParents)})
	}
	return out
}
