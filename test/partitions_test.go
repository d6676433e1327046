package test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// sfdiskOn runs sfdisk on file (disk.raw of a mount) with script on stdin and
// extra arguments before the file.
func sfdiskOn(t testing.TB, file, script string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sfdisk", append(append([]string{"--no-reread", "--no-tell-kernel", "-q"}, args...), file)...)
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk %v %s: %v\n%s", args, file, err, out)
	}
}

// partNames lists partitions/ of the mount at mnt.
func partNames(t testing.TB, mnt string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(mnt, "partitions"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// partSpan is a partition the test expects: its file and its bytes in disk.raw.
type partSpan struct {
	name        string
	start, size int64
}

// checkParts checks that partitions/ holds exactly want, each file as large as its
// partition and equal (cmp, from a child process) to its slice of disk.raw.
func checkParts(t testing.TB, mnt string, want []partSpan) {
	t.Helper()
	var names []string
	for _, p := range want {
		names = append(names, p.name)
	}
	slices.Sort(names)
	if got := partNames(t, mnt); !slices.Equal(got, names) {
		t.Fatalf("partitions/: %v, want %v", got, names)
	}
	for _, p := range want {
		file := filepath.Join(mnt, "partitions", p.name)
		st, err := os.Stat(file)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() != p.size {
			t.Errorf("%s: %d bytes, want %d", p.name, st.Size(), p.size)
		}
		cmpSlice(t, mnt, p, 0, p.size)
	}
}

// cmpSlice compares [off, off+n) of partition p's file with the same bytes of
// disk.raw, both read by child processes (dd and cmp), in 512-byte units.
func cmpSlice(t testing.TB, mnt string, p partSpan, off, n int64) {
	t.Helper()
	disk := filepath.Join(mnt, "disk.raw")
	file := filepath.Join(mnt, "partitions", p.name)
	script := fmt.Sprintf("cmp <(dd if=%q bs=512 skip=%d count=%d status=none) <(dd if=%q bs=512 skip=%d count=%d status=none)",
		disk, (p.start+off)/512, n/512, file, off/512, n/512)
	if out, errs, code := run(t, "bash", "-c", script); code != 0 {
		t.Errorf("%s [%d, %d) differs from disk.raw at %d: %s%s", p.name, off, off+n, p.start+off, out, errs)
	}
}

// partitionedMount makes a 64 MiB image, mounts it and writes a table with sfdisk
// through disk.raw.
func partitionedMount(t *testing.T, format, script string, flags ...string) (string, *testChain) {
	t.Helper()
	c := makeChain(t, chainOptions{Format: format, Create: []string{"--size", "64M", "--exact-size"}})
	mnt := mountEnv(t, c.Top(), nil, flags...)
	if names := partNames(t, mnt); len(names) != 0 {
		t.Fatalf("partitions/ of an empty disk: %v", names)
	}
	sfdiskOn(t, filepath.Join(mnt, "disk.raw"), script)
	return mnt, c
}

// TestPartitionsMBR: primaries, an extended partition with two logical ones, as
// Linux numbers them (p5, p6), each equal to its slice of disk.raw; an ext4 made on
// p1.raw checks clean and sits at p1's offset in disk.raw; writes go both ways.
func TestPartitionsMBR(t *testing.T) {
	mnt, _ := partitionedMount(t, "vhd", "label: dos\nstart=1M, size=20M, type=83\nstart=21M, size=4M, type=7\ntype=5, start=30M, size=30M\nstart=31M, size=10M\nstart=45M, size=5M, type=b\n")
	want := []partSpan{{"p1.raw", 1 * mib, 20 * mib}, {"p2.raw", 21 * mib, 4 * mib}, {"p5.raw", 31 * mib, 10 * mib}, {"p6.raw", 45 * mib, 5 * mib}}
	checkParts(t, mnt, want)

	p1 := filepath.Join(mnt, "partitions", "p1.raw")
	mustRun(t, "mkfs.ext4", "-q", "-F", p1)
	mustRun(t, "e2fsck", "-fn", p1)
	cmpSlice(t, mnt, want[0], 0, want[0].size) // the file system, seen through disk.raw
	mustRun(t, "e2fsck", "-fn", p1)

	t.Run("write through p5.raw", func(t *testing.T) {
		mustRun(t, "bash", "-c", fmt.Sprintf("head -c 12345 /dev/urandom | dd of=%q bs=1 seek=777 conv=notrunc status=none", filepath.Join(mnt, "partitions", "p5.raw")))
		cmpSlice(t, mnt, want[2], 0, 64<<10)
		// A discard (a hole punched in the partition) reads zeros through disk.raw too.
		mustRun(t, "fallocate", "-p", "-o", "4096", "-l", "8192", filepath.Join(mnt, "partitions", "p5.raw"))
		cmpSlice(t, mnt, want[2], 0, 64<<10)
		if out := mustRun(t, "bash", "-c", fmt.Sprintf("dd if=%q bs=4096 skip=%d count=2 status=none | tr -d '\\0' | wc -c", filepath.Join(mnt, "disk.raw"), (want[2].start+4096)/4096)); strings.TrimSpace(out) != "0" {
			t.Errorf("punched range of p5.raw, read through disk.raw: %s non-zero bytes", out)
		}
	})
	t.Run("write through disk.raw", func(t *testing.T) {
		mustRun(t, "bash", "-c", fmt.Sprintf("head -c 65536 /dev/urandom | dd of=%q bs=4096 seek=%d conv=notrunc status=none", filepath.Join(mnt, "disk.raw"), (45*mib+8192)/4096))
		cmpSlice(t, mnt, want[3], 0, 128<<10)
	})
	t.Run("past the end", func(t *testing.T) {
		p6 := filepath.Join(mnt, "partitions", "p6.raw")
		f, err := os.OpenFile(p6, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		// One pwrite each (os.File.WriteAt drops the count of a short write).
		if k, err := syscall.Pwrite(int(f.Fd()), make([]byte, 1024), 5*mib-512); k != 512 || err != nil {
			t.Errorf("write across the end: %d, %v; want 512", k, err)
		}
		if _, err := syscall.Pwrite(int(f.Fd()), []byte{1}, 5*mib); !errors.Is(err, syscall.ENOSPC) {
			t.Errorf("write at the end: %v, want ENOSPC", err)
		}
		if err := f.Truncate(mib); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("ftruncate: %v, want EINVAL", err)
		}
		if err := os.Truncate(p6, 6*mib); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("truncate to 6 MiB: %v, want EINVAL", err)
		}
		// dd without conv=notrunc opens with O_TRUNC, which leaves the size.
		mustRun(t, "bash", "-c", fmt.Sprintf("head -c 4096 /dev/zero | dd of=%q bs=4096 status=none", p6))
		if st, err := os.Stat(p6); err != nil || st.Size() != 5*mib {
			t.Errorf("after O_TRUNC: %v, %v", st.Size(), err)
		}
		buf := make([]byte, 100)
		if k, err := f.ReadAt(buf, 5*mib-50); k != 50 {
			t.Errorf("read across the end: %d, %v", k, err)
		}
	})
	cmpSlice(t, mnt, want[0], 0, want[0].size)
	mustRun(t, "e2fsck", "-fn", p1)
}

// TestPartitionsGPT: GPT partitions are pN for entry N-1, gaps in the entries
// included; the protective MBR's partition is not listed.
func TestPartitionsGPT(t *testing.T) {
	mnt, _ := partitionedMount(t, "vhdx", "label: gpt\n1: start=1M, size=16M\n3: start=20M, size=8M\n4: start=40M, size=1M\n")
	want := []partSpan{{"p1.raw", 1 * mib, 16 * mib}, {"p3.raw", 20 * mib, 8 * mib}, {"p4.raw", 40 * mib, 1 * mib}}
	checkParts(t, mnt, want)
	p3 := filepath.Join(mnt, "partitions", "p3.raw")
	mustRun(t, "mkfs.ext4", "-q", "-F", p3)
	mustRun(t, "e2fsck", "-fn", p3)
	cmpSlice(t, mnt, want[1], 0, want[1].size)

	t.Run("damaged primary, then backup", func(t *testing.T) {
		// Flip a byte of the primary header: the backup at the end lists the same.
		mustRun(t, "bash", "-c", fmt.Sprintf("printf '\\xff' | dd of=%q bs=1 seek=%d conv=notrunc status=none", filepath.Join(mnt, "disk.raw"), 512+40))
		checkParts(t, mnt, want)
		// And of the backup's: no table vhdfs can read, no partitions.
		mustRun(t, "bash", "-c", fmt.Sprintf("printf '\\xff' | dd of=%q bs=1 seek=%d conv=notrunc status=none", filepath.Join(mnt, "disk.raw"), 64*mib-512+40))
		if names := partNames(t, mnt); len(names) != 0 {
			t.Errorf("partitions/ with both GPTs damaged: %v", names)
		}
	})
}

// TestPartitionsFollowTable: deleting a partition and adding another through
// disk.raw while mounted changes the listing; the partition that went refuses new opens.
func TestPartitionsFollowTable(t *testing.T) {
	mnt, _ := partitionedMount(t, "vhd", "label: dos\nstart=1M, size=10M\nstart=11M, size=10M\nstart=21M, size=10M\n")
	checkParts(t, mnt, []partSpan{{"p1.raw", 1 * mib, 10 * mib}, {"p2.raw", 11 * mib, 10 * mib}, {"p3.raw", 21 * mib, 10 * mib}})
	p2 := filepath.Join(mnt, "partitions", "p2.raw")
	before, err := os.Stat(p2)
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(mnt, "disk.raw")
	sfdiskOn(t, disk, "", "--delete")
	sfdiskOn(t, disk, "label: dos\nstart=1M, size=10M\nstart=40M, size=12M\n")
	checkParts(t, mnt, []partSpan{{"p1.raw", 1 * mib, 10 * mib}, {"p2.raw", 40 * mib, 12 * mib}})
	after, err := os.Stat(p2)
	if err != nil {
		t.Fatal(err)
	}
	if before.Sys().(*syscall.Stat_t).Ino == after.Sys().(*syscall.Stat_t).Ino {
		t.Errorf("p2.raw kept its inode number %d across a change of its place", after.Sys().(*syscall.Stat_t).Ino)
	}
	p3 := filepath.Join(mnt, "partitions", "p3.raw")
	if _, err := os.Open(p3); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("open of a deleted partition: %v, want ENOENT", err)
	}
	sfdiskOn(t, disk, "", "--delete")
	if names := partNames(t, mnt); len(names) != 0 {
		t.Errorf("partitions/ without a table: %v", names)
	}
}

