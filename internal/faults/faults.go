// Package faults lets a test cut every durable change a process makes after the
// k-th, as a power loss would: the writes, fsyncs, renames, links and unlinks that
// vhd, chain and merge make to images, journals and folders each call Step first.
// Unarmed, Step costs one atomic load.
package faults

import (
	"errors"
	"sync/atomic"
)

// ErrPowerLost is what every step returns once the budget is spent.
var ErrPowerLost = errors.New("injected power loss")

var (
	armed  atomic.Bool
	budget atomic.Int64
	start  atomic.Int64
)

// Arm lets n more steps through; every later one fails.
func Arm(n int) {
	budget.Store(int64(n))
	start.Store(int64(n))
	armed.Store(true)
}

// Used is how many steps were taken since Arm (failed ones included).
func Used() int { return int(start.Load() - budget.Load()) }

// Disarm lets every step through again.
func Disarm() { armed.Store(false) }

// Armed reports whether steps are being counted.
func Armed() bool { return armed.Load() }

// Step spends one step of the budget, or fails once it is spent.
func Step() error {
	if !armed.Load() {
		return nil
	}
	if budget.Add(-1) < 0 {
		return ErrPowerLost
	}
	return nil
}

// Durably runs a change to a folder (a link, rename or unlink) as one step that an
// injected power loss can cut.
func Durably(change func() error) error {
	if err := Step(); err != nil {
		return err
	}
	return change()
}
