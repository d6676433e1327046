// Package imagelock locks image files with qemu's protocol, so that vhdfs, qemu,
// libvirt and other vhdfs processes refuse each other instead of tearing a view.
//
// qemu (block/file-posix.c, raw_apply_lock_bytes) takes shared OFD byte-range locks:
// byte 100+i for each permission i it holds, byte 200+i for each permission it does
// not share. Before it uses an image it tests, with F_OFD_GETLK, that nobody holds
// byte 200+i of a permission it wants and nobody holds byte 100+i of a permission it
// will not share. This package does the same, in the same order (lock, then test).
//
// OFD locks belong to an open file description, and two descriptions of one file in
// one process conflict like two processes. So the package keeps one lock owner per
// file (device and inode) per process: a duplicate of the first descriptor opened,
// holding the union of what every handle of that file in the process needs. Within
// one process only two writers conflict (a second mount of one chain, say), unless
// the second declares itself Joint: part of an operation that already holds the file
// (a merge writing into a parent its own chain holds read-only). Readers beside a
// writer of the same process are that process's own business.
package imagelock

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Perm is one of qemu's block permissions (BLK_PERM_*); bit i is lock byte base+i.
type Perm uint8

const (
	ConsistentRead Perm = 1 << iota
	Write
	WriteUnchanged
	Resize
	numPerms = 4
)

// Lock byte bases of qemu's protocol (RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE).
const (
	permBase   = 100
	sharedBase = 200
)

var permNames = [numPerms]string{"consistent read", "write", "write unchanged", "resize"}

func (p Perm) String() string {
	var names []string
	for i := 0; i < numPerms; i++ {
		if p&(1<<i) != 0 {
			names = append(names, permNames[i])
		}
	}
	return strings.Join(names, ", ")
}

// Need is what one handle of an image holds and what it does not share.
type Need struct {
	Hold    Perm
	NoShare Perm
	// Joint marks a handle that works together with the handles this process already
	// has on the file: it is checked against other processes only.
	Joint bool
}

var (
	// Reader is a read-only handle: it needs the image to stay as it is.
	Reader = Need{Hold: ConsistentRead, NoShare: Write}
	// Writer is the one handle that writes an image (and grows it).
	Writer = Need{Hold: ConsistentRead | Write, NoShare: Write | Resize}
)

// ErrLocked is wrapped by every refusal because of another user of the image.
var ErrLocked = errors.New("image is locked")

type key struct{ dev, ino uint64 }

// owner is the one lock-holding description of a file in this process.
type owner struct {
	fd      int // a duplicate, close-on-exec, of the first descriptor of the file
	handles map[*Handle]struct{}
	held    Perm // bytes permBase+i locked
	noShare Perm // bytes sharedBase+i locked
}

var (
	mu     sync.Mutex
	owners = map[key]*owner{} // guarded by mu
)

// Handle is one user's claim on a locked file.
type Handle struct {
	k    key
	need Need
	name string
}

// Acquire claims need on the file open as f (a regular file, open for reading), named
// name in errors. It fails, wrapping ErrLocked, when another process (or another
// handle of this one, unless need is Joint) uses the file in a way need excludes.
func Acquire(f *os.File, name string, need Need) (*Handle, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("%s: stat: %w", name, err)
	}
	k := key{uint64(st.Dev), st.Ino}
	h := &Handle{k: k, need: need, name: name}
	mu.Lock()
	defer mu.Unlock()
	o := owners[k]
	if o == nil {
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("%s: lock: %w", name, err)
		}
		o = &owner{fd: fd, handles: map[*Handle]struct{}{}}
	} else if !need.Joint {
		for other := range o.handles {
			if err := conflict(name, need, other.need, "another handle in this process"); err != nil {
				return nil, err
			}
		}
	}
	o.handles[h] = struct{}{}
	if err := o.apply(); err != nil {
		delete(o.handles, h)
		o.apply()
		o.closeIfUnused()
		return nil, fmt.Errorf("%s: lock: %w", name, err)
	}
	if err := o.test(name, need); err != nil {
		delete(o.handles, h)
		o.apply()
		o.closeIfUnused()
		return nil, err
	}
	owners[k] = o
	return h, nil
}

// Release gives up the handle's claim; the file's locks shrink to what the other
// handles need, and go when none is left. Release of a nil handle does nothing.
func (h *Handle) Release() {
	if h == nil {
		return
	}
	mu.Lock()
	o := owners[h.k]
	if o == nil {
		mu.Unlock()
		return
	}
	delete(o.handles, h)
	applied := o.apply() == nil
	last := len(o.handles) == 0
	if last {
		delete(owners, h.k)
		if !applied {
			// Locks it could not drop go with the descriptor, before anyone
			// else looks at the file.
			unix.Close(o.fd)
			mu.Unlock()
			return
		}
	}
	mu.Unlock()
	if last {
		// Outside the lock: the last close of an unlinked file (the old top of a
		// merge) frees its blocks, half a second per GiB on ext4. Until it returns
		// the file is open, so no new file can take its inode number.
		unix.Close(o.fd)
	}
}

