package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"log/syslog"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/moby/sys/mountinfo"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/fs"
	"github.com/vhdfs/vhdfs/internal/fileio"
	"github.com/vhdfs/vhdfs/merge"
)

// notifyEnv names the file descriptor on which a background mount process reports
// to the command that started it: "ok" once the mount is ready, or the error.
const notifyEnv = "VHDFS_NOTIFY_FD"

type mountArgs struct {
	image, mountpoint string
	readOnly          bool
	forceRW           bool // write an image with no write bits
	foreground        bool
	background        bool // this is the mount process that spawn started
	allowOther        bool
	debug             bool
	nonempty          bool
	uid, gid, umask   string
	fsname            string
	parents           []string
	salvage           bool // --salvage: read-only, damage read around
	readAhead         int  // KiB
	directIO          bool
}

func cmdMount(args []string) error {
	args, err := rewriteOptions(args)
	if err != nil {
		return err
	}
	fl := newFlags("mount")
	var m mountArgs
	fl.StringP("options", "o", "", "mount options, comma-separated: ro, rw, force_rw, allow_other, default_permissions, uid=, gid=, umask=, fsname=, debug, nonempty; noauto, nofail, _netdev, x-* and the like are ignored")
	fl.BoolVarP(&m.readOnly, "read-only", "r", false, "mount read-only (the kernel's ro flag too)")
	fl.BoolVarP(&m.foreground, "foreground", "f", false, "stay in the foreground; unmount on SIGINT/SIGTERM")
	fl.BoolVar(&m.forceRW, "force-rw", false, "mount read-write even an image file with no write bits (one is otherwise mounted read-only), and let merges write such files")
	fl.BoolVar(&m.allowOther, "allow-other", false, "let other users access the mount, as the mode bits allow")
	fl.BoolVar(&m.debug, "debug", false, "log every FUSE request to stderr; implies -f")
	fl.BoolVar(&m.nonempty, "nonempty", false, "mount on a directory that is not empty")
	fl.StringVar(&m.uid, "uid", "", "owner of disk.raw and layers/ (user name or number; default: the image's)")
	fl.StringVar(&m.gid, "gid", "", "group of disk.raw and layers/ (group name or number; default: the image's)")
	fl.StringVar(&m.umask, "umask", "", "octal umask for disk.raw and layers/ (default: the image's mode)")
	fl.IntVar(&m.readAhead, "readahead", fs.DefaultReadAheadKB, "read-ahead of the mount in KiB (set in sysfs; root only)")
	fl.BoolVar(&m.directIO, "direct-io", false, "serve disk.raw without the page cache (for one-shot imaging and export)")
	fl.StringVar(&m.fsname, "fsname", "", "source name the mount table shows (default: the top image's path)")
	parents := parentFlag(fl)
	salvage := salvageFlag(fl)
	pos, err := parse(fl, args, "IMAGE", "MOUNTPOINT")
	if err != nil {
		return err
	}
	m.salvage = *salvage
	if m.salvage && !m.readOnly {
		return usagef("--salvage never writes: it needs -r (or -o ro)")
	}
	m.image, m.mountpoint = chain.Abs(pos[0]), chain.Abs(pos[1])
	for _, p := range *parents {
		m.parents = append(m.parents, chain.Abs(p))
	}
	if m.readAhead <= 0 {
		return usagef("--readahead must be a positive number of KiB, not %d", m.readAhead)
	}
	m.foreground = m.foreground || m.debug
	fileio.AllowWriteProtected(m.forceRW)
	if _, _, err := mountAccess(m); err != nil {
		return err
	}
	if err := checkMountpoint(m.mountpoint, m.nonempty); err != nil {
		return err
	}
	if fdStr := os.Getenv(notifyEnv); fdStr != "" {
		fd, err := strconv.Atoi(fdStr)
		if err != nil {
			return fmt.Errorf("%s=%q: %v", notifyEnv, fdStr, err)
		}
		os.Unsetenv(notifyEnv)
		m.background = true
		if err := serve(m, newNotifier(os.NewFile(uintptr(fd), "notify"))); err != nil {
			return reported{err}
		}
		return nil
	}
	if m.foreground {
		return serve(m, nil)
	}
	return spawn(args)
}

