package main

import (
	"fmt"
	"golang.org/x/sys/unix"
	"os"
	"sync"
	"time"
)

// progress draws a one-line progress bar on stderr while stdout is a terminal, and
// nothing otherwise, so scripts and pipes stay quiet.
type progress struct {
	label   string
	total   int64
	start   time.Time
	enabled bool

	mu   sync.Mutex
	last time.Time
}

func newProgress(label string, total int64) *progress {
	return &progress{label: label, total: total, start: time.Now(), enabled: isTerminal(os.Stdout)}
}

// isTerminal reports whether f is a terminal (not merely a character device such
// as /dev/null): the TCGETS ioctl succeeds only on terminals.
func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// update shows done bytes of total, at most ten times a second.
func (p *progress) update(done int64) {
	if !p.enabled {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if now.Sub(p.last) < 100*time.Millisecond && done < p.total {
		return
	}
	p.last = now
	pct := 100.0
	if p.total > 0 {
		pct = float64(done) * 100 / float64(p.total)
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
	rate := float64(done) / max(now.Sub(p.start).Seconds(), 1e-3)
	fmt.Fprintf(os.Stderr, "\r%s [%s] %5.1f%% %s / %s  %s/s ", p.label, bar, pct, human(done), human(p.total), human(int64(rate)))
}

// finish ends the line.
func (p *progress) finish() {
	if p.enabled {
		p.update(p.total)
		fmt.Fprintln(os.Stderr)
	}
}
