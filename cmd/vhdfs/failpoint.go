package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// failpointEnv names a merge or snapshot point at which to stop, for crash tests:
// "POINT:kill" kills the process with SIGKILL there; "POINT:pause=DIR" writes a line
// to the FIFO DIR/reached and then waits for a line from the FIFO DIR/resume.
// "close:fail" makes the mount process's final close report an error.
const failpointEnv = "VHDFS_FAILPOINT"

// mergeHook returns the hook for merge.Options, or nil when no failpoint is set.
func mergeHook() func(string) {
	spec := os.Getenv(failpointEnv)
	if spec == "" {
		return nil
	}
	point, action, _ := strings.Cut(spec, ":")
	return func(p string) {
		if p != point {
			return
		}
		switch {
		case action == "kill":
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
		case strings.HasPrefix(action, "pause="):
			dir := strings.TrimPrefix(action, "pause=")
			if f, err := os.OpenFile(filepath.Join(dir, "reached"), os.O_WRONLY, 0); err == nil {
				f.WriteString(p + "\n")
				f.Close()
			}
			if f, err := os.Open(filepath.Join(dir, "resume")); err == nil {
				var b [64]byte
				f.Read(b[:])
				f.Close()
			}
		}
	}
}

// failpointErr returns an error if the failpoint is "point:fail".
func failpointErr(point string) error {
	if os.Getenv(failpointEnv) == point+":fail" {
		return errors.New("injected failure at " + point)
	}
	return nil
}