// mountAccess returns the owner and mode bits of disk.raw and layers/ (the top
// image's, or those the uid, gid and umask options give) and of control (always the
// top image's: its commands act with the mount process's authority).
func mountAccess(m mountArgs) (data, control *fs.Access, err error) {
	st, err := os.Stat(m.image)
	if err != nil {
		return nil, nil, err
	}
	sys := st.Sys().(*syscall.Stat_t)
	a := &fs.Access{Uid: sys.Uid, Gid: sys.Gid, Perm: uint32(st.Mode().Perm()) & 0o666}
	ctl := *a
	if m.uid != "" {
		if a.Uid, err = lookupID(m.uid, func(n string) (string, error) {
			u, err := user.Lookup(n)
			if err != nil {
				return "", err
			}
			return u.Uid, nil
		}); err != nil {
			return nil, nil, usagef("uid=%s: %v", m.uid, err)
		}
	}
	if m.gid != "" {
		if a.Gid, err = lookupID(m.gid, func(n string) (string, error) {
			g, err := user.LookupGroup(n)
			if err != nil {
				return "", err
			}
			return g.Gid, nil
		}); err != nil {
			return nil, nil, usagef("gid=%s: %v", m.gid, err)
		}
	}
	if m.umask != "" {
		u, err := strconv.ParseUint(m.umask, 8, 32)
		if err != nil || u > 0o777 {
			return nil, nil, usagef("umask=%s: want an octal number up to 0777", m.umask)
		}
		a.Perm = 0o666 &^ uint32(u)
	}
	return a, &ctl, nil
}

// lookupID parses a numeric ID or looks a name up.
func lookupID(s string, lookup func(string) (string, error)) (uint32, error) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return uint32(n), nil
	}
	id, err := lookup(s)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(id, 10, 32)
	return uint32(n), err
}

// checkMountpoint refuses a missing mount point, a file, and one that is already a
// mount point (busy), before anything is mounted.
func checkMountpoint(dir string, nonempty bool) error {
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
	fstype, err := mountType(abs)
	if err != nil {
		return err
	}
	if fstype != "" {
		return fmt.Errorf("mount point %s is busy: something is already mounted there", dir)
	}
	if !nonempty {
		f, err := os.Open(dir)
		if err != nil {
			return fmt.Errorf("mount point %s: %w", dir, err)
		}
		names, _ := f.Readdirnames(1)
		f.Close()
		if len(names) > 0 {
			return fmt.Errorf("mount point %s is not empty: the mount would hide its files; use -o nonempty to mount anyway", dir)
		}
	}
	return nil
}

// mountType returns the file system type of the mount at dir ("fuse.vhdfs"), or ""
// when dir is not a mount point; the last mount on dir is the one seen.
func mountType(dir string) (string, error) {
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(dir))
	if err != nil || len(ms) == 0 {
		return "", err
	}
	return ms[len(ms)-1].FSType, nil
}

// spawn starts this program again as the background mount process and waits for
// it to report that the mount is ready, or why it failed. The process gets none of
// the caller's descriptors: /dev/null for stdin and stdout, and for stderr a pipe
// whose text (fusermount3's complaints) joins a startup error.
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
	var stderr bytes.Buffer
	cmd := exec.Command(exe, append([]string{"mount"}, args...)...)
	cmd.Env = append(os.Environ(), notifyEnv+"=3")
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	closeOnExec()
	if err := cmd.Start(); err != nil {
		w.Close()
		r.Close()
		return err
	}
	w.Close()
	var last string
	sc := bufio.NewScanner(io.LimitReader(r, 64<<10))
	for sc.Scan() {
		if msg, ok := strings.CutPrefix(sc.Text(), "log: "); ok {
			fmt.Fprintf(os.Stderr, "vhdfs: %s\n", msg)
			continue
		}
		last = sc.Text()
	}
	r.Close()
	if last == "ok" {
		return cmd.Process.Release()
	}
	werr := cmd.Wait() // also waits for the end of the process's stderr
	why := oneLine(strings.TrimSpace(stderr.String()))
	switch {
	case last == "" && why == "":
		return fmt.Errorf("mount process ended before the mount was ready: %v", werr)
	case last == "":
		return fmt.Errorf("mount process ended before the mount was ready: %v: %s", werr, why)
	case why != "":
		return fmt.Errorf("%s: %s", last, why)
	}
	return errors.New(last)
}

