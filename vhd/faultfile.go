package vhd

import (
	"os"

	"github.com/vhdfs/vhdfs/internal/faults"
)

// faultFile is the File of an image opened while package faults is armed: each
// write, fsync and truncate spends a step, so a test can cut them as a power loss
// would. It reserves space by writing (as a file system without fallocate).
type faultFile struct{ *os.File }

func (f faultFile) WriteAt(p []byte, off int64) (int, error) {
	if err := faults.Step(); err != nil {
		return 0, err
	}
	return f.File.WriteAt(p, off)
}

func (f faultFile) Sync() error {
	if err := faults.Step(); err != nil {
		return err
	}
	return f.File.Sync()
}

func (f faultFile) Truncate(size int64) error {
	if err := faults.Step(); err != nil {
		return err
	}
	return f.File.Truncate(size)
}

// osFile returns the *os.File under an image's File, if there is one.
func osFile(f File) (*os.File, bool) {
	switch f := f.(type) {
	case *os.File:
		return f, true
	case faultFile:
		return f.File, true
	}
	return nil, false
}
