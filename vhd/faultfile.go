package vhd

import (
	"os"

	"github.com/vhdfs/vhdfs/internal/faults"
)

// osFile returns the *os.File under an image's File, if there is one (a file
// opened while package faults is armed is a faults.File, which reserves space by
// writing, as a file system without fallocate).
func osFile(f File) (*os.File, bool) { return faults.OSFile(f) }
