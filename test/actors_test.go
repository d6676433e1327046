package test

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestActorPairs runs every pair of actors on one chain (base.vhd ← top.vhd, and
// base.vhd ← top2.vhd) with qemu's lock rules as the expectation: the first actor is
// started and held (a mount stays mounted, a merge waits at a failpoint, qemu-io waits
// for commands on a pipe), then the second runs to completion or is refused.
//
// A file may have one writer and no other opener, or any number of readers. A vhdfs
// process writes its top (rw mount, merge) and reads the parents, but a merge also
// writes its target; check --repair of a sound chain only reads. qemu opens the one
// file it is given (it does not follow a vhdfs differencing image to its parent).
// With A held on top.vhd:
//
//	same top (B on top.vhd, qemu on top.vhd): allowed only when A and B both read
//	top.vhd: A ∈ {mount -r, qemu-io -r} × B ∈ {mount -r, create, check --repair,
//	export, qemu-io -r, qemu-img convert}, and `vhdfs merge` of a top mounted
//	read-write, which merges through the mount; everything else is refused on top.vhd.
//
//	shared parent (B on top2.vhd, qemu actors on base.vhd itself): allowed unless one
//	of them writes base.vhd (a merge into it, qemu-io write): A ∈ {mount, mount -r,
//	qemu-io -r} × B ∉ {merge, qemu-io write}; everything else is refused on base.vhd.
//
// A refused actor exits non-zero saying why and naming the image, and changes no file;
// after every allowed pair each view equals the model kept here (qemu-img convert for the
// base, vhdfs export for the images above it).
func TestActorPairs(t *testing.T) {
	requireTool(t, "qemu-io")
	requireTool(t, "qemu-img")
	forEachFormat(t, func(t *testing.T, format string) {
		fx := makeActorFixture(t, format)
		for _, placement := range []string{"same top", "shared parent"} {
			for _, a := range actors {
				if a.hold == nil {
					continue
				}
				for _, b := range actors {
					if format != "vhd" && placement == "same top" && (a.qemu || b.qemu) {
						// qemu does not open differencing VHDX: its actors take part
						// only where they open the base.
						continue
					}
					t.Run(fmt.Sprintf("%s/%s then %s", placement, a.name, b.name), func(t *testing.T) {
						t.Parallel()
						runActorPair(t, fx, placement == "shared parent", a, b)
					})
				}
			}
		}
	})
}

// actorFile is the file name of an image of the actor tests in format. The tables and
// models name the images as VHD files (base.vhd, top.vhd, top2.vhd, snap.vhd); in VHDX
// they are base.vhdx and top.avhdx, top2.avhdx, snap.avhdx.
func actorFile(format, name string) string {
	stem := strings.TrimSuffix(name, ".vhd")
	return imageName(format, stem, stem != "base")
}

// Lock roles of an actor on a file.
type role int

const (
	none role = iota
	reads
	writes
)

// actor is one program that opens the chain. Its roles say what qemu's rules make it
// hold: on the image it is given, and on that image's parent (vhdfs actors only).
type actor struct {
	name       string
	qemu       bool // a qemu program: it opens base.vhd in the shared-parent placement
	img, below role
	// run runs the actor to completion and returns its exit code and stderr; on
	// success it has checked its own result and updated the models.
	run func(p *pairRun, img, side string) (int, string)
	// hold starts the actor (which must succeed) and returns once it holds its locks;
	// release lets it finish. Nil for actors that cannot be held open.
	hold func(p *pairRun, img, side string) (release func())
}

var actors = []actor{
	{name: "mount", img: writes, below: reads, run: runMountRW, hold: holdMountRW},
	{name: "mount -r", img: reads, below: reads, run: runMountRO, hold: holdMountRO},
	{name: "merge", img: writes, below: writes, run: runMerge, hold: holdMerge},
	{name: "create --parent", img: reads, below: reads, run: runCreate},
	// On a chain with nothing to repair, check --repair writes nothing and takes only
	// read locks: unlike qemu-img check -r, which opens the image for writing at once.
	// It takes the write lock only to complete a merge or restore a footer.
	{name: "check --repair", img: reads, below: reads, run: runCheckRepair},
	{name: "export", img: reads, below: reads, run: runExport},
	{name: "qemu-io write", qemu: true, img: writes, run: runQemuWrite, hold: holdQemuWrite},
	{name: "qemu-io -r", qemu: true, img: reads, run: runQemuRead, hold: holdQemuRead},
	{name: "qemu-img convert", qemu: true, img: reads, run: runQemuConvert},
}

// Patterns of the fixture and of the actors' writes; none of the images above the
// base holds data in the 2 MiB block at 8M, where qemu-io writes (qemu allocates a
// whole block of a dynamic image as present).
var (
	baseWrites = []write{{0, fill(1<<20, 0x11)}, {8 << 20, fill(64<<10, 0x12)}, {30 << 20, fill(1<<20, 0x13)}}
	topWrites  = []write{{512 << 10, fill(1<<20, 0x21)}, {16 << 20, fill(128<<10, 0x22)}}
	top2Writes = []write{{4 << 20, fill(256<<10, 0x31)}, {768 << 10, fill(64<<10, 0x32)}}
	qemuWrite1 = write{8 << 20, fill(64<<10, 0x42)}
	// The rw mounts write at one offset per side, so that A's and B's writes differ.
	mountWrites = map[string]write{"A": {20 << 20, fill(64<<10, 0x51)}, "B": {24 << 20, fill(64<<10, 0x61)}}
)

// actorFixture is the chain every pair starts from, and the view of each image.
type actorFixture struct {
	format string
	dir    string
	views  map[string][]byte // by file name
}

func makeActorFixture(t *testing.T, format string) *actorFixture {
	t.Helper()
	// Built in one directory and then moved, so that the absolute parent locators of
	// the copies lead nowhere: each copy finds only its own base (the relative locator).
	dir := filepath.Join(t.TempDir(), "build")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	fx := &actorFixture{format: format, dir: dir, views: map[string][]byte{}}
	// 2 MiB blocks (VHD's default) for the base: see qemuWrite1.
	base := createBase(t, dir, format, 0, "base", "--size", "32M", "--block-size", "2M")
	size := virtualSize(t, base)
	var qws []qemuWrite
	model := make([]byte, size)
	for _, w := range baseWrites {
		qws = append(qws, qemuWrite{w.Data[0], w.Off, int64(len(w.Data))})
		copy(model[w.Off:], w.Data)
	}
	qemuIOWrite(t, base, qws)
	fx.views["base.vhd"] = model
	for name, ws := range map[string][]write{"top.vhd": topWrites, "top2.vhd": top2Writes} {
		img := createChild(t, base, strings.TrimSuffix(name, ".vhd"))
		mnt := mMountpoint(t)
		mMount(t, img, mnt)
		view := bytes.Clone(model)
		writeDisk(t, mnt, view, ws...)
		mUmount(t, mnt)
		fx.views[name] = view
	}
	for name, view := range fx.views {
		assertFileEquals(t, exportImage(t, filepath.Join(dir, actorFile(format, name))), view)
	}
	assertSameBytes(t, "qemu-img convert base.vhd", qemuConvert(t, base), model)
	fx.dir = filepath.Join(filepath.Dir(dir), "fixture")
	if err := os.Rename(dir, fx.dir); err != nil {
		t.Fatal(err)
	}
	return fx
}

// writeDisk writes ws into MNT/disk.raw, syncs it, and applies ws to view.
func writeDisk(t testing.TB, mnt string, view []byte, ws ...write) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(mnt, "disk.raw"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, w := range ws {
		if _, err := mPwrite(f, w.Data, w.Off); err != nil {
			t.Fatalf("write %d bytes at %d into %s/disk.raw: %v", len(w.Data), w.Off, mnt, err)
		}
		copy(view[w.Off:], w.Data)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// pairRun is one pair's copy of the fixture and the models of its images.
type pairRun struct {
	t      *testing.T
	format string
	dir    string
	out    string              // a directory for the actors' outputs
	views  map[string][]byte   // expected view of each image, by file name
	parent map[string]string   // parent of each image, by file name ("" for the base)
	valid  map[string]bool     // false for an image a merge made invalid
	mounts map[string]struct{} // mount points in use
}

// path is where the image the models call name (base.vhd…) is.
func (p *pairRun) path(name string) string { return filepath.Join(p.dir, actorFile(p.format, name)) }

// above reports whether the view of image x includes image y's data (y is x or an
// ancestor of x).
func (p *pairRun) above(x, y string) bool {
	for ; x != ""; x = p.parent[x] {
		if x == y {
			return true
		}
	}
	return false
}

// written applies a write made into image img to every view that includes it. The
// actors write only where no image above img holds data.
func (p *pairRun) written(img string, w write) {
	for x := range p.views {
		if p.above(x, img) {
			copy(p.views[x][w.Off:], w.Data)
		}
	}
}

// merged records a merge of img into its parent: the parent shows what img showed and
// gets a new unique ID, so its other children are no longer valid.
func (p *pairRun) merged(img string) {
	target := p.parent[img]
	p.views[target] = bytes.Clone(p.views[img])
	for x := range p.views {
		if x != img && p.parent[x] == target {
			p.valid[x] = false
		}
	}
}

func runActorPair(t *testing.T, fx *actorFixture, shared bool, a, b actor) {
	p := &pairRun{t: t, format: fx.format, dir: t.TempDir(), out: t.TempDir(), views: map[string][]byte{},
		parent: map[string]string{"base.vhd": "", "top.vhd": "base.vhd", "top2.vhd": "base.vhd"},
		valid:  map[string]bool{}}
	for name, view := range fx.views {
		copyFile(t, filepath.Join(fx.dir, actorFile(fx.format, name)), p.path(name))
		p.views[name] = bytes.Clone(view)
		p.valid[name] = true
	}
	imgA, imgB := "top.vhd", "top.vhd"
	if shared {
		imgB = "top2.vhd"
	}
	if a.qemu && shared {
		imgA = "base.vhd"
	}
	if b.qemu && shared {
		imgB = "base.vhd"
	}
	refused, contended := conflict(p, a, imgA, b, imgB)

	release := a.hold(p, imgA, "A")
	before := snapshotFiles(t, p.dir, p.out)
	code, stderr := b.run(p, imgB, "B")
	switch {
	case refused && code == 0:
		t.Errorf("%s of %s beside %s of %s: allowed, want refused on %s", b.name, imgB, a.name, imgA, contended)
	case !refused && code != 0:
		t.Errorf("%s of %s beside %s of %s: exit %d, want allowed: %s", b.name, imgB, a.name, imgA, code, stderr)
	case refused:
		want := []string{"lock", filepath.Base(p.path(contended))}
		if !b.qemu && !strings.Contains(stderr, "locked for") && !strings.Contains(stderr, "does not allow") {
			t.Errorf("%s: the refusal says neither \"locked for\" nor \"does not allow\": %s", b.name, stderr)
		}
		if b.qemu {
			want = append(want, "Failed to get")
		}
		for _, w := range want {
			if !strings.Contains(stderr, w) {
				t.Errorf("%s refused: stderr does not contain %q: %s", b.name, w, stderr)
			}
		}
		assertUnchanged(t, before)
	}
	release()
	if !refused {
		p.assertViews()
	}
}

// conflict applies qemu's rules: two actors conflict on a file both open when either
// writes it. It returns the file they conflict on.
func conflict(p *pairRun, a actor, imgA string, b actor, imgB string) (bool, string) {
	if a.name == "mount" && b.name == "merge" && imgA == imgB {
		// `vhdfs merge` of a top mounted read-write merges through the mount.
		return false, ""
	}
	roles := func(x actor, img string) map[string]role {
		r := map[string]role{img: x.img}
		if !x.qemu {
			for y := p.parent[img]; y != ""; y = p.parent[y] {
				r[y] = x.below
				if x.below == writes {
					break // a merge of depth 1 writes its target and reads nothing below
				}
			}
		}
		return r
	}
	ra, rb := roles(a, imgA), roles(b, imgB)
	for _, f := range []string{"top.vhd", "top2.vhd", "base.vhd"} {
		if ra[f] != none && rb[f] != none && (ra[f] == writes || rb[f] == writes) {
			return true, f
		}
	}
	return false, ""
}

// assertViews compares every image with its model once both actors are done: the base
// as qemu-img converts it, the others as vhdfs exports them; an image a merge made
// invalid must say so.
func (p *pairRun) assertViews() {
	t := p.t
	t.Helper()
	assertSameBytes(t, "qemu-img convert base.vhd", qemuConvert(t, p.path("base.vhd")), p.views["base.vhd"])
	for name, view := range p.views {
		if name == "base.vhd" {
			continue
		}
		out := filepath.Join(p.out, "final-"+name+".raw")
		_, stderr, code := vhdfs(t, "export", p.path(name), out)
		switch {
		case !p.valid[name] && (code == 0 || !strings.Contains(stderr, "no longer valid")):
			t.Errorf("export of %s after a merge into its parent: exit %d, want \"no longer valid\": %s", name, code, stderr)
		case p.valid[name] && code != 0:
			t.Errorf("export of %s: exit %d: %s", name, code, stderr)
		case p.valid[name]:
			assertFileEquals(t, out, view)
		}
	}
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	if err := os.WriteFile(to, fileBytes(t, from), 0o644); err != nil {
		t.Fatal(err)
	}
}

// startMount runs `vhdfs mount [flags] IMG MNT` at a new mount point and returns it
// with the exit code and stderr; a refused mount must leave nothing mounted.
func startMount(p *pairRun, img string, flags ...string) (string, int, string) {
	t := p.t
	t.Helper()
	mnt := mMountpoint(t)
	mCleanupMount(t, mnt)
	args := append(append([]string{"mount"}, flags...), p.path(img), mnt)
	cmd := exec.Command(vhdfsBin, args...)
	cmd.Env = mRaceLog(t)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	code := exitCode(t, cmd.Run())
	if code != 0 && mountedAt(t, mnt) {
		t.Errorf("vhdfs mount %s failed (exit %d) but left a mount", img, code)
	}
	if code == 0 && !mountedAt(t, mnt) {
		t.Fatalf("vhdfs mount %s returned, but nothing is mounted", img)
	}
	return mnt, code, errb.String()
}

// exitCode is the exit code of a finished command; one that did not exit fails the test.
func exitCode(t testing.TB, err error) int {
	t.Helper()
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok && ee.Exited() {
		return ee.ExitCode()
	}
	t.Fatalf("command did not exit: %v", err)
	return -1
}

func mountRW(p *pairRun, img, side string) (string, int, string) {
	mnt, code, stderr := startMount(p, img)
	if code == 0 {
		w := mountWrites[side]
		writeDisk(p.t, mnt, make([]byte, len(p.views[img])), w)
		p.written(img, w)
	}
	return mnt, code, stderr
}

func runMountRW(p *pairRun, img, side string) (int, string) {
	mnt, code, stderr := mountRW(p, img, side)
	if code == 0 {
		mUmount(p.t, mnt)
	}
	return code, stderr
}

func holdMountRW(p *pairRun, img, side string) func() {
	mnt, code, stderr := mountRW(p, img, side)
	if code != 0 {
		p.t.Fatalf("vhdfs mount %s: exit %d: %s", img, code, stderr)
	}
	return func() { mUmount(p.t, mnt) }
}

func mountRO(p *pairRun, img string) (string, int, string) {
	mnt, code, stderr := startMount(p, img, "-r")
	if code == 0 {
		assertFileEquals(p.t, filepath.Join(mnt, "disk.raw"), p.views[img])
	}
	return mnt, code, stderr
}

func runMountRO(p *pairRun, img, side string) (int, string) {
	mnt, code, stderr := mountRO(p, img)
	if code == 0 {
		mUmount(p.t, mnt)
	}
	return code, stderr
}

func holdMountRO(p *pairRun, img, side string) func() {
	mnt, code, stderr := mountRO(p, img)
	if code != 0 {
		p.t.Fatalf("vhdfs mount -r %s: exit %d: %s", img, code, stderr)
	}
	return func() { mUmount(p.t, mnt) }
}

func runMerge(p *pairRun, img, side string) (int, string) {
	_, stderr, code := vhdfs(p.t, "merge", p.path(img))
	if code == 0 {
		p.merged(img)
	}
	return code, stderr
}

// holdMerge starts `vhdfs merge IMG` paused at copy-start, when it holds the top and
// the target for writing.
func holdMerge(p *pairRun, img, side string) func() {
	t := p.t
	t.Helper()
	dir := t.TempDir()
	for _, n := range []string{"reached", "resume"} {
		if err := syscall.Mkfifo(filepath.Join(dir, n), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(vhdfsBin, "merge", p.path(img))
	cmd.Env = append(os.Environ(), "VHDFS_FAILPOINT=copy-start:pause="+dir)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		// Unblock a merge still waiting for its resume line, then reap it.
		if f, err := os.OpenFile(filepath.Join(dir, "resume"), os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
	})
	reached := make(chan []byte, 1)
	go func() {
		b, _ := os.ReadFile(filepath.Join(dir, "reached"))
		reached <- b
	}()
	select {
	case b := <-reached:
		if strings.TrimSpace(string(b)) != "copy-start" {
			t.Fatalf("merge paused at %q, want copy-start", b)
		}
	case err := <-done:
		// Let the reader go: open the FIFO for writing once, without blocking on it.
		if f, err := os.OpenFile(filepath.Join(dir, "reached"), os.O_RDWR, 0); err == nil {
			f.Close()
		}
		t.Fatalf("vhdfs merge %s exited before copy-start: %v: %s", img, err, errb.String())
	case <-time.After(cmdTimeout):
		t.Fatalf("vhdfs merge %s: copy-start not reached", img)
	}
	return func() {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, "resume"), []byte("go\n"), 0); err != nil {
			t.Fatalf("resume merge: %v", err)
		}
		if code := exitCode(t, <-done); code != 0 {
			t.Fatalf("vhdfs merge %s: exit %d: %s", img, code, errb.String())
		}
		p.merged(img)
	}
}

func runCreate(p *pairRun, img, side string) (int, string) {
	snap := "snap.vhd"
	_, stderr, code := vhdfs(p.t, append([]string{"create", "--parent", p.path(img)}, childFormatArgs(p.format, p.path(snap))...)...)
	if code == 0 {
		p.parent[snap] = img
		p.views[snap] = bytes.Clone(p.views[img])
		p.valid[snap] = true
	}
	return code, stderr
}

func runCheckRepair(p *pairRun, img, side string) (int, string) {
	_, stderr, code := vhdfs(p.t, "check", "--repair", p.path(img))
	return code, stderr
}

func runExport(p *pairRun, img, side string) (int, string) {
	out := filepath.Join(p.out, "export-"+img+".raw")
	_, stderr, code := vhdfs(p.t, "export", p.path(img), out)
	if code == 0 {
		assertFileEquals(p.t, out, p.views[img])
	}
	return code, stderr
}

func qemuWriteCmd(w write) string {
	return fmt.Sprintf("write -P %#02x %d %d", w.Data[0], w.Off, len(w.Data))
}

// qemuReadCmd reads 64 KiB that the image itself holds (qemu sees a differencing
// image as a dynamic one, without its parent) and checks the pattern.
func qemuReadCmd(img string) string {
	if img == "base.vhd" {
		return "read -P 0x11 0 64k"
	}
	return "read -P 0x22 16M 64k"
}

func runQemuIO(p *pairRun, img, command string, flags ...string) (int, string) {
	args := append(append([]string{"-f", qemuFormat(p.path(img))}, flags...), "-c", command, p.path(img))
	stdout, stderr, code := run(p.t, "qemu-io", args...)
	if code == 0 && (!strings.Contains(stdout, "65536/65536") || strings.Contains(stdout, "verification failed")) {
		p.t.Errorf("qemu-io %s: %s%s", strings.Join(args, " "), stdout, stderr)
	}
	return code, stderr
}

func runQemuWrite(p *pairRun, img, side string) (int, string) {
	code, stderr := runQemuIO(p, img, qemuWriteCmd(qemuWrite1))
	if code == 0 {
		p.written(img, qemuWrite1)
	}
	return code, stderr
}

func runQemuRead(p *pairRun, img, side string) (int, string) {
	return runQemuIO(p, img, qemuReadCmd(img), "-r")
}

func runQemuConvert(p *pairRun, img, side string) (int, string) {
	out := filepath.Join(p.out, "qemu-"+img+".raw")
	_, stderr, code := run(p.t, "qemu-img", "convert", "-f", qemuFormat(p.path(img)), "-O", "raw", p.path(img), out)
	if code == 0 && img == "base.vhd" {
		assertFileEquals(p.t, out, p.views[img])
	}
	return code, stderr
}

// qemuSession is an interactive qemu-io reading commands from a pipe.
type qemuSession struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	mu    sync.Mutex
	out   bytes.Buffer // stdout and stderr; guarded by mu
	done  chan error
}

func (s *qemuSession) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.out.Write(b)
}

