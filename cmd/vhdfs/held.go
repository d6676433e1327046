package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/chain"
	"github.com/vhdfs/vhdfs/image"
)

// exitedSoon reports whether the record's process has ended, or ends within a
// moment: a process killed with SIGKILL closes its FUSE connection while it exits,
// so a writer may learn of the lost connection before the process is a zombie.
func exitedSoon(rec *mountRecord) bool {
	deadline := time.Now().Add(time.Second)
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		if !rec.alive() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(delay)
	}
}

// mountHolding returns the live record of the vhdfs mount whose process holds a lock
// on the file path (any image of its chain), or nil. Like findMount it reads only
// /proc and the records: no mount is asked.
func mountHolding(path string) *mountRecord {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil
	}
	if rec, err := findMount(path); err == nil && rec != nil {
		return rec
	}
	for _, r := range readRecords(recordDirs()) {
		if _, any := lockedBytes(r.PID, uint64(st.Dev), st.Ino); any {
			return r
		}
	}
	return nil
}

// mountedErr words err, a refused open of path, as one line naming the vhdfs mount
// that holds path and what to do instead, when a vhdfs mount holds it; else err.
// instead is the way round through the mount ("" for none).
func mountedErr(path string, err error, instead string) error {
	if !errors.Is(err, image.ErrLocked) {
		return err
	}
	rec := mountHolding(path)
	if rec == nil {
		return err
	}
	return mountedMsg(path, rec, instead)
}

// mountedMsg is the one line that says path is held by the mount rec: locked for
// writing (its top, read-write) or for reading (an image of its chain).
func mountedMsg(path string, rec *mountRecord, instead string) error {
	dev, ino := statID(path)
	how := "reading"
	if locked, _ := lockedBytes(rec.PID, dev, ino); locked[writeLockByte] {
		how = "writing"
	}
	where := "mount at " + rec.Mountpoint
	if rec.ImageDev != dev || rec.ImageIno != ino {
		where += ", whose chain it is in" // a lower layer, or a top a merge replaced
	}
	msg := fmt.Sprintf("%s: locked for %s by the vhdfs %s (mount process %d): umount it first (vhdfs umount %s)",
		path, how, where, rec.PID, rec.Mountpoint)
	if instead != "" {
		msg += ", or " + instead
	}
	return errors.New(msg)
}

func statID(path string) (uint64, uint64) {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return 0, 0
	}
	return uint64(st.Dev), st.Ino
}

// busyScanFor bounds the search for what keeps a mount busy.
const busyScanFor = 2 * time.Second

// maxNamed bounds how many holders a message names.
const maxNamed = 8

// maxFdsRead bounds the descriptors read of one process: a process with a huge
// descriptor table is not read to its end.
var maxFdsRead = 1 << 16

// busyHolders names what keeps the mount at mnt busy: loop devices backed by a file
// under it (/sys/block/loop*/loop/backing_file) and processes with a file under it
// open, or their working directory there (/proc/*/fd, /proc/*/cwd). Only links are
// read, never the mount's files; what cannot be read is skipped, and the scan stops
// after busyScanFor, inside a process's descriptors too, of which it reads at most
// maxFdsRead. The links name the mount point with its symbolic links resolved, so mnt
// is resolved too. "" when nothing was found.
func busyHolders(mnt string) string {
	if real, err := filepath.EvalSymlinks(mnt); err == nil {
		mnt = real
	}
	mnt = chain.Abs(mnt)
	prefix := strings.TrimSuffix(mnt, "/") + "/"
	under := func(p string) bool {
		p = strings.TrimSuffix(p, " (deleted)")
		return p == strings.TrimSuffix(mnt, "/") || strings.HasPrefix(p, prefix)
	}
	var named []string
	more := 0
	add := func(s string) {
		if len(named) < maxNamed {
			named = append(named, s)
		} else {
			more++
		}
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	sort.Strings(loops)
	for _, bf := range loops {
		b, err := os.ReadFile(bf)
		if err != nil {
			continue
		}
		if p := strings.TrimSpace(string(b)); under(p) {
			dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(bf)))
			add(fmt.Sprintf("loop device %s on %s (losetup -d %s)", dev, strings.TrimSuffix(p, " (deleted)"), dev))
		}
	}
	deadline := time.Now().Add(busyScanFor)
	procs, _ := filepath.Glob("/proc/[0-9]*")
	self := os.Getpid()
	partial := false
	var capped []int
	for _, d := range procs {
		if time.Now().After(deadline) {
			partial = true
			break
		}
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil || pid == self {
			continue
		}
		var files []string
		if l, err := os.Readlink(filepath.Join(d, "cwd")); err == nil && under(l) {
			files = append(files, "its working directory "+l)
		}
		links, stopped, cut := fdLinks(d, deadline)
		partial = partial || stopped
		if cut {
			capped = append(capped, pid)
		}
		for _, l := range links {
			if under(l) {
				files = append(files, strings.TrimSuffix(l, " (deleted)"))
			}
		}
		if len(files) > 0 {
			add(fmt.Sprintf("pid %d (%s) has %s open", pid, comm(pid), strings.Join(dedup(files), ", ")))
		}
	}
	if len(named) == 0 {
		return ""
	}
	s := strings.Join(named, "; ")
	if more > 0 {
		s += fmt.Sprintf("; and %d more", more)
	}
	if partial {
		s += fmt.Sprintf(" (the search of /proc stopped after %v)", busyScanFor)
	}
	if len(capped) > 0 {
		s += fmt.Sprintf(" (only the first %d descriptors of pid %s were read)", maxFdsRead, joinInts(capped))
	}
	return s
}

// fdLinks returns the targets of the descriptors of the process at procDir
// (/proc/PID), at most maxFdsRead of them, read until deadline: stopped says the
// deadline ended the reading, cut that maxFdsRead did.
func fdLinks(procDir string, deadline time.Time) (links []string, stopped, cut bool) {
	f, err := os.Open(filepath.Join(procDir, "fd"))
	if err != nil {
		return nil, false, false
	}
	defer f.Close()
	read := 0
	for read < maxFdsRead {
		names, err := f.Readdirnames(min(1024, maxFdsRead-read))
		for _, n := range names {
			if time.Now().After(deadline) {
				return links, true, false
			}
			read++
			if l, err := os.Readlink(filepath.Join(procDir, "fd", n)); err == nil {
				links = append(links, l)
			}
		}
		if err != nil || len(names) == 0 {
			return links, false, false // io.EOF: all read
		}
	}
	more, _ := f.Readdirnames(1)
	return links, false, len(more) > 0
}

func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ", ")
}

func dedup(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}