// closeOnExec marks every descriptor above stderr close-on-exec: those this process
// inherited from its caller (a shell's, mount's) must not reach the mount process.
func closeOnExec() {
	ents, _ := os.ReadDir("/proc/self/fd")
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			syscall.CloseOnExec(fd)
		}
	}
}

// notifier is a background mount process's line to the command that started it:
// log lines until the mount is ready, then "ok" or the error.
type notifier struct {
	mu sync.Mutex
	f  *os.File // guarded by mu; nil once done
}

func newNotifier(f *os.File) *notifier { return &notifier{f: f} }

func (n *notifier) log(line string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.f != nil {
		fmt.Fprintf(n.f, "log: %s\n", oneLine(line))
	}
}

func (n *notifier) done(err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.f == nil {
		return
	}
	if err != nil {
		fmt.Fprintf(n.f, "%s\n", oneLine(err.Error()))
	} else {
		fmt.Fprintln(n.f, "ok")
	}
	n.f.Close()
	n.f = nil
}

// daemonLog is where a mount process logs: syslog (if there is one) and, until the
// mount is ready, the caller's stderr through the notifier; in the foreground,
// stderr, each line with its time unless stderr is the journal, which adds its own.
type daemonLog struct {
	syslog *syslog.Writer
	notify *notifier
	stderr bool
	stamp  bool // the time on stderr's lines
}

// stderrIsJournal reports whether stderr is the systemd journal's stream: systemd
// sets JOURNAL_STREAM to its DEV:INO for a service whose output goes to the journal,
// and a process whose stderr was redirected elsewhere inherits the variable all the
// same, so fd 2 must be that stream.
func stderrIsJournal() bool {
	dev, ino, ok := strings.Cut(os.Getenv("JOURNAL_STREAM"), ":")
	if !ok {
		return false
	}
	d, derr := strconv.ParseUint(dev, 10, 64)
	i, ierr := strconv.ParseUint(ino, 10, 64)
	var st syscall.Stat_t
	if derr != nil || ierr != nil || syscall.Fstat(2, &st) != nil {
		return false
	}
	return uint64(st.Dev) == d && uint64(st.Ino) == i
}

func (d *daemonLog) Write(p []byte) (int, error) {
	line := strings.TrimSuffix(string(p), "\n")
	if d.syslog != nil {
		d.syslog.Info(line)
	}
	if d.notify != nil {
		d.notify.log(line)
	}
	switch {
	// A closed stderr (its reader gone) must not stop the mount: SIGPIPE is ignored.
	case d.stderr && d.stamp:
		fmt.Fprintf(os.Stderr, "vhdfs: %s %s\n", time.Now().Format("2006/01/02 15:04:05"), line)
	case d.stderr:
		fmt.Fprintf(os.Stderr, "vhdfs: %s\n", line)
	}
	return len(p), nil
}

// openWritable reports whether the top image can be opened for writing; when it
// cannot for want of permission or on read-only media, the mount falls back to
// read-only, as ntfs-3g does.
func openWritable(image string) (bool, error) {
	f, err := os.OpenFile(image, os.O_RDWR, 0)
	switch {
	case err == nil:
		f.Close()
		return true, nil
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EPERM):
		return false, err
	}
	return true, nil // the open of the chain reports it
}