// TestPartitionsOwnerAndMode: the partitions have disk.raw's owner and mode under
// uid=, gid= and umask=, and lose the write bits on a read-only mount, where
// writes fail with EROFS.
func TestPartitionsOwnerAndMode(t *testing.T) {
	c := makeChain(t, chainOptions{Create: []string{"--size", "16M", "--exact-size"}})
	mnt := mountEnv(t, c.Top(), nil)
	sfdiskOn(t, filepath.Join(mnt, "disk.raw"), "label: dos\nstart=1M, size=4M\n")
	mustVhdfs(t, "umount", mnt)
	p1 := filepath.Join("partitions", "p1.raw")
	for _, tc := range []struct {
		name  string
		flags []string
		want  map[string]string
	}{
		{"the image's", nil, map[string]string{"disk.raw": "0644 %[1]d:%[2]d n1", p1: "0644 %[1]d:%[2]d n1", "partitions": "0555 %[1]d:%[2]d n2"}},
		{"read-only", []string{"-r"}, map[string]string{"disk.raw": "0444 %[1]d:%[2]d n1", p1: "0444 %[1]d:%[2]d n1"}},
		{"uid, gid and umask", []string{"-o", "uid=7,gid=8,umask=027"}, map[string]string{"disk.raw": "0640 7:8 n1", p1: "0640 7:8 n1", "partitions": "0550 7:8 n2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.Chmod(c.Top(), 0o644); err != nil {
				t.Fatal(err)
			}
			mnt := mountEnv(t, c.Top(), nil, tc.flags...)
			for p, w := range tc.want {
				if strings.Contains(w, "%") {
					w = fmt.Sprintf(w, os.Getuid(), os.Getgid())
				}
				if got := statOf(t, filepath.Join(mnt, p)); got != w {
					t.Errorf("%s: %s, want %s", p, got, w)
				}
			}
			if slices.Contains(tc.flags, "-r") {
				_, errs, code := run(t, "dd", "if=/dev/zero", "of="+filepath.Join(mnt, p1), "bs=512", "count=1", "conv=notrunc", "status=none")
				if code == 0 || !strings.Contains(errs, "Read-only file system") {
					t.Errorf("write to p1.raw of a read-only mount: exit %d: %s", code, errs)
				}
			}
			mustVhdfs(t, "umount", mnt)
		})
	}
}
