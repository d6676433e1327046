package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// mountRecord is what a mount process writes about itself once its mount is ready,
// so that a command finds the mount of an image by identity (who holds the image's
// lock, and what that process says it serves) instead of asking every mount.
type mountRecord struct {
	PID        int    `json:"pid"`
	Start      uint64 `json:"start"` // start time of the process (field 22 of /proc/PID/stat)
	Exe        string `json:"exe"`
	Mountpoint string `json:"mountpoint"`
	Image      string `json:"image"` // the top image at mount time
	ImageDev   uint64 `json:"image_dev"`
	ImageIno   uint64 `json:"image_ino"`
	ReadOnly   bool   `json:"read_only"`
	Conn       string `json:"conn"` // the FUSE connection's device, "major:minor" as mountinfo shows it

	path string // the record's file
}

// recordDir is where this process keeps its records and results: $XDG_RUNTIME_DIR/vhdfs,
// /run/vhdfs for root, or a per-user directory under the temporary directory.
func recordDir() string {
	switch dir := os.Getenv("XDG_RUNTIME_DIR"); {
	case dir != "":
		return filepath.Join(dir, "vhdfs")
	case os.Geteuid() == 0:
		return "/run/vhdfs"
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("vhdfs-%d", os.Geteuid()))
}

// recordDirs are the directories searched for records: this process's own, root's,
// and (readable to root) those of every user's runtime directory.
func recordDirs() []string {
	dirs := []string{recordDir(), "/run/vhdfs"}
	if more, err := filepath.Glob("/run/user/*/vhdfs"); err == nil {
		dirs = append(dirs, more...)
	}
	if more, err := filepath.Glob(filepath.Join(os.TempDir(), "vhdfs-[0-9]*")); err == nil {
		dirs = append(dirs, more...)
	}
	seen := map[string]bool{}
	var out []string
	for _, d := range dirs {
		if !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	return out
}

func recordPath(pid int) string {
	return filepath.Join(recordDir(), fmt.Sprintf("%d.json", pid))
}

// newRecord describes this process serving image at mountpoint, whose FUSE connection
// is conn (from /proc/self/mountinfo, see connOf: a stat would ask the mount itself).
func newRecord(image, mountpoint, conn string, readOnly bool) (*mountRecord, error) {
	var st unix.Stat_t
	if err := unix.Stat(image, &st); err != nil {
		return nil, fmt.Errorf("record of the mount: %w", err)
	}
	if conn == "" {
		return nil, fmt.Errorf("record of the mount: %s is not in /proc/self/mountinfo", mountpoint)
	}
	exe, _ := os.Readlink("/proc/self/exe")
	start, err := procStart(os.Getpid())
	if err != nil {
		return nil, err
	}
	return &mountRecord{PID: os.Getpid(), Start: start, Exe: exe, Mountpoint: mountpoint, Image: image,
		ImageDev: uint64(st.Dev), ImageIno: st.Ino, ReadOnly: readOnly, Conn: conn}, nil
}

// write stores the record atomically (a temporary file renamed into place).
func (r *mountRecord) write() error {
	p := recordPath(r.PID)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), ".record-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	r.path = p
	return nil
}

// connOf returns the device ("major:minor") of the fuse.vhdfs mount at dir in this
// process's mount namespace (the last one mounted there), or "" when there is none.
func connOf(dir string) (string, error) {
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(dir))
	if err != nil || len(ms) == 0 {
		return "", err
	}
	m := ms[len(ms)-1]
	if m.FSType != "fuse.vhdfs" {
		return "", nil
	}
	return fmt.Sprintf("%d:%d", m.Major, m.Minor), nil
}

// procStat returns the state letter and the start time of process pid, from
// /proc/PID/stat (fields 3 and 22; the name in field 2 may hold spaces and parentheses).
func procStat(pid int) (state byte, start uint64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: no name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	return f[0][0], start, err
}

func procStart(pid int) (uint64, error) {
	_, start, err := procStat(pid)
	return start, err
}