// serve opens the chain, mounts it and serves until unmounted or signalled. notify
// (nil in the foreground) hears of the mount's start: nil once it is ready, or the
// error that prevented it.
func serve(m mountArgs, notify *notifier) (err error) {
	signal.Ignore(syscall.SIGPIPE)
	dlog := &daemonLog{stderr: !m.background, stamp: !stderrIsJournal()}
	if m.background {
		dlog.notify = notify
		if w, err := syslog.New(syslog.LOG_DAEMON|syslog.LOG_INFO, "vhdfs"); err == nil {
			defer w.Close()
			dlog.syslog = w
		}
	}
	logger := log.New(dlog, "", 0)
	ready := func(err error) {
		if notify == nil {
			return
		}
		if err == nil {
			// From here on the process writes to no descriptor of the caller's.
			err = detachStdio()
		}
		notify.done(err)
	}
	defer func() {
		if err != nil {
			ready(err)
		}
	}()
	os.Remove(resultFile(os.Getpid())) // a stale one of an earlier process with this PID
	access, ctlAccess, err := mountAccess(m)
	if err != nil {
		return err
	}
	if !m.readOnly && fileio.WriteProtected(m.image) {
		logger.Printf("warning: %s has no write bits: mounting it read-only (-o force_rw or --force-rw mounts it read-write)", m.image)
		m.readOnly = true
	}
	if !m.readOnly {
		if ok, werr := openWritable(m.image); !ok {
			logger.Printf("warning: %v: mounting read-only", werr)
			m.readOnly = true
		}
	}
	if !m.readOnly {
		msg, err := merge.Recover(m.image)
		if err != nil {
			return err
		}
		if msg != "" {
			logger.Printf("%s: %s", m.image, msg)
		}
	}
	c, err := openChain(m.image, chain.OpenOptions{Writable: !m.readOnly, Parents: m.parents, Salvage: m.salvage})
	if err != nil {
		return err
	}
	for _, n := range c.Notes() {
		logger.Printf("warning: %s", n)
	}
	srv, root, err := fs.Mount(m.mountpoint, c, fs.Options{
		ReadOnly: m.readOnly, AllowOther: m.allowOther, Debug: m.debug, Logger: logger,
		MergeHook: mergeHook(), Access: access, Control: ctlAccess, FsName: m.fsname,
		ReadAheadKB: m.readAhead, DirectIO: m.directIO,
	})
	if err != nil {
		c.Close()
		return err
	}
	// Every path the process needs is absolute: leave the caller's directory, which
	// the mount would otherwise keep busy.
	if err := os.Chdir("/"); err != nil {
		srv.Unmount()
		c.Close()
		return err
	}
	// The record, by which commands find this mount, is there before the caller
	// hears that the mount is ready.
	conn, err := connOf(m.mountpoint)
	if err != nil || conn == "" {
		logger.Printf("warning: %s is not in /proc/self/mountinfo after mounting (%v)", m.mountpoint, err)
	}
	if rec, err := newRecord(m.image, m.mountpoint, conn, m.readOnly); err != nil {
		logger.Printf("warning: %v", err)
	} else if err := rec.write(); err != nil {
		logger.Printf("warning: record of the mount: %v", err)
	} else {
		defer os.Remove(rec.path)
	}
	ready(nil)
	mode := map[bool]string{true: "read-only", false: "read-write"}[m.readOnly]
	logger.Printf("mounted %s on %s (%s)", m.image, m.mountpoint, mode)
	// A unit of Type=notify (vhdfs mount -f) is started once the mount serves.
	if _, err := daemon.SdNotify(false, fmt.Sprintf("%s\nSTATUS=serving %s on %s (%s)", daemon.SdNotifyReady, m.image, m.mountpoint, mode)); err != nil {
		logger.Printf("warning: telling systemd the mount is ready: %v", err)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	served := make(chan struct{})
	go func() {
		srv.Wait()
		close(served)
	}()
	giveUp := make(chan struct{})
	go func() {
		sig, ok := <-sigs
		if !ok {
			return
		}
		logger.Printf("%v: aborting any merge and unmounting %s", sig, m.mountpoint)
		root.Abort()
		if now, _ := connOf(m.mountpoint); now != conn || conn == "" {
			// Not mounted here (any more): only another namespace or an open file of
			// a lazily detached mount keeps it; nothing here to wait for.
			close(giveUp)
			return
		}
		go unmountServed(srv, m.mountpoint, conn, logger)
		// Once the mount is gone from here, the kernel releases it within moments,
		// unless something elsewhere holds it.
		deadline := time.Now().Add(unmountGrace)
		var goneHere time.Time
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-served:
				return
			case now := <-tick.C:
				if goneHere.IsZero() {
					if c, _ := connOf(m.mountpoint); c != conn {
						goneHere = now
					}
				}
				if now.After(deadline) || !goneHere.IsZero() && now.Sub(goneHere) > time.Second {
					close(giveUp)
					return
				}
			}
		}
	}()
	select {
	case <-served:
	case <-giveUp:
		// Another mount namespace (or an open file of a lazily detached mount) keeps
		// the kernel's mount: stop serving it, so the chain can be flushed and closed.
		// Requests from now on fail; the process's end closes /dev/fuse, which ends the
		// mount everywhere.
		logger.Printf("%s: the kernel still holds the mount elsewhere (another mount namespace, or an open file of a lazily detached mount): no longer serving it", m.mountpoint)
		root.Stop()
	}
	signal.Stop(sigs)
	close(sigs)
	daemon.SdNotify(false, daemon.SdNotifyStopping+"\nSTATUS=flushing and closing "+m.image)
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
	logger.Printf("unmounted %s", m.mountpoint)
	return nil
}

