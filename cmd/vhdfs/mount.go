package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log"
	"log/syslog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/fs"
	"github.com/vhdfs/vhdfs/merge"
)

// notifyEnv names the file descriptor on which a background mount process reports
// to the command that started it: "ok" once the mount is ready, or the error.
const notifyEnv = "VHDFS_NOTIFY_FD"

type mountArgs struct {
	image, mountpoint string
	readOnly          bool
	foreground        bool
	background        bool // this is the mount process that spawn started
	allowOther        bool
	debug             bool
}

func cmdMount(args []string) error {
	fl := newFlags("mount")
	var m mountArgs
	fl.BoolVarP(&m.readOnly, "read-only", "r", false, "mount read-only")
	fl.BoolVarP(&m.foreground, "foreground", "f", false, "stay in the foreground; unmount on SIGINT/SIGTERM")
	fl.BoolVar(&m.allowOther, "allow-other", false, "let other users access the mount")
	fl.BoolVar(&m.debug, "debug", false, "log every FUSE request to stderr")
	pos, err := parse(fl, args, "IMAGE", "MOUNTPOINT")
	if err != nil {
		return err
	}
	m.image, m.mountpoint = pos[0], pos[1]
	if err := checkMountpoint(m.mountpoint); err != nil {
		return err
	}
	if fdStr := os.Getenv(notifyEnv); fdStr != "" {
		fd, err := strconv.Atoi(fdStr)
		if err != nil {
			return fmt.Errorf("%s=%q: %v", notifyEnv, fdStr, err)
		}
		os.Unsetenv(notifyEnv)
		m.background = true
		notify := os.NewFile(uintptr(fd), "notify")
		return serve(m, func(err error) {
			if err != nil {
				fmt.Fprintf(notify, "%s\n", oneLine(err.Error()))
			} else {
				fmt.Fprintln(notify, "ok")
			}
			notify.Close()
		})
	}
	if m.foreground {
		return serve(m, func(error) {})
	}
	return spawn(args)
}

// checkMountpoint refuses a missing mount point, a file, and one that is already a
// mount point (busy), before anything is mounted.
func checkMountpoint(dir string) error {
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("mount point %s: %w", dir, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("mount point %s is not a directory", dir)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	mounted, err := isMountpoint(abs)
	if err != nil {
		return err
	}
	if mounted {
		return fmt.Errorf("mount point %s is busy: something is already mounted there", dir)
	}
	return nil
}

// isMountpoint reports whether dir is listed in /proc/self/mountinfo.
func isMountpoint(dir string) (bool, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && unescapeMount(fields[4]) == dir {
			return true, nil
		}
	}
	return false, sc.Err()
}

// unescapeMount undoes the octal escapes of mountinfo (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// spawn starts this program again as the background mount process and waits for
// it to report that the mount is ready, or why it failed.
func spawn(args []string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer devnull.Close()
	cmd := exec.Command(exe, append([]string{"mount"}, args...)...)
	cmd.Env = append(os.Environ(), notifyEnv+"=3")
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	if hasDebug(args) {
		cmd.Stderr = os.Stderr
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		r.Close()
		return err
	}
	w.Close()
	msg, _ := io.ReadAll(io.LimitReader(r, 64<<10))
	r.Close()
	line := strings.TrimSpace(string(msg))
	if line == "ok" {
		return cmd.Process.Release()
	}
	werr := cmd.Wait()
	if line == "" {
		return fmt.Errorf("mount process ended before the mount was ready: %v", werr)
	}
	return errors.New(line)
}

func hasDebug(args []string) bool {
	for _, a := range args {
		if a == "--debug" {
			return true
		}
	}
	return false
}

// serve opens the chain, mounts it and serves until unmounted or signalled. ready is
// called once: with nil when the mount is up, or with the error that prevented it.
func serve(m mountArgs, ready func(error)) error {
	logger := log.New(os.Stderr, "vhdfs: ", log.LstdFlags)
	if m.background {
		// A background mount: stderr is /dev/null, syslog (if there is one) is not.
		if w, err := syslog.New(syslog.LOG_DAEMON|syslog.LOG_WARNING, "vhdfs"); err == nil {
			defer w.Close()
			logger = log.New(io.MultiWriter(os.Stderr, w), "vhdfs: ", log.LstdFlags)
		}
	}
	os.Remove(resultFile(os.Getpid())) // a stale one of an earlier process with this PID
	if !m.readOnly {
		msg, err := merge.Recover(chain.Abs(m.image))
		if err != nil {
			ready(err)
			return err
		}
		if msg != "" {
			logger.Printf("%s: %s", m.image, msg)
		}
	}
	c, err := chain.Open(chain.Abs(m.image), !m.readOnly)
	if err != nil {
		ready(err)
		return err
	}
	srv, root, err := fs.Mount(m.mountpoint, c, fs.Options{ReadOnly: m.readOnly, AllowOther: m.allowOther, Debug: m.debug, Logger: logger, MergeHook: mergeHook()})
	if err != nil {
		c.Close()
		ready(err)
		return err
	}
	ready(nil)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		for sig := range sigs {
			logger.Printf("%v: aborting any merge and unmounting %s", sig, m.mountpoint)
			root.Abort()
			if err := srv.Unmount(); err != nil {
				logger.Printf("unmount %s: %v; detaching it lazily", m.mountpoint, err)
				exec.Command("fusermount3", "-u", "-z", m.mountpoint).Run()
			}
		}
	}()
	srv.Wait()
	signal.Stop(sigs)
	var errs []error
	if running := root.Abort(); running != "" {
		errs = append(errs, fmt.Errorf("unmounted while %q ran: aborted it; the chain is as it was", running))
	}
	err = c.Close()
	if err == nil {
		err = failpointErr("close")
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("final flush: %w; writes since the last fsync may be lost", err))
	}
	if err := errors.Join(errs...); err != nil {
		// umount reads this once the process is gone; it is also in syslog.
		logger.Printf("%s: %v", m.mountpoint, oneLine(err.Error()))
		writeResult(err)
		return err
	}
	return nil
}

