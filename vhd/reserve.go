package vhd

import "github.com/vhdfs/vhdfs/internal/fileio"

// Reserver is a File that can reserve space without writing (see fileio.Reserve).
type Reserver = fileio.Reserver

// reserve sets aside the space of [off, off+n) of f (see fileio.Reserve).
func reserve(f File, off, n int64) error { return fileio.Reserve(f, off, n) }