func (s *qemuSession) output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.out.String()
}

// holdQemu starts `qemu-io -f vpc [flags] IMG` with commands from a pipe, sends
// command and waits for its answer (want); the process holds the image until release
// closes the pipe.
func holdQemu(t testing.TB, img, command, want string, flags ...string) func() {
	t.Helper()
	s := &qemuSession{done: make(chan error, 1)}
	s.cmd = exec.Command("qemu-io", append(append([]string{"-f", qemuFormat(img)}, flags...), img)...)
	s.cmd.Stdout, s.cmd.Stderr = s, s
	var err error
	if s.stdin, err = s.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() {
		s.stdin.Close()
		s.cmd.Process.Kill()
	})
	if _, err := io.WriteString(s.stdin, command+"\n"); err != nil {
		t.Fatalf("qemu-io %s: %v: %s", img, err, s.output())
	}
	deadline := time.Now().Add(30 * time.Second)
	for delay := time.Millisecond; !strings.Contains(s.output(), want); delay = min(2*delay, 50*time.Millisecond) {
		select {
		case err := <-s.done:
			t.Fatalf("qemu-io %s exited: %v: %s", img, err, s.output())
		case <-time.After(delay):
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-io %s: no %q after 30s: %s", img, want, s.output())
		}
	}
	if strings.Contains(s.output(), "verification failed") {
		t.Errorf("qemu-io %s: %s", img, s.output())
	}
	return func() {
		t.Helper()
		s.stdin.Close()
		select {
		case err := <-s.done:
			if err != nil {
				t.Errorf("qemu-io %s: %v: %s", img, err, s.output())
			}
		case <-time.After(cmdTimeout):
			t.Fatalf("qemu-io %s did not exit at the end of its input", img)
		}
	}
}

func holdQemuWrite(p *pairRun, img, side string) func() {
	release := holdQemu(p.t, p.path(img), qemuWriteCmd(qemuWrite1), "wrote 65536/65536")
	p.written(img, qemuWrite1)
	return release
}

func holdQemuRead(p *pairRun, img, side string) func() {
	return holdQemu(p.t, p.path(img), qemuReadCmd(img), "read 65536/65536", "-r")
}
