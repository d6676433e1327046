package test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestMergeWritesDoNotWait: a writer keeps writing through a 1 GiB `merge depth=2`
// from the top, first while the merge is held half-way through its copy and then
// while it runs to the end; no write takes a second, and fio's crc32c verification
// of what it wrote passes. Before the fresh-top design a write sat in the kernel for
// the whole merge.
func TestMergeWritesDoNotWait(t *testing.T) {
	requireTool(t, "fio")
	forEachFormat(t, func(t *testing.T, format string) {
		const (
			size     = 1152 << 20
			merged   = 1 << 30 // bytes snap1 holds
			fioOff   = 1088 << 20
			fioSize  = 32 << 20
			maxClat  = time.Second
			chunkLen = 4 << 20
		)
		dir := t.TempDir()
		base := createBase(t, dir, format, 0, "base", "--size", fmt.Sprint(size), "--exact-size")
		snap1 := createChild(t, base, "snap1")
		rng := rand.New(rand.NewPCG(7, 8))
		chunk := make([]byte, chunkLen)
		for i := range chunk {
			chunk[i] = byte(rng.Uint32())
		}
		// Timed: the plain build, as users run it.
		bin := plainBinary(t)
		m1 := mountEnvWith(t, bin, snap1, nil)
		f, err := os.OpenFile(filepath.Join(m1, "disk.raw"), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		// The model, without holding 1 GiB: chunk i is the random chunk stamped with i.
		chunkAt := func(off int) []byte {
			chunk[0], chunk[chunkLen-1] = byte(off>>20), byte(off>>22)
			return chunk
		}
		for off := 0; off < merged; off += chunkLen {
			if _, err := f.WriteAt(chunkAt(off), int64(off)); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		mustVhdfs(t, "umount", m1)
		top := createChild(t, snap1, "top")

		env, reached, resume := pausePoint(t, "copy-half")
		mnt := mountEnvWith(t, bin, top, []string{env})
		disk := filepath.Join(mnt, "disk.raw")
		result := make(chan syscall.Errno, 1)
		go func() { result <- control(mnt, "merge depth=2") }()
		reached()
		if st := readMergeStatus(t, mnt); st.State != "merging" {
			t.Fatalf("state %q with the merge held at copy-half, want merging", st.State)
		}

		ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
		defer cancel()
		fio := func(loops int) (*exec.Cmd, string) {
			out := filepath.Join(t.TempDir(), "fio.json")
			// A writer stuck behind the merge would hang here: the timeout fails the test.
			cmd := exec.CommandContext(ctx, "fio", "--name=w", "--filename="+disk, "--rw=randwrite", "--bs=4k",
				fmt.Sprintf("--offset=%d", fioOff), fmt.Sprintf("--size=%d", fioSize), fmt.Sprintf("--loops=%d", loops),
				"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=256", "--direct=1",
				"--ioengine=psync", "--randrepeat=0", "--verify_state_save=0", "--output-format=json", "--output="+out)
			return cmd, out
		}
		check := func(what, out string) {
			t.Helper()
			var res struct {
				Jobs []struct {
					Error int `json:"error"`
					Write struct {
						IOs  int64 `json:"total_ios"`
						Clat struct {
							Max float64 `json:"max"`
						} `json:"clat_ns"`
					} `json:"write"`
				} `json:"jobs"`
			}
			b := fileBytes(t, out)
			if i := bytes.IndexByte(b, '{'); i > 0 {
				b = b[i:] // fio may print notes before the JSON
			}
			if err := json.Unmarshal(b, &res); err != nil || len(res.Jobs) != 1 {
				t.Fatalf("%s: fio output: %v\n%s", what, err, b)
			}
			j := res.Jobs[0]
			clat := time.Duration(j.Write.Clat.Max)
			t.Logf("%s: %d writes, longest %v", what, j.Write.IOs, clat)
			if j.Error != 0 || j.Write.IOs == 0 {
				t.Errorf("%s: fio error %d after %d writes", what, j.Error, j.Write.IOs)
			}
			if clat >= maxClat {
				t.Errorf("%s: the longest write took %v, want under %v", what, clat, maxClat)
			}
		}

		held, heldOut := fio(1)
		if out, err := held.CombinedOutput(); err != nil {
			t.Fatalf("fio while the merge is held: %v\n%s", err, out)
		}
		check("writes while the merge is held half-way", heldOut)
		if st := readMergeStatus(t, mnt); st.State != "merging" {
			t.Fatalf("state %q after the writes, want merging", st.State)
		}

		running, runningOut := fio(4)
		var fioOut bytes.Buffer
		running.Stdout, running.Stderr = &fioOut, &fioOut
		if err := running.Start(); err != nil {
			t.Fatal(err)
		}
		resume()
		if e := <-result; e != 0 {
			running.Process.Kill()
			running.Wait()
			t.Fatalf("merge depth=2: %v: %+v", e, readMergeStatus(t, mnt).Last)
		}
		if err := running.Wait(); err != nil {
			t.Fatalf("fio through the merge: %v\n%s", err, fioOut.String())
		}
		check("writes through the rest of the merge", runningOut)

		// The merge went through: a chain of two, the view as written.
		st := readMergeStatus(t, mnt)
		if len(st.Chain) != 2 || st.Chain[1].Path != base {
			t.Errorf("chain after the merge: %+v", st.Chain)
		}
		// disk.raw, chunk by chunk: the chunks written, zeros, and fio's region (which
		// fio verified) as it is.
		d, err := os.Open(disk)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.New()
		got, zero := make([]byte, chunkLen), make([]byte, chunkLen)
		for off := 0; off < size; off += chunkLen {
			if _, err := d.ReadAt(got, int64(off)); err != nil {
				t.Fatal(err)
			}
			sum.Write(got)
			want := zero
			switch {
			case off < merged:
				want = chunkAt(off)
			case off >= fioOff && off < fioOff+fioSize:
				want = got
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("disk.raw after the merge differs in the chunk at %d", off)
			}
		}
		d.Close()
		want := sum.Sum(nil)
		mustVhdfs(t, "umount", mnt)
		if got := sha256file(t, exportImage(t, top)); got != fmt.Sprintf("%x", want) {
			t.Errorf("export after umount differs from disk.raw before it")
		}
		if out, errs, code := vhdfs(t, "check", top); code != 0 {
			t.Errorf("check: exit %d\n%s%s", code, out, errs)
		}
	})
}
