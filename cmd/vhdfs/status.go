package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vhdfs/vhdfs/fs"
)

func readStatus(dir string) (*fs.Status, error) {
	b, err := os.ReadFile(filepath.Join(dir, "control"))
	if err != nil {
		return nil, err
	}
	var st fs.Status
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("control: %v", err)
	}
	return &st, nil
}

// waitExit waits for process pid to end. The mount process exits right after the
// kernel releases the mount, once its images are synced and closed.
func waitExit(pid int) error {
	if pid <= 0 || pid == os.Getpid() {
		return nil
	}
	deadline := time.Now().Add(5 * time.Minute)
	for delay := time.Millisecond; ; delay = min(delay*2, 100*time.Millisecond) {
		if err := syscall.Kill(pid, 0); err == syscall.ESRCH {
			return nil
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && zombie(b) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("mount process %d still running after unmount", pid)
		}
		time.Sleep(delay)
	}
}

func zombie(stat []byte) bool {
	for i := len(stat) - 1; i > 0; i-- {
		if stat[i] == ')' && i+2 < len(stat) {
			return stat[i+2] == 'Z'
		}
	}
	return false
}
