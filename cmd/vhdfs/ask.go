package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vhdfs/vhdfs/fs"
)

// A thread that waits on a FUSE file whose server does not answer sleeps in the
// kernel, often uninterruptibly, and a Go process with such a thread cannot even
// exit. So commands never touch another mount's control file themselves: a child
// (`vhdfs __control`) does, and past the deadline the command kills it and goes on
// without waiting for it.

// waitTimeoutEnv overrides how long a command waits for another process (a Go
// duration); the tests shorten it.
const waitTimeoutEnv = "VHDFS_WAIT_TIMEOUT"

// waitTimeout is how long a command waits for a mount process, a FUSE file or the
// kernel before it says what it waits for and gives up.
func waitTimeout() time.Duration {
	if d, err := time.ParseDuration(os.Getenv(waitTimeoutEnv)); err == nil && d > 0 {
		return d
	}
	return 10 * time.Second
}

// errNoAnswer is a probe that did not finish within its deadline.
var errNoAnswer = errors.New("no answer")

// probeError is an error the child met on the control file.
type probeError struct {
	errno syscall.Errno
	msg   string
}

func (e *probeError) Error() string { return e.msg }
func (e *probeError) Unwrap() error {
	if e.errno == 0 {
		return nil
	}
	return e.errno
}

// cmdControl is the hidden child: `__control read DIR` prints DIR/control's status,
// `__control write DIR LINE` writes LINE in one write, `__control watch DIR` prints
// the status every redrawEvery. Each answer is one line: "ok[ JSON]" or "err ERRNO TEXT".
func cmdControl(args []string) error {
	if len(args) < 2 {
		return usagef("__control read|watch DIR, or __control write DIR LINE")
	}
	ctl := filepath.Join(args[1], "control")
	answer := func(b []byte, err error) {
		if err != nil {
			var en syscall.Errno
			errors.As(err, &en)
			fmt.Printf("err %d %s\n", int(en), oneLine(err.Error()))
			return
		}
		if b == nil {
			fmt.Println("ok")
			return
		}
		var c bytes.Buffer
		if err := json.Compact(&c, b); err != nil {
			fmt.Printf("err %d control: %s\n", int(syscall.EIO), oneLine(err.Error()))
			return
		}
		fmt.Printf("ok %s\n", c.Bytes())
	}
	switch {
	case args[0] == "read" && len(args) == 2:
		answer(os.ReadFile(ctl))
	case args[0] == "watch" && len(args) == 2:
		for {
			answer(os.ReadFile(ctl))
			time.Sleep(redrawEvery)
		}
	case args[0] == "write" && len(args) == 3:
		f, err := os.OpenFile(ctl, os.O_WRONLY, 0)
		if err == nil {
			err = writeRetry(f, []byte(args[2]+"\n"))
			f.Close()
		}
		if err != nil {
			err = &os.PathError{Op: "write", Path: ctl, Err: err}
		}
		answer(nil, err)
	default:
		return usagef("__control read|watch DIR, or __control write DIR LINE")
	}
	return nil
}

// child is a running `vhdfs __control`.
type child struct {
	cmd *exec.Cmd
	out io.ReadCloser
}

// startChild starts `vhdfs __control args...` in a process group of its own (a
// Ctrl-C is the command's to handle), which dies with the command; it answers on a
// pipe of its own, and holds no descriptor of the caller's.
func startChild(args ...string) (*child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	closeOnExec()
	cmd := exec.Command(exe, append([]string{"__control"}, args...)...)
	// Nothing of the caller's: a child stuck on a FUSE file would keep the caller's
	// stderr pipe open after the command ended (`vhdfs merge 2>&1 | cat` would hang).
	cmd.Stdin, cmd.Stderr = nil, nil
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &child{cmd: cmd, out: out}, nil
}

// kill ends the child without waiting for it: it may be stuck in the kernel. The
// goroutine reading its answer reaps it, if it ever leaves.
func (c *child) kill() { c.cmd.Process.Kill() }

// parseAnswer reads one answer line of the child.
func parseAnswer(line string) ([]byte, error) {
	switch {
	case line == "ok":
		return nil, nil
	case strings.HasPrefix(line, "ok "):
		return []byte(line[3:]), nil
	case strings.HasPrefix(line, "err "):
		f := strings.SplitN(line, " ", 3)
		n, _ := strconv.Atoi(f[1])
		msg := ""
		if len(f) > 2 {
			msg = f[2]
		}
		return nil, &probeError{errno: syscall.Errno(n), msg: msg}
	}
	return nil, fmt.Errorf("vhdfs __control: %q", line)
}

// readAnswer waits for the one answer of a child and for its end.
func readAnswer(c *child) ([]byte, error) {
	b, err := io.ReadAll(c.out)
	werr := c.cmd.Wait()
	line := strings.TrimSuffix(string(b), "\n")
	if err == nil && line == "" {
		err = fmt.Errorf("vhdfs __control: %v", werr)
	}
	if err != nil {
		return nil, err
	}
	return parseAnswer(line)
}

// ask runs one `vhdfs __control` and returns its answer, or errNoAnswer past d.
func ask(d time.Duration, args ...string) ([]byte, error) {
	c, err := startChild(args...)
	if err != nil {
		return nil, err
	}
	type result struct {
		b   []byte
		err error
	}
	res := make(chan result, 1)
	go func() {
		b, err := readAnswer(c)
		res <- result{b, err}
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case r := <-res:
		return r.b, r.err
	case <-t.C:
		c.kill()
		return nil, errNoAnswer
	}
}

// statusOf reads the status of the mount at dir through a child, waiting at most d.
func statusOf(dir string, d time.Duration) (*fs.Status, error) {
	b, err := ask(d, "read", dir)
	if err != nil {
		return nil, err
	}
	var st fs.Status
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("control: %v", err)
	}
	return &st, nil
}

// watched is one status line of a watching child.
type watched struct {
	st  *fs.Status
	err error
}

// watchStatus starts a child that reads dir's status every redrawEvery; the channel
// gets each answer and is closed when the child ends. stop kills the child.
func watchStatus(dir string) (<-chan watched, func(), error) {
	c, err := startChild("watch", dir)
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan watched, 1)
	go func() {
		defer close(ch)
		defer c.cmd.Wait()
		sc := bufio.NewScanner(c.out)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			b, err := parseAnswer(sc.Text())
			w := watched{err: err}
			if err == nil {
				var st fs.Status
				if w.err = json.Unmarshal(b, &st); w.err == nil {
					w.st = &st
				}
			}
			select {
			case ch <- w:
			default: // the reader is behind: this status is stale anyway
			}
		}
	}()
	return ch, c.kill, nil
}

// writeControlOf writes one command to dir's control file through a child, waiting
// at most d; a failure says why, from the status's last result.
func writeControlOf(dir, cmd string, d time.Duration) error {
	_, err := ask(d, "write", dir, cmd)
	if err == nil || errors.Is(err, errNoAnswer) {
		return err
	}
	if st, serr := statusOf(dir, d); serr == nil && st.Last != nil && st.Last.Command == cmd && st.Last.Message != "" {
		return fmt.Errorf("%s: %s", cmd, st.Last.Message)
	}
	return err
}

// runBounded runs a program and returns its combined output, or errNoAnswer when it
// has not finished within d (it is killed and left: a fusermount3 may be stuck in the
// kernel).
func runBounded(d time.Duration, name string, args ...string) ([]byte, error) {
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case err := <-done:
		return out.Bytes(), err
	case <-t.C:
		cmd.Process.Kill()
		return nil, errNoAnswer
	}
}
