package imagelock

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// helperEnv makes the test binary a lock holder: "reader" or "writer" on a path,
// which says "held" and keeps the lock until its stdin closes.
const helperEnv = "IMAGELOCK_TEST_HOLD"

func TestMain(m *testing.M) {
	if spec := os.Getenv(helperEnv); spec != "" {
		os.Exit(hold(spec))
	}
	os.Exit(m.Run())
}

func hold(spec string) int {
	kind, path, _ := strings.Cut(spec, ":")
	need := map[string]Need{"reader": Reader, "writer": Writer}[kind]
	f, err := os.Open(path)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	h, err := Acquire(f, path, need)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("held")
	io.Copy(io.Discard, os.Stdin)
	h.Release()
	return 0
}

// holdIn starts another process holding kind on path until the test ends.
func holdIn(t *testing.T, kind, path string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+kind+":"+path)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		cmd.Wait()
	})
	line, _ := bufio.NewReader(out).ReadString('\n')
	if line != "held\n" {
		t.Fatalf("holder of %s on %s: %q", kind, path, line)
	}
}

func tempFile(t *testing.T) (*os.File, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, p
}

// TestAcrossProcesses: qemu's rules between two processes.
func TestAcrossProcesses(t *testing.T) {
	for _, tc := range []struct {
		other, want string
		ok          bool
		msg         string
	}{
		{"reader", "reader", true, ""},
		{"reader", "writer", false, `Failed to get "write" lock`},
		{"writer", "reader", false, `locked for writing`},
		{"writer", "writer", false, `locked for writing`},
	} {
		t.Run(tc.other+" then "+tc.want, func(t *testing.T) {
			f, p := tempFile(t)
			holdIn(t, tc.other, p)
			need := map[string]Need{"reader": Reader, "writer": Writer}[tc.want]
			h, err := Acquire(f, p, need)
			if tc.ok {
				if err != nil {
					t.Fatalf("Acquire: %v", err)
				}
				h.Release()
				return
			}
			if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), tc.msg) || !strings.Contains(err.Error(), p) {
				t.Fatalf("Acquire: %v; want ErrLocked naming %s and %q", err, p, tc.msg)
			}
			if !strings.Contains(err.Error(), "pid ") {
				t.Errorf("Acquire: %v; want the holder's pid", err)
			}
			// A refusal leaves no owner, and so no byte locked, behind.
			mu.Lock()
			n := len(owners)
			mu.Unlock()
			if n != 0 {
				t.Errorf("after a refused Acquire this process keeps %d lock owners", n)
			}
		})
	}
}

// TestBytes: the bytes qemu reads, by what the handles need, and none after Release.
func TestBytes(t *testing.T) {
	f, p := tempFile(t)
	r, err := Acquire(f, p, Reader)
	if err != nil {
		t.Fatal(err)
	}
	if got := heldBy(t, p); fmt.Sprint(got) != "[100 201]" {
		t.Errorf("reader holds %v, want [100 201]", got)
	}
	w, err := Acquire(f, p, Need{Hold: Writer.Hold, NoShare: Writer.NoShare, Joint: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := heldBy(t, p); fmt.Sprint(got) != "[100 101 201 203]" {
		t.Errorf("reader and joint writer hold %v, want [100 101 201 203]", got)
	}
	if _, err := Acquire(f, p, Writer); !errors.Is(err, ErrLocked) {
		t.Errorf("a second writer in the process: %v, want ErrLocked", err)
	}
	w.Release()
	if got := heldBy(t, p); fmt.Sprint(got) != "[100 201]" {
		t.Errorf("after the writer's release %v, want [100 201]", got)
	}
	r.Release()
	if got := heldBy(t, p); len(got) != 0 {
		t.Errorf("after every release %v, want none", got)
	}
}

// heldBy lists the lock bytes anyone holds on path, tested with OFD locks from a
// fresh description.
func heldBy(t *testing.T, path string) []int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []int
	for _, base := range []int{permBase, sharedBase} {
		for i := 0; i < numPerms; i++ {
			lk := unix.Flock_t{Type: unix.F_WRLCK, Start: int64(base + i), Len: 1}
			if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
				t.Fatal(err)
			}
			if lk.Type != unix.F_UNLCK {
				out = append(out, base+i)
			}
		}
	}
	return out
}
