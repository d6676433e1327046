package merge

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhdfs/vhdfs/image"
)

// kernelCopyWorks reports whether copy_file_range copies between files in dir.
func kernelCopyWorks(t *testing.T, dir string) bool {
	t.Helper()
	a, err := os.Create(filepath.Join(dir, "cfr-a"))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := os.Create(filepath.Join(dir, "cfr-b"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := a.Write(make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	var ro, wo int64
	n, err := unix.CopyFileRange(int(a.Fd()), &ro, int(b.Fd()), &wo, 4096, 0)
	return err == nil && n == 4096
}

var kernelCopied = regexp.MustCompile(`(\d+) of them copied by copy_file_range`)

// TestMergeKernelCopy: a merge copies by copy_file_range wherever the source stores
// a piece in one run and the target stores it in place: everything for a fixed
// target, nothing with NoKernelCopy; the view is the same either way.
func TestMergeKernelCopy(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		for _, tc := range []struct {
			name     string
			base     image.Type
			depth    int
			noKernel bool
			want     string // "all", "some" or "none" of the merged bytes
		}{
			{"into a fixed target", image.Fixed, 3, false, "all"},
			{"into a fixed target, NoKernelCopy", image.Fixed, 3, true, "none"},
			{"into a dynamic target", image.Dynamic, 3, false, "some"},
			{"into a differencing target", image.Dynamic, 1, false, "some"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				f := buildChain(t, chainSpec(format, tc.base, 77))
				if !kernelCopyWorks(t, f.dir) && !tc.noKernel {
					t.Skip("copy_file_range does not work in the test's directory")
				}
				c := openChain(t, f.paths[0], true)
				defer c.Close()
				var lines []string
				logf := func(format string, args ...any) { lines = append(lines, fmt.Sprintf(format, args...)) }
				res, err := Merge(context.Background(), c, Options{Depth: tc.depth, Logf: logf, NoKernelCopy: tc.noKernel})
				if err != nil {
					t.Fatalf("merge: %v", err)
				}
				assertSame(t, "view after the merge", readView(t, c), f.model)
				got := int64(-1)
				for _, l := range lines {
					if m := kernelCopied.FindStringSubmatch(l); m != nil {
						got, _ = strconv.ParseInt(m[1], 10, 64)
					}
				}
				if got < 0 {
					t.Fatalf("no log line says how many bytes copy_file_range copied: %q", lines)
				}
				switch {
				case tc.want == "all" && got != res.Bytes,
					tc.want == "some" && (got == 0 || got > res.Bytes),
					tc.want == "none" && got != 0:
					t.Errorf("copy_file_range copied %d of %d merged bytes, want %s", got, res.Bytes, tc.want)
				}
			})
		}
	})
}
