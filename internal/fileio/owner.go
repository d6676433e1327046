package fileio

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// AsOwnerOf runs f with the file-system authority of the owner of the file like (an
// image): when this process is root and like belongs to another user, f runs on an
// OS thread of its own whose file-system user, group and supplementary groups are
// that user's, so every path the kernel resolves for f (creates, opens, renames,
// links, removals, through symlinks or not) is checked against that user's
// permissions, and files f creates are that user's. A mount process is root, its
// images may be a user's, and the user may write its control file: a merge or
// snapshot then gains nothing beyond what the image's owner may do. f must not start
// goroutines that touch paths (they would run with the process's authority). The
// thread ends with f.
func AsOwnerOf(like string, f func() error) error {
	st, err := os.Stat(like)
	if err != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || os.Geteuid() != 0 || sys.Uid == 0 {
		return f()
	}
	groups := []int{int(sys.Gid)}
	if u, err := user.LookupId(strconv.Itoa(int(sys.Uid))); err == nil {
		if ids, err := u.GroupIds(); err == nil {
			for _, id := range ids {
				if g, err := strconv.Atoi(id); err == nil {
					groups = append(groups, g)
				}
			}
		}
	}
	done := make(chan error, 1)
	go func() {
		// Never unlocked: the thread, whose identity changed, ends with this goroutine.
		runtime.LockOSThread()
		if err := setThreadFSIdentity(int(sys.Uid), int(sys.Gid), groups); err != nil {
			done <- fmt.Errorf("act as the owner of %s (uid %d): %w", like, sys.Uid, err)
			return
		}
		done <- f()
	}()
	return <-done
}

// setThreadFSIdentity sets the calling thread's supplementary groups, file-system
// group and file-system user, through the raw system calls, which change this thread
// only (Go's syscall.Setgroups and the like change every thread of the process).
func setThreadFSIdentity(uid, gid int, groups []int) error {
	gs := make([]uint32, len(groups))
	for i, g := range groups {
		gs[i] = uint32(g)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(gs)), uintptr(unsafePointer(gs)), 0); e != 0 {
		return fmt.Errorf("setgroups: %w", e)
	}
	unix.RawSyscall(unix.SYS_SETFSGID, uintptr(gid), 0, 0)
	unix.RawSyscall(unix.SYS_SETFSUID, uintptr(uid), 0, 0)
	// setfsuid and setfsgid say nothing of failure; asking again with an invalid ID
	// returns the current one.
	if got, _, _ := unix.RawSyscall(unix.SYS_SETFSUID, ^uintptr(0), 0, 0); int(got) != uid {
		return fmt.Errorf("setfsuid(%d) left %d", uid, got)
	}
	if got, _, _ := unix.RawSyscall(unix.SYS_SETFSGID, ^uintptr(0), 0, 0); int(got) != gid {
		return fmt.Errorf("setfsgid(%d) left %d", gid, got)
	}
	return nil
}

// OwnLike gives the file at path, which the caller has just created (so it is a
// regular file of one link, owned by the creating identity), the owner and
// permission bits of the file like, through a descriptor opened without following
// a symlink: a link or another file put in its place meanwhile is refused, never
// changed. It returns the file's device and inode, for checking a later open by path.
func OwnLike(path, like string) (dev, ino uint64, err error) {
	want, err := os.Stat(like)
	if err != nil {
		return 0, 0, err
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, 0, fmt.Errorf("open %s again: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, 0, err
	}
	// The creator: this thread's file-system user (see AsOwnerOf).
	creator, _, _ := unix.RawSyscall(unix.SYS_SETFSUID, ^uintptr(0), 0, 0)
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Nlink != 1 || st.Uid != uint32(creator) {
		return 0, 0, fmt.Errorf("%s was replaced while it was made", filepath.Base(path))
	}
	if err := unix.Fchmod(fd, uint32(want.Mode().Perm())); err != nil {
		return 0, 0, fmt.Errorf("chmod %s: %w", path, err)
	}
	if sys, ok := want.Sys().(*syscall.Stat_t); ok && (sys.Uid != st.Uid || sys.Gid != st.Gid) {
		if err := unix.Fchown(fd, int(sys.Uid), int(sys.Gid)); err != nil {
			return 0, 0, fmt.Errorf("chown %s: %w", path, err)
		}
	}
	return st.Dev, st.Ino, nil
}

func unsafePointer(gs []uint32) unsafe.Pointer {
	if len(gs) == 0 {
		return nil
	}
	return unsafe.Pointer(&gs[0])
}
