package image

// CompactOptions says how Image.Compact works.
type CompactOptions struct {
	// DryRun computes what Compact would do and writes nothing; the image may be
	// open read-only.
	DryRun bool
	// BelowZero reports whether the chain below the image (its parent and theirs)
	// reads zeros over all of [off, off+n). A differencing image drops a block only
	// where it does; nil means the image has no parent (everything below is zero).
	BelowZero func(off, n int64) (bool, error)
	// Progress, if set, is called with the bytes of the file scanned or moved so
	// far and the total to do.
	Progress func(done, total int64)
}

// CompactResult says what Compact did (or, for a dry run, would do).
type CompactResult struct {
	Blocks  int   // data blocks stored in the file before
	Dropped int   // blocks that read as zeros and were dropped
	Kept    int   // all-zero blocks kept because the parent does not read zeros there
	Moved   int   // blocks moved into holes nearer the start of the file
	OldSize int64 // the file's size before
	NewSize int64 // the file's size after
}

// Freed is how many bytes the file shrank (or would shrink) by.
func (r CompactResult) Freed() int64 { return r.OldSize - r.NewSize }
