package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

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
	root.Abort()
	return c.Close()
}

func cmdUmount(args []string) error {
	fl := newFlags("umount")
	pos, err := parse(fl, args, "MOUNTPOINT")
	if err != nil {
		return err
	}
	dir := pos[0]
	st, err := readStatus(dir)
	if errors.Is(err, syscall.ENOTCONN) {
		// The mount process is gone (killed): only the kernel's mount is left.
		st, err = &fs.Status{}, nil
	}
	if err != nil {
		return fmt.Errorf("%s is not a vhdfs mount: %v", dir, err)
	}
	out, err := exec.Command("fusermount3", "-u", dir).CombinedOutput()
	if err != nil {
		return fmt.Errorf("unmount %s: %s", dir, strings.TrimSpace(string(out)))
	}
	// Wait for the mount process to finish writing and close its images.
	return waitExit(st.PID)
}
