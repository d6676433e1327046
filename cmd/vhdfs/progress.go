package main

import (
	"fmt"
	"math"
	"os"
	"sync"
	"time"

	"golang.org/x/term"

	"github.com/vhdfs/vhdfs/internal/units"
)

// redrawEvery is the shortest time between two redraws of a progress bar.
const redrawEvery = 200 * time.Millisecond

// progress draws a one-line progress bar on stderr while stdout is a terminal (or
// when forced, as qemu-img -p does), and nothing otherwise, so scripts and pipes stay
// quiet. It redraws at most five times a second, and once more at the end.
type progress struct {
	label   string
	start   time.Time
	enabled bool

	mu    sync.Mutex
	total int64     // guarded by mu
	done  int64     // guarded by mu: the latest count, drawn or not
	last  time.Time // guarded by mu: the latest redraw
}

// newProgress returns a bar for total bytes (0 when the total comes with the counts);
// force draws it even when stdout is not a terminal.
func newProgress(label string, total int64, force bool) *progress {
	return &progress{label: label, total: total, start: time.Now(), enabled: force || isTerminal(os.Stdout)}
}

// isTerminal reports whether f is a terminal (not merely a character device such
// as /dev/null).
func isTerminal(f *os.File) bool { return term.IsTerminal(int(f.Fd())) }

// update records done bytes of the total.
func (p *progress) update(done int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done = done
	p.drawLocked(false)
}

// set records done bytes of total, for work whose total is known only as it runs.
func (p *progress) set(done, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done, p.total = done, total
	p.drawLocked(false)
}

// complete records that the work is done, for counts seen only now and then.
func (p *progress) complete() {
	p.mu.Lock()
	p.done = p.total
	p.mu.Unlock()
}

// drawLocked redraws the bar if the last redraw is old enough; the end (done ==
// total) is drawn only by finish, so it is drawn once.
func (p *progress) drawLocked(final bool) {
	if !p.enabled {
		return
	}
	now := time.Now()
	if !final && (now.Sub(p.last) < redrawEvery || p.done >= p.total) {
		return
	}
	p.last = now
	pct := 100.0
	if p.total > 0 {
		// Rounded down: 100.0% only at the end.
		pct = math.Floor(float64(p.done)*1000/float64(p.total)) / 10
	}
	const width = 30
	fill := int(pct * width / 100)
	bar := make([]byte, width)
	for i := range bar {
		bar[i] = ' '
		if i < fill {
			bar[i] = '#'
		}
	}
	rate := float64(p.done) / max(now.Sub(p.start).Seconds(), 1e-3)
	fmt.Fprintf(os.Stderr, "\r%s [%s] %5.1f%% %s / %s  %s/s ", p.label, bar, pct, units.Human(p.done), units.Human(p.total), units.Human(int64(rate)))
}

// finish draws the bar as it ended and ends the line.
func (p *progress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.enabled {
		p.drawLocked(true)
		fmt.Fprintln(os.Stderr)
	}
}