// comm is the name of process pid, or "?".
func comm(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

// alive reports whether the record's process still runs and is the one that wrote
// it: the same start time and the same program (a reused pid is another process).
func (r *mountRecord) alive() bool {
	if r.PID <= 0 {
		return false
	}
	state, start, err := procStat(r.PID)
	if err != nil || state == 'Z' || state == 'X' || start != r.Start {
		return false
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", r.PID))
	if err != nil {
		// Not ours to inspect (another user's process, seen by a non-root caller):
		// the start time has to do.
		return errors.Is(err, os.ErrPermission)
	}
	return strings.TrimSuffix(exe, " (deleted)") == strings.TrimSuffix(r.Exe, " (deleted)")
}

// stopped reports whether the record's process is stopped (SIGSTOP, a debugger): it
// answers nothing until continued.
func (r *mountRecord) stopped() bool {
	state, _, err := procStat(r.PID)
	return err == nil && (state == 'T' || state == 't')
}

// readRecords returns the records of live mount processes in dirs. Stale records
// (the process gone, or its pid now another program's) are removed where this
// process may, and ignored.
func readRecords(dirs []string) []*mountRecord {
	var out []*mountRecord
	seen := map[int]bool{}
	for _, dir := range dirs {
		names, _ := filepath.Glob(filepath.Join(dir, "[0-9]*.json"))
		for _, p := range names {
			b, err := os.ReadFile(p)
			if err != nil {
				continue
			}
			var r mountRecord
			if json.Unmarshal(b, &r) != nil || filepath.Base(p) != fmt.Sprintf("%d.json", r.PID) {
				continue
			}
			r.path = p
			if !r.alive() {
				os.Remove(p)
				continue
			}
			if !seen[r.PID] {
				seen[r.PID] = true
				out = append(out, &r)
			}
		}
	}
	return out
}

// lockedBytes returns the bytes of the file dev:ino that process pid holds OFD (or
// POSIX) locks on, from the lock lines of /proc/PID/fdinfo, and whether it holds any.
// Nothing here touches the file or a mount.
func lockedBytes(pid int, dev, ino uint64) (held map[int64]bool, ok bool) {
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(dev), unix.Minor(dev), ino)
	infos, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fdinfo/*", pid))
	held = map[int64]bool{}
	for _, info := range infos {
		f, err := os.Open(info)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// "lock:	1: OFDLCK ADVISORY  READ -1 fe:00:9977959 100 101"
			fl := strings.Fields(sc.Text())
			if len(fl) < 9 || fl[0] != "lock:" || fl[6] != want {
				continue
			}
			start, err1 := strconv.ParseInt(fl[7], 10, 64)
			end, err2 := strconv.ParseInt(fl[8], 10, 64)
			if err1 != nil || err2 != nil {
				continue
			}
			ok = true
			for b := start; b <= end && b < start+512; b++ {
				held[b] = true
			}
		}
		f.Close()
	}
	return held, ok
}

// writeLockByte is the lock byte of qemu's write permission (100 + bit 1), which
// only the process writing an image holds: the top of a read-write mount.
const writeLockByte = 101

// findMount returns the live record of the mount whose process serves image as
// its writable top (it holds image's write lock), or that was mounted on image, or
// nil. It reads only files of /proc and the records: no mount is asked.
func findMount(image string) (*mountRecord, error) {
	return findMountIn(recordDirs(), image)
}

// findMountIn is findMount with the records of dirs. An image that does not exist
// is mounted nowhere: nil, and the caller's open of it says what is wrong, naming it.
// Any other error names the image.
func findMountIn(dirs []string, image string) (*mountRecord, error) {
	var st unix.Stat_t
	if err := unix.Stat(image, &st); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
			return nil, nil
		}
		return nil, &os.PathError{Op: "stat", Path: image, Err: err}
	}
	dev, ino := uint64(st.Dev), st.Ino
	real, err := filepath.EvalSymlinks(image)
	if err != nil {
		return nil, err // a *PathError
	}
	real, _ = filepath.Abs(real)
	var byImage *mountRecord
	for _, r := range readRecords(dirs) {
		locked, any := lockedBytes(r.PID, dev, ino)
		if locked[writeLockByte] {
			return r, nil
		}
		// The record's device and inode are those of the top it was mounted on: after
		// a merge replaced that top, they may name another file now (an inode number
		// is reused once the old top is closed). So the process must hold this very
		// file: a lock on it, or a descriptor of its path.
		if r.ImageDev == dev && r.ImageIno == ino && (any || holdsPath(r.PID, real)) && byImage == nil {
			byImage = r
		}
	}
	return byImage, nil
}

// holdsPath reports whether process pid has path open, by the text of its
// descriptors' links (for file systems without OFD locks; no stat of the target).
func holdsPath(pid int, path string) bool {
	fds, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	for _, fd := range fds {
		if l, err := os.Readlink(fd); err == nil && l == path {
			return true
		}
	}
	return false
}

// recordAt returns the live record of the mount at mountpoint, or nil.
func recordAt(mountpoint string) *mountRecord {
	for _, r := range readRecords(recordDirs()) {
		if r.Mountpoint == mountpoint {
			return r
		}
	}
	return nil
}

// mountedHere reports whether the record's mount is in this process's mount
// namespace at its mount point, with its connection.
func (r *mountRecord) mountedHere() bool {
	conn, err := connOf(r.Mountpoint)
	return err == nil && conn == r.Conn
}

// holder is a process whose mount namespace holds a mount of a connection.
type holder struct {
	PID  int
	Comm string
	NS   string // readlink /proc/PID/ns/mnt: "mnt:[4026532]"
	At   string // where that namespace has it mounted
}

func (h holder) String() string {
	return fmt.Sprintf("pid %d (%s) in mount namespace %s at %s", h.PID, h.Comm, h.NS, h.At)
}

// holders returns one process for every mount namespace that has a mount of the
// connection conn ("major:minor"), from /proc/*/mountinfo; procfs answers these
// without asking the mounts.
func holders(conn string) []holder {
	var out []holder
	seen := map[string]bool{}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil {
			continue
		}
		ns, err := os.Readlink(filepath.Join(d, "ns", "mnt"))
		if err != nil || seen[ns] {
			continue
		}
		b, err := os.ReadFile(filepath.Join(d, "mountinfo"))
		if err != nil {
			continue
		}
		seen[ns] = true
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && f[2] == conn {
				out = append(out, holder{PID: pid, Comm: comm(pid), NS: ns, At: unescapeOctal(f[4])})
				break
			}
		}
	}
	return out
}

// unescapeOctal undoes mountinfo's octal escapes (\040 for a space).
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
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

// signalOwn sends sig to the record's process once more checked to be it; the kernel
// refuses another user's process unless the caller is root.
func (r *mountRecord) signal(sig syscall.Signal) error {
	if !r.alive() {
		return nil
	}
	if err := syscall.Kill(r.PID, sig); err != nil {
		return fmt.Errorf("signal mount process %d serving %s: %w", r.PID, r.Mountpoint, err)
	}
	return nil
}