// unmountGrace is how long a signalled mount process waits for the kernel to release
// its mount before it stops serving and exits anyway.
const unmountGrace = 5 * time.Second

// unmountServed unmounts the mount at dir that srv serves (conn), lazily if it is
// busy. It may never return: go-fuse waits for its serve loops, which end only once
// the kernel releases the mount.
func unmountServed(srv *fuse.Server, dir, conn string, logger *log.Logger) {
	if err := srv.Unmount(); err != nil {
		logger.Printf("unmount %s: %v; detaching it lazily", dir, oneLine(strings.TrimSpace(err.Error())))
		if now, _ := connOf(dir); now == conn {
			runBounded(unmountGrace, "fusermount3", "-u", "-z", dir)
		}
	}
}

// detachStdio points stdin, stdout and stderr at /dev/null, so the background
// process holds nothing of the terminal or pipe of the command that started it.
func detachStdio() error {
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer devnull.Close()
	for fd := 0; fd <= 2; fd++ {
		if err := syscall.Dup3(int(devnull.Fd()), fd, 0); err != nil {
			return fmt.Errorf("redirect descriptor %d to /dev/null: %w", fd, err)
		}
	}
	return nil
}

// resultFile is where a mount process leaves the error it ended with, for `vhdfs
// umount`, which waits for the process, prints the error and removes the file.
func resultFile(pid int) string {
	return filepath.Join(recordDir(), fmt.Sprintf("%d.err", pid))
}

func writeResult(err error) {
	p := resultFile(os.Getpid())
	if os.MkdirAll(filepath.Dir(p), 0o700) == nil {
		_ = os.WriteFile(p, []byte(oneLine(err.Error())+"\n"), 0o600)
	}
}

// readResult returns the error the mount process pid left, if any, and removes it;
// rec, if known, says where the process keeps its files.
func readResult(pid int, rec *mountRecord) error {
	ps := []string{resultFile(pid)}
	if rec != nil && rec.path != "" {
		ps = append(ps, filepath.Join(filepath.Dir(rec.path), fmt.Sprintf("%d.err", pid)))
	}
	for _, p := range ps {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		os.Remove(p)
		return errors.New(strings.TrimSpace(string(b)))
	}
	return nil
}