// resultFile is where a mount process leaves the error it ended with, for `vhdfs
// umount`, which waits for the process, prints the error and removes the file.
func resultFile(pid int) string {
	dir := os.Getenv("XDG_RUNTIME_DIR")
	switch {
	case dir != "":
		dir = filepath.Join(dir, "vhdfs")
	case os.Geteuid() == 0:
		dir = "/run/vhdfs"
	default:
		dir = filepath.Join(os.TempDir(), fmt.Sprintf("vhdfs-%d", os.Geteuid()))
	}
	return filepath.Join(dir, fmt.Sprintf("%d.err", pid))
}

func writeResult(err error) {
	p := resultFile(os.Getpid())
	if os.MkdirAll(filepath.Dir(p), 0o700) == nil {
		_ = os.WriteFile(p, []byte(oneLine(err.Error())+"\n"), 0o600)
	}
}

// readResult returns the error the mount process pid left, if any, and removes it.
func readResult(pid int) error {
	p := resultFile(pid)
	b, err := os.ReadFile(p)
	if err != nil {
		return nil
	}
	os.Remove(p)
	return errors.New(strings.TrimSpace(string(b)))
}

// cmdUmount unmounts a vhdfs mount once everything is on disk, and reports an error
// of the mount process's last flush. It refuses while a merge runs, unless told to
// abort it, and keeps the mount when the flush before unmounting fails: pending
// writes then stay in the mount process, not lost.
func cmdUmount(args []string) error {
	fl := newFlags("umount")
	var abort bool
	fl.BoolVar(&abort, "abort", false, "abort a running merge (the chain stays as it was), then unmount")
	pos, err := parse(fl, args, "MOUNTPOINT")
	if err != nil {
		return err
	}
	dir := pos[0]
	st, err := readStatus(dir)
	dead := errors.Is(err, syscall.ENOTCONN)
	if dead {
		// The mount process is gone (killed): only the kernel's mount is left.
		st, err = &fs.Status{}, nil
	}
	if err != nil {
		return fmt.Errorf("%s is not a vhdfs mount: %v", dir, err)
	}
	aborted := false
	if st.State != "idle" && !dead {
		if !abort {
			return fmt.Errorf("%s: %q is running; wait for it, write abort to %s, or use vhdfs umount --abort",
				dir, st.Running, filepath.Join(dir, "control"))
		}
		if err := writeControl(dir, "abort"); err != nil {
			return fmt.Errorf("abort the merge on %s: %v", dir, err)
		}
		aborted = true
	}
	if !dead && !st.ReadOnly {
		if err := writeControl(dir, "sync"); err != nil {
			return fmt.Errorf("sync %s: %v; still mounted, nothing lost: fix the cause and run umount again", dir, err)
		}
	}
	if err := fusermountU(dir, aborted); err != nil {
		return err
	}
	// Wait for the mount process to finish writing and close its images.
	if err := waitExit(st.PID); err != nil {
		return err
	}
	if err := readResult(st.PID); err != nil {
		return fmt.Errorf("%s: mount process: %v", dir, err)
	}
	return nil
}

// fusermountU unmounts dir. Just after an abort, the aborted merge's writer may hold
// control open for a moment yet: a busy mount is then tried again for a while.
func fusermountU(dir string, retryBusy bool) error {
	deadline := time.Now().Add(5 * time.Second)
	for delay := time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		out, err := exec.Command("fusermount3", "-u", dir).CombinedOutput()
		if err == nil {
			return nil
		}
		msg := strings.TrimSpace(string(out))
		if !retryBusy || !strings.Contains(msg, "busy") || time.Now().After(deadline) {
			return fmt.Errorf("unmount %s: %s", dir, msg)
		}
		time.Sleep(delay)
	}
}

// writeControl writes one command to dir's control file; a failure says why, from
// the status's last result.
func writeControl(dir, cmd string) error {
	err := os.WriteFile(filepath.Join(dir, "control"), []byte(cmd+"\n"), 0)
	if err == nil {
		return nil
	}
	if st, serr := readStatus(dir); serr == nil && st.Last != nil && st.Last.Command == cmd && st.Last.Message != "" {
		return fmt.Errorf("%s: %s", cmd, st.Last.Message)
	}
	return err
}