func (o *owner) closeIfUnused() bool {
	if len(o.handles) > 0 {
		return false
	}
	unix.Close(o.fd)
	return true
}

// apply locks the bytes the handles need and unlocks the rest.
func (o *owner) apply() error {
	var held, noShare Perm
	for h := range o.handles {
		held |= h.need.Hold
		noShare |= h.need.NoShare
	}
	for i := 0; i < numPerms; i++ {
		bit := Perm(1) << i
		if err := setByte(o.fd, permBase+i, held&bit != 0, o.held&bit != 0); err != nil {
			return err
		}
		if err := setByte(o.fd, sharedBase+i, noShare&bit != 0, o.noShare&bit != 0); err != nil {
			return err
		}
	}
	o.held, o.noShare = held, noShare
	return nil
}

func setByte(fd, off int, want, have bool) error {
	if want == have {
		return nil
	}
	lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: int64(off), Len: 1}
	if !want {
		lk.Type = unix.F_UNLCK
	}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &lk); err != nil {
		return fmt.Errorf("lock byte %d: %w", off, err)
	}
	return nil
}

// test checks, as qemu's raw_check_lock_bytes does, that no other description holds
// a byte that excludes need.
func (o *owner) test(name string, need Need) error {
	for i := 0; i < numPerms; i++ {
		bit := Perm(1) << i
		if need.NoShare&bit != 0 {
			if pid, busy := held(o.fd, permBase+i); busy {
				return fmt.Errorf("%s: locked for %s by %s (Failed to get shared %q lock): %w", name, verb(bit), holder(pid), permNames[i], ErrLocked)
			}
		}
	}
	for i := 0; i < numPerms; i++ {
		bit := Perm(1) << i
		if need.Hold&bit != 0 {
			if pid, busy := held(o.fd, sharedBase+i); busy {
				return fmt.Errorf("%s: in use by %s that does not allow %s (Failed to get %q lock): %w",
					name, holder(pid), verb(bit), permNames[i], ErrLocked)
			}
		}
	}
	return nil
}

// conflict applies the rule between two handles of one process: one writer.
func conflict(name string, need, other Need, who string) error {
	if need.Hold&Write != 0 && other.Hold&Write != 0 {
		return fmt.Errorf("%s: locked for writing by %s: %w", name, who, ErrLocked)
	}
	return nil
}

func verb(p Perm) string {
	switch p {
	case Write:
		return "writing"
	case ConsistentRead:
		return "reading"
	case Resize:
		return "resizing"
	}
	return p.String()
}

// held reports whether another description holds byte off of fd's file, and the
// process that took that lock when the kernel says (0 if it does not).
func held(fd, off int) (int, bool) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: int64(off), Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &lk); err != nil {
		// A file system without OFD locks: say nothing rather than refuse everything.
		return 0, false
	}
	if lk.Type == unix.F_UNLCK {
		return 0, false
	}
	pid := int(lk.Pid)
	if pid <= 0 {
		pid = lockPID(fd, off)
	}
	return pid, true
}

// lockPID finds a process other than this one that holds byte off of fd's file, or
// 0. F_OFD_GETLK and /proc/locks give -1 as the owner of an OFD lock, but each
// process's /proc/PID/fdinfo lists the locks of its descriptors. Only processes this
// user may inspect are seen.
func lockPID(fd, off int) int {
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil {
		return 0
	}
	// "lock:	1: OFDLCK ADVISORY  READ -1 fe:00:9977959 100 101": the device is
	// major:minor in hex.
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(uint64(st.Dev)), unix.Minor(uint64(st.Dev)), st.Ino)
	infos, _ := filepath.Glob("/proc/[0-9]*/fdinfo/*")
	self := strconv.Itoa(os.Getpid())
	for _, info := range infos {
		pid := strings.Split(info, "/")[2]
		if pid == self {
			continue
		}
		b, err := os.ReadFile(info)
		if err != nil || !bytes.Contains(b, []byte(want)) {
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			fl := strings.Fields(sc.Text())
			if len(fl) < 9 || fl[0] != "lock:" || fl[6] != want {
				continue
			}
			start, err1 := strconv.Atoi(fl[7])
			end, err2 := strconv.Atoi(fl[8])
			if err1 == nil && err2 == nil && start <= off && off <= end {
				n, _ := strconv.Atoi(pid)
				return n
			}
		}
	}
	return 0
}

// holder names the process that holds a lock, as well as it can be known.
func holder(pid int) string {
	if pid <= 0 {
		return "another process (a mount, a merge or qemu)"
	}
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return fmt.Sprintf("another process (pid %d)", pid)
	}
	return fmt.Sprintf("another process (%s, pid %d)", strings.TrimSpace(string(comm)), pid)
}