// cmdUmount unmounts a vhdfs mount once everything is on disk, and reports an error
// of the mount process's last flush. It refuses while a merge runs, unless told to
// abort it, and keeps the mount when the flush before unmounting fails: pending
// writes then stay in the mount process, not lost. Every wait on the mount process
// has a deadline (waitTimeout). When another mount namespace keeps the mount, the
// process serves on after the unmount here: umount says who holds it, and --abort
// ends the process (it syncs, closes its images and exits).
func cmdUmount(args []string) error {
	fl := newFlags("umount")
	var abort bool
	fl.BoolVar(&abort, "abort", false, "abort a running merge (the chain stays as it was), then unmount; also end a mount process that another mount namespace keeps serving")
	pos, err := parse(fl, args, "MOUNTPOINT")
	if err != nil {
		return err
	}
	dir := pos[0]
	abs := chain.Abs(dir)
	d := waitTimeout()
	typ, err := mountType(abs)
	if err != nil {
		return err
	}
	rec := recordAt(abs)
	if rec != nil && typ != "" && !rec.mountedHere() {
		rec = nil // something else is mounted there now
	}
	if typ == "" && rec != nil {
		return endElsewhere(rec, dir, abort, d)
	}
	if typ != "fuse.vhdfs" {
		return fmt.Errorf("%s is not a vhdfs mount", dir)
	}
	conn, _ := connOf(abs)
	if rec != nil && rec.stopped() {
		return fmt.Errorf("%s: mount process %d serving it is stopped; continue it (kill -CONT %d) and run umount again", dir, rec.PID, rec.PID)
	}
	who := "the mount process"
	if rec != nil {
		who = fmt.Sprintf("mount process %d", rec.PID)
	}
	st, err := statusOf(abs, d)
	if errors.Is(err, errNoAnswer) {
		return fmt.Errorf("%s: %s did not answer a status read within %v; still mounted", dir, who, d)
	}
	var en syscall.Errno
	// Whatever the errno, a vhdfs mount that cannot answer has lost its process:
	// only the kernel's mount is left.
	dead := errors.As(err, &en)
	if dead {
		st, err = &fs.Status{}, nil
	}
	if err != nil {
		return fmt.Errorf("%s is not a vhdfs mount: %v", dir, err)
	}
	if !dead && rec == nil {
		who = fmt.Sprintf("mount process %d", st.PID)
	}
	aborted := false
	if st.Running != "" && !dead { // a merge; a snapshot is over in a moment
		if !abort {
			return fmt.Errorf("%s: %q is running; wait for it, write abort to %s, or use vhdfs umount --abort",
				dir, st.Running, filepath.Join(dir, "control"))
		}
		if err := writeControlOf(abs, "abort", d); err != nil {
			return fmt.Errorf("abort the merge on %s: %v", dir, noAnswer(err, who, d))
		}
		aborted = true
	}
	if !dead && !st.ReadOnly {
		if err := writeControlOf(abs, "sync", d); err != nil {
			return fmt.Errorf("sync %s: %v; still mounted, nothing lost: fix the cause and run umount again", dir, noAnswer(err, who, d))
		}
	}
	if err := fusermountU(dir, aborted, d); err != nil {
		return err
	}
	// Wait for the mount process to finish writing and close its images.
	if err := waitServed(st.PID, rec, conn, dir, abort, d); err != nil {
		return err
	}
	if err := readResult(st.PID, rec); err != nil {
		return fmt.Errorf("%s: mount process: %v", dir, err)
	}
	return nil
}

// noAnswer words errNoAnswer as what it waited for.
func noAnswer(err error, who string, d time.Duration) error {
	if errors.Is(err, errNoAnswer) {
		return fmt.Errorf("%s did not answer within %v", who, d)
	}
	return err
}

