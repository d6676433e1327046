// Command benchloopback is go-fuse's example loopback (example/loopback: the same file
// system, the same options) with FUSE passthrough off, for make bench: run as root,
// the example hands each open file to the kernel (passthrough), which then reads the
// backing file itself; an unprivileged user gets this copy path, the FUSE ceiling
// without passthrough.
//
//	benchloopback MOUNTPOINT ORIGINAL [READAHEAD]
//
// READAHEAD (bytes) sets the mount's maximum read-ahead, as vhdfs sets its own (1 MiB),
// so that make bench can tell what of a lead over the loopback is read-ahead.
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// node is go-fuse's LoopbackNode whose open files offer no passthrough descriptor.
type node struct {
	fs.LoopbackNode
}

var _ = (fs.NodeOpener)((*node)(nil))

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, fl, e := n.LoopbackNode.Open(ctx, flags)
	if lf, ok := fh.(*fs.LoopbackFile); ok {
		return &file{lf}, fl, e
	}
	return fh, fl, e
}

// file is go-fuse's LoopbackFile less passthrough.
type file struct {
	*fs.LoopbackFile
}

func (f *file) PassthroughFd() (int, bool) { return -1, false }

func main() {
	if len(os.Args) != 3 && len(os.Args) != 4 {
		fmt.Fprintf(os.Stderr, "usage: %s MOUNTPOINT ORIGINAL [READAHEAD]\n", os.Args[0])
		os.Exit(2)
	}
	readAhead := 0
	if len(os.Args) == 4 {
		n, err := strconv.Atoi(os.Args[3])
		if err != nil || n < 0 {
			log.Fatalf("READAHEAD %q: not a number of bytes", os.Args[3])
		}
		readAhead = n
	}
	orig := os.Args[2]
	root, err := fs.NewLoopbackRoot(orig)
	if err != nil {
		log.Fatalf("NewLoopbackRoot(%s): %v", orig, err)
	}
	rd := root.(*fs.LoopbackNode).RootData
	rd.NewNode = func(r *fs.LoopbackRoot, parent *fs.Inode, name string, st *syscall.Stat_t) fs.InodeEmbedder {
		return &node{fs.LoopbackNode{RootData: r}}
	}
	sec := time.Second
	srv, err := fs.Mount(os.Args[1], root, &fs.Options{
		AttrTimeout:     &sec,
		EntryTimeout:    &sec,
		NullPermissions: true,
		MountOptions: fuse.MountOptions{
			FsName:       orig,
			Name:         "loopback",
			Options:      []string{"ro"},
			MaxReadAhead: readAhead,
		},
	})
	if err != nil {
		log.Fatalf("mount: %v", err)
	}
	c := make(chan os.Signal, 1)
	signal.Notify(c, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-c
		srv.Unmount()
	}()
	srv.Wait()
}
