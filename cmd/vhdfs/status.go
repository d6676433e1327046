package main

import (
	"fmt"
	"os"
	"syscall"
	"time"
)

// waitExit waits up to d for process pid to end.
func waitExit(pid int, d time.Duration) error {
	if pid <= 0 || pid == os.Getpid() {
		return nil
	}
	deadline := time.Now().Add(d)
	for delay := time.Millisecond; !exited(pid); delay = min(delay*2, 100*time.Millisecond) {
		if time.Now().After(deadline) {
			return fmt.Errorf("mount process %d still running %v after it was told to end", pid, d)
		}
		time.Sleep(delay)
	}
	return nil
}

// exited reports whether process pid is gone (or a zombie).
func exited(pid int) bool {
	if err := syscall.Kill(pid, 0); err == syscall.ESRCH {
		return true
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err == nil && zombie(b)
}

func zombie(stat []byte) bool {
	for i := len(stat) - 1; i > 0; i-- {
		if stat[i] == ')' && i+2 < len(stat) {
			return stat[i+2] == 'Z'
		}
	}
	return false
}