// endElsewhere handles a mount point that is no longer mounted here but whose mount
// process still runs (another mount namespace holds the mount, or a file of a lazily
// detached mount is open): it says so, or with abort signals the process, which
// aborts any merge, syncs, closes its images and exits.
func endElsewhere(rec *mountRecord, dir string, abort bool, d time.Duration) error {
	if rec.stopped() {
		return fmt.Errorf("%s: mount process %d serving it is stopped; continue it (kill -CONT %d) and run umount again", dir, rec.PID, rec.PID)
	}
	if !abort {
		return fmt.Errorf("%s is not mounted here, but mount process %d still serves it%s; vhdfs umount --abort %s ends it",
			dir, rec.PID, heldBy(holders(rec.Conn)), dir)
	}
	if err := rec.signal(syscall.SIGTERM); err != nil {
		return err
	}
	if err := waitExit(rec.PID, d+unmountGrace); err != nil {
		return fmt.Errorf("%s: %v", dir, err)
	}
	if err := readResult(rec.PID, rec); err != nil {
		return fmt.Errorf("%s: mount process: %v", dir, err)
	}
	return nil
}

// heldBy words the holders of a mount for a message.
func heldBy(hs []holder) string {
	if len(hs) == 0 {
		return ""
	}
	var s []string
	for _, h := range hs {
		s = append(s, h.String())
	}
	return " for " + strings.Join(s, ", ")
}

// waitServed waits for the mount process pid to end after its mount at dir was
// unmounted here. It exits once the kernel releases the mount; when another mount
// namespace holds it (a mount of the connection conn in some /proc/PID/mountinfo),
// that never happens: waitServed says who holds it, or with abort ends the process.
func waitServed(pid int, rec *mountRecord, conn, dir string, abort bool, d time.Duration) error {
	if pid <= 0 || pid == os.Getpid() {
		return nil
	}
	start := time.Now()
	deadline := start.Add(d)
	look := start.Add(min(time.Second, d/4))
	signalled := false
	for delay := time.Millisecond; ; delay = min(delay*2, 100*time.Millisecond) {
		if exited(pid) {
			return nil
		}
		now := time.Now()
		if !signalled && conn != "" && now.After(look) {
			look = now.Add(time.Second)
			if hs := holders(conn); len(hs) > 0 {
				if !abort {
					return fmt.Errorf("%s: unmounted here, its writes synced, but %s still holds the mount, so mount process %d serves on; vhdfs umount --abort %s ends it",
						dir, strings.TrimPrefix(heldBy(hs), " for "), pid, dir)
				}
				var err error
				if rec != nil {
					err = rec.signal(syscall.SIGTERM)
				} else if err = syscall.Kill(pid, syscall.SIGTERM); err != nil {
					err = fmt.Errorf("signal mount process %d serving %s: %w", pid, dir, err)
				}
				if err != nil {
					return err
				}
				signalled = true
				deadline = now.Add(d + unmountGrace)
			}
		}
		if now.After(deadline) && signalled {
			return fmt.Errorf("%s: mount process %d still running %v after the unmount, despite SIGTERM", dir, pid, now.Sub(start).Round(time.Second))
		}
		if now.After(deadline) {
			return fmt.Errorf("%s: mount process %d still running %v after the unmount (a mount namespace this user cannot see may hold the mount); vhdfs umount --abort %s ends it",
				dir, pid, now.Sub(start).Round(time.Second), dir)
		}
		time.Sleep(delay)
	}
}

// fusermountU unmounts dir. Just after an abort, the aborted merge's writer may hold
// control open for a moment yet: a busy mount is then tried again for a while.
func fusermountU(dir string, retryBusy bool, d time.Duration) error {
	deadline := time.Now().Add(5 * time.Second)
	for delay := time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		out, err := runBounded(d, "fusermount3", "-u", dir)
		if errors.Is(err, errNoAnswer) {
			return fmt.Errorf("unmount %s: fusermount3 -u did not finish within %v", dir, d)
		}
		if err == nil {
			return nil
		}
		msg := strings.TrimSpace(string(out))
		busy := strings.Contains(msg, "busy")
		if busy && (!retryBusy || time.Now().After(deadline)) {
			if who := busyHolders(chain.Abs(dir)); who != "" {
				return fmt.Errorf("unmount %s: busy: %s; still mounted, nothing lost: end those and run umount again", dir, who)
			}
		}
		if !retryBusy || !busy || time.Now().After(deadline) {
			return fmt.Errorf("unmount %s: %s", dir, oneLine(msg))
		}
		time.Sleep(delay)
	}
}
