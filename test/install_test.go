package test

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The make-level tests run make in the module root, as a user would: they build
// bin/vhdfs, man/ and bin/completion there (git-ignored build outputs) and never run
// in parallel, so that no two makes write them at once.

var (
	madeOnce sync.Once
	madeErr  string
)

// makeAll runs `make` once for these tests: bin/vhdfs, the man pages and the
// completions, which install, deb and demo then reuse.
func makeAll(t *testing.T) {
	t.Helper()
	requireTool(t, "make")
	madeOnce.Do(func() {
		if out, err := exec.Command("make", "-C", moduleRoot, "--no-print-directory").CombinedOutput(); err != nil {
			madeErr = err.Error() + ": " + string(out)
		}
	})
	if madeErr != "" {
		t.Fatalf("make: %s", madeErr)
	}
}

// git runs git in the module root and returns its trimmed output.
func git(t *testing.T, args ...string) string {
	t.Helper()
	return strings.TrimSpace(mustRun(t, "git", append([]string{"-C", moduleRoot}, args...)...))
}

// assertNamesHead fails unless the version line names HEAD: its short hash, or a tag
// on it (git describe gives the tag alone there).
func assertNamesHead(t *testing.T, what, version string) {
	t.Helper()
	if strings.Contains(version, git(t, "rev-parse", "--short", "HEAD")) {
		return
	}
	for _, tag := range strings.Fields(git(t, "tag", "--points-at", "HEAD")) {
		if strings.Contains(version, strings.TrimPrefix(tag, "v")) {
			return
		}
	}
	t.Errorf("%s %q names neither HEAD's short hash nor a tag on it", what, version)
}

// TestMakeInstall: make install DESTDIR PREFIX puts the binary, every man page and
// the three completion files in their places, and make uninstall removes every file
// it put there; make deb packs the same files under /usr with Depends: fuse3 and a
// version naming the revision.
func TestMakeInstall(t *testing.T) {
	makeAll(t)
	dest := t.TempDir()
	mustRun(t, "make", "-C", moduleRoot, "--no-print-directory", "install", "DESTDIR="+dest, "PREFIX=/usr/local")
	root := filepath.Join(dest, "usr/local")

	out := mustRun(t, filepath.Join(root, "bin/vhdfs"), "--version")
	if !strings.HasPrefix(out, "vhdfs ") || strings.Contains(out, "dev") {
		t.Errorf("installed vhdfs --version = %q", out)
	}
	assertNamesHead(t, "installed vhdfs --version", strings.TrimSpace(out))

	man := string(fileBytes(t, filepath.Join(root, "share/man/man1/vhdfs.1")))
	if !strings.Contains(man, `.TH "VHDFS" "1"`) {
		t.Errorf("vhdfs.1 is no man page of vhdfs: %.200q", man)
	}
	for _, cmd := range []string{"mount", "umount", "merge"} {
		if _, err := os.Stat(filepath.Join(root, "share/man/man1/vhdfs-"+cmd+".1")); err != nil {
			t.Errorf("man page of %s: %v", cmd, err)
		}
	}
	for path, want := range map[string]string{
		"share/bash-completion/completions/vhdfs":    "__start_vhdfs",
		"share/zsh/site-functions/_vhdfs":            "#compdef vhdfs",
		"share/fish/vendor_completions.d/vhdfs.fish": "complete -c vhdfs",
	} {
		if b := fileBytes(t, filepath.Join(root, path)); !bytes.Contains(b, []byte(want)) {
			t.Errorf("%s (%d bytes) has no %q", path, len(b), want)
		}
	}

	mustRun(t, "make", "-C", moduleRoot, "--no-print-directory", "uninstall", "DESTDIR="+dest, "PREFIX=/usr/local")
	filepath.WalkDir(dest, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Error(err)
		} else if !d.IsDir() {
			t.Errorf("make uninstall left %s", p)
		}
		return nil
	})

	requireTool(t, "dpkg-deb")
	dist := t.TempDir()
	out = mustRun(t, "make", "-C", moduleRoot, "--no-print-directory", "deb", "DISTDIR="+dist)
	debs, _ := filepath.Glob(filepath.Join(dist, "*.deb"))
	if len(debs) != 1 {
		t.Fatalf("make deb made %v in %s:\n%s", debs, dist, out)
	}
	if !strings.Contains(out, debs[0]) {
		t.Errorf("make deb does not name %s:\n%s", debs[0], out)
	}
	list := mustRun(t, "dpkg-deb", "-c", debs[0])
	for _, want := range []string{
		"./usr/bin/vhdfs", "./usr/share/man/man1/vhdfs.1.gz", "./usr/share/man/man1/vhdfs-mount.1.gz",
		"./usr/share/bash-completion/completions/vhdfs", "./usr/share/zsh/site-functions/_vhdfs",
		"./usr/share/fish/vendor_completions.d/vhdfs.fish",
	} {
		if !regexp.MustCompile(`(?m) ` + regexp.QuoteMeta(want) + `$`).MatchString(list) {
			t.Errorf("the package has no %s:\n%s", want, list)
		}
	}
	if strings.Contains(list, "/usr/local") {
		t.Errorf("the package installs under /usr/local:\n%s", list)
	}
	if dep := mustRun(t, "dpkg-deb", "-f", debs[0], "Depends"); !regexp.MustCompile(`(^|, )fuse3(,|$)`).MatchString(strings.TrimSpace(dep)) {
		t.Errorf("Depends: %q has no fuse3", dep)
	}
	version := strings.TrimSpace(mustRun(t, "dpkg-deb", "-f", debs[0], "Version"))
	mustRun(t, "dpkg", "--validate-version", version)
	assertNamesHead(t, "the package's Version", version)
	if entries, _ := os.ReadDir(dist); len(entries) != 1 {
		t.Errorf("make deb left more than the package in %s: %v", dist, entries)
	}
}

// TestMakeInstallGitRefuses: make install after make, with git refusing the repository
// (as it refuses root one another user owns, under su or doas: "dubious ownership"),
// only copies: it builds nothing (GO=false would fail), leaves bin/.version and
// bin/vhdfs as make made them, and installs the binary naming HEAD, not dev.
func TestMakeInstallGitRefuses(t *testing.T) {
	makeAll(t)
	fake := t.TempDir()
	if err := os.WriteFile(filepath.Join(fake, "git"), []byte("#!/bin/sh\necho \"fatal: detected dubious ownership in repository\" >&2\nexit 128\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	version := fileBytes(t, filepath.Join(moduleRoot, "bin/.version"))
	before, err := os.Stat(filepath.Join(moduleRoot, "bin/vhdfs"))
	if err != nil {
		t.Fatal(err)
	}
	dest := t.TempDir()
	mustRun(t, "env", "PATH="+fake+":"+os.Getenv("PATH"), "make", "-C", moduleRoot, "--no-print-directory",
		"install", "GO=false", "DESTDIR="+dest, "PREFIX=/usr/local")
	if b := fileBytes(t, filepath.Join(moduleRoot, "bin/.version")); !bytes.Equal(b, version) {
		t.Errorf("make install rewrote bin/.version: %q, was %q", b, version)
	}
	if after, err := os.Stat(filepath.Join(moduleRoot, "bin/vhdfs")); err != nil || !after.ModTime().Equal(before.ModTime()) {
		t.Errorf("make install rebuilt bin/vhdfs (%v)", err)
	}
	out := strings.TrimSpace(mustRun(t, filepath.Join(dest, "usr/local/bin/vhdfs"), "--version"))
	if strings.Contains(out, "dev") {
		t.Errorf("installed vhdfs --version = %q", out)
	}
	assertNamesHead(t, "installed vhdfs --version", out)
}

// TestVersionPlainBuild: a go build without -ldflags (VCS stamping on, as it is by
// default) prints the revision it was built from, not dev. The go command records no
// revision in a git worktree (.git is a file there), so the build runs in a clone of
// HEAD with the working tree's changes laid over it.
func TestVersionPlainBuild(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	head := git(t, "rev-parse", "HEAD")
	mustRun(t, "git", "clone", "-q", "--shared", "--no-checkout", moduleRoot, src)
	mustRun(t, "git", "-C", src, "checkout", "-q", "--detach", head)
	changed := strings.Split(strings.TrimRight(mustRun(t, "git", "-C", moduleRoot, "ls-files", "-z", "--modified", "--deleted", "--others", "--exclude-standard"), "\x00"), "\x00")
	dirty := false
	for _, p := range changed {
		if p == "" {
			continue
		}
		dirty = true
		b, err := os.ReadFile(filepath.Join(moduleRoot, p))
		if err != nil {
			os.Remove(filepath.Join(src, p)) // deleted in the working tree
			continue
		}
		os.MkdirAll(filepath.Dir(filepath.Join(src, p)), 0o755)
		if err := os.WriteFile(filepath.Join(src, p), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(t.TempDir(), "vhdfs")
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool(), "build", "-o", bin, "./cmd/vhdfs")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "GOFLAGS=-buildvcs=true")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v: %s", err, out)
	}
	want := "vhdfs " + head[:12]
	if dirty {
		want += "-dirty"
	}
	if out := strings.TrimSpace(mustRun(t, bin, "--version")); out != want {
		t.Errorf("go build's vhdfs --version = %q, want %q", out, want)
	}
	assertNamesHead(t, "go build's vhdfs --version", strings.TrimSpace(mustRun(t, bin, "version")))
}

// demoLeftNothing fails the test if a mount or a loop device of the demo's folder is
// left; it removes the folder.
func demoLeftNothing(t *testing.T, dir string) {
	t.Helper()
	if mountedAt(t, filepath.Join(dir, "mnt")) {
		t.Errorf("the demo left %s/mnt mounted", dir)
	}
	if loops := mustRun(t, "losetup", "-a"); strings.Contains(loops, dir) {
		t.Errorf("the demo left loop devices:\n%s", loops)
	}
	// A lazily unmounted mount is in no mount table, and a loop device on it shows
	// its file as /disk.raw: the mount process shows what is left.
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, []byte(dir)) {
			t.Errorf("the demo left a process: %s: %s", filepath.Dir(p), bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
		}
	}
}

// cleanDemo detaches what the demo left of dir (after its checks), unmounts and removes it.
func cleanDemo(t *testing.T, dir string) {
	mnt := filepath.Join(dir, "mnt")
	out, _ := exec.Command("losetup", "-n", "-O", "NAME", "-j", filepath.Join(mnt, "disk.raw")).Output()
	for _, dev := range strings.Fields(string(out)) {
		exec.Command("losetup", "-d", dev).Run()
	}
	if mountedAt(t, mnt) {
		exec.Command("fusermount3", "-u", "-z", mnt).Run()
	}
	os.RemoveAll(dir)
}

var demoDirRE = regexp.MustCompile(`demo files left in (/tmp/vhdfs-demo\.\w+)`)

// TestDemoNotInteractive: make demo with stdin not a terminal says it is not
// interactive, unmounts, and ends with 0, leaving no mount and no loop device.
func TestDemoNotInteractive(t *testing.T) {
	makeAll(t)
	requireTool(t, "losetup")
	out, errs, code := run(t, "make", "-C", moduleRoot, "--no-print-directory", "demo")
	m := demoDirRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("make demo names no folder; exit %d\nstdout: %s\nstderr: %s", code, out, errs)
	}
	t.Cleanup(func() { cleanDemo(t, m[1]) })
	if code != 0 {
		t.Errorf("make demo: exit %d; stderr: %s", code, errs)
	}
	if !regexp.MustCompile(`(?m)^not interactive \((stdin is not a terminal|CI is set)\): not waiting; unmounting `).MatchString(out) {
		t.Errorf("make demo without a terminal does not say it is not interactive:\n%s", out)
	}
	if strings.Contains(out, "Press Ctrl-C") {
		t.Errorf("make demo without a terminal asks for Ctrl-C:\n%s", out)
	}
	demoLeftNothing(t, m[1])
}

// ptyOutput collects what a program writes to a pseudo-terminal and lets a test wait
// for a text in it.
type ptyOutput struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{} // closed and replaced at each read
}

func (p *ptyOutput) copyFrom(f *os.File) {
	b := make([]byte, 4096)
	for {
		n, err := f.Read(b)
		p.mu.Lock()
		p.buf.Write(b[:n])
		close(p.changed)
		p.changed = make(chan struct{})
		p.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// waitFor returns the output once it matches re, or fails the test after d.
func (p *ptyOutput) waitFor(t *testing.T, re *regexp.Regexp, d time.Duration) []string {
	t.Helper()
	timeout := time.After(d)
	for {
		p.mu.Lock()
		m := re.FindStringSubmatch(p.buf.String())
		out, ch := p.buf.String(), p.changed
		p.mu.Unlock()
		if m != nil {
			return m
		}
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("no %q within %v in the output:\n%s", re, d, out)
		}
	}
}

// TestDemoCtrlCDetachesLoop: make demo in a terminal waits; a loop device attached
// from its mount, as it suggests, is detached when Ctrl-C ends it, and the mount goes.
func TestDemoCtrlCDetachesLoop(t *testing.T) {
	makeAll(t)
	requireTool(t, "losetup")
	ptm, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ptm.Close()
	if err := unix.IoctlSetPointerInt(int(ptm.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(ptm.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	pts, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("scripts/demo.sh")
	cmd.Dir = moduleRoot
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "CI=") {
			cmd.Env = append(cmd.Env, e)
		}
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = pts, pts, pts
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pts.Close()
	out := &ptyOutput{changed: make(chan struct{})}
	go out.copyFrom(ptm)
	exited := make(chan struct{}) // closed when the demo has ended, with waitErr set
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				t.Errorf("the demo (pid %d) did not end within 10s of SIGKILL", cmd.Process.Pid)
			}
		}
	})

	m := out.waitFor(t, regexp.MustCompile(`mounted at (/tmp/vhdfs-demo\.\w+)/mnt:`), cmdTimeout)
	dir := m[1]
	t.Cleanup(func() { cleanDemo(t, dir) })
	out.waitFor(t, regexp.MustCompile(`Press Ctrl-C`), cmdTimeout)
	dev := strings.TrimSpace(mustRun(t, "losetup", "--find", "--show", "--read-only", filepath.Join(dir, "mnt/disk.raw")))
	backing := filepath.Join("/sys/block", filepath.Base(dev), "loop/backing_file")
	t.Cleanup(func() {
		if b, err := os.ReadFile(backing); err == nil && strings.HasSuffix(strings.TrimSpace(string(b)), "/disk.raw") {
			exec.Command("losetup", "-d", dev).Run()
		}
	})

	if _, err := ptm.Write([]byte{3}); err != nil { // Ctrl-C, through the terminal
		t.Fatal(err)
	}
	select {
	case <-exited:
		if waitErr != nil {
			t.Errorf("demo after Ctrl-C: %v", waitErr)
		}
	case <-time.After(cmdTimeout):
		t.Fatalf("the demo did not end within %v of Ctrl-C", cmdTimeout)
	}
	// The last line: the rest of the output has been read by then.
	out.waitFor(t, regexp.MustCompile(`demo files left in `), 10*time.Second)
	if !strings.Contains(out.String(), "detached "+dev+" ") {
		t.Errorf("the demo does not say it detached %s:\n%s", dev, out.String())
	}
	if b, err := os.ReadFile(backing); err == nil {
		t.Errorf("%s is still attached, to %s", dev, bytes.TrimSpace(b))
	}
	demoLeftNothing(t, dir)
}

func (p *ptyOutput) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.buf.String()
}

// TestVersionDebian: make deb's version (scripts/deb.sh) is a valid Debian version
// that only a tag makes a release: a tag alone is its version, commits after it sort
// after it, and a build of no tag is 0~gitN.HASH, below any release, even when its
// hash starts with a digit (git describe --always gives the hash alone there, which
// once became the version). First the version function on git describe's outputs,
// then the script in a repository of its own, untagged and tagged.
func TestVersionDebian(t *testing.T) {
	requireTool(t, "dpkg")
	script := filepath.Join(moduleRoot, "scripts/deb.sh")
	for _, c := range []struct{ describe, count, want string }{
		{"v1.2-0-gabc1234", "10", "1.2"},
		{"v1.2-3-gabc1234", "13", "1.2+3.gabc1234"},
		{"v1.2-3-gabc1234-dirty", "13", "1.2+3.gabc1234.dirty"},
		{"v1.2-0-gabc1234-dirty", "10", "1.2+0.gabc1234.dirty"},
		{"1234abc", "5", "0~git5.1234abc"},
		{"1234abc-dirty", "5", "0~git5.1234abc.dirty"},
		{"abc1234", "6", "0~git6.abc1234"},
	} {
		got := strings.TrimSpace(mustRun(t, script, "--debian-version", c.describe, c.count))
		if got != c.want {
			t.Errorf("version of git describe %s (%s commits) = %q, want %q", c.describe, c.count, got, c.want)
			continue
		}
		mustRun(t, "dpkg", "--validate-version", got)
	}
	// Each sorts after the one before it.
	order := []string{"0~git5.1234abc", "0~git5.1234abc.dirty", "0~git6.abc1234", "1.2", "1.2+0.gabc1234.dirty", "1.2+3.gabc1234", "1.2+3.gabc1234.dirty", "1.3"}
	for i := 1; i < len(order); i++ {
		if err := exec.Command("dpkg", "--compare-versions", order[i-1], "lt", order[i]).Run(); err != nil {
			t.Errorf("dpkg: %s does not sort before %s: %v", order[i-1], order[i], err)
		}
	}

	// The script in a repository of its own whose HEAD's hash starts with a digit.
	requireTool(t, "dpkg-deb")
	repo := t.TempDir()
	g := func(args ...string) string {
		t.Helper()
		return strings.TrimSpace(mustRun(t, "git", append([]string{"-C", repo, "-c", "user.name=t", "-c", "user.email=t@example.com"}, args...)...))
	}
	g("init", "-q")
	os.MkdirAll(filepath.Join(repo, "scripts"), 0o755)
	if err := os.WriteFile(filepath.Join(repo, "scripts/deb.sh"), fileBytes(t, script), 0o755); err != nil {
		t.Fatal(err)
	}
	g("add", "scripts/deb.sh")
	g("commit", "-q", "-m", "deb.sh")
	for i := 0; i < 200 && !strings.ContainsAny(g("rev-parse", "--short", "HEAD")[:1], "0123456789"); i++ {
		g("commit", "-q", "--allow-empty", "-m", fmt.Sprint(i))
	}
	deb := func() string {
		t.Helper()
		root, out := t.TempDir(), t.TempDir()
		os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755)
		os.MkdirAll(filepath.Join(root, "usr/share/man/man1"), 0o755)
		os.WriteFile(filepath.Join(root, "usr/bin/vhdfs"), []byte("#!/bin/sh\n"), 0o755)
		os.WriteFile(filepath.Join(root, "usr/share/man/man1/vhdfs.1"), []byte(".TH VHDFS 1\n"), 0o644)
		p := strings.TrimSpace(mustRun(t, filepath.Join(repo, "scripts/deb.sh"), root, out, "dev"))
		v := strings.TrimSpace(mustRun(t, "dpkg-deb", "-f", p, "Version"))
		mustRun(t, "dpkg", "--validate-version", v)
		return v
	}
	short, count := g("rev-parse", "--short", "HEAD"), g("rev-list", "--count", "HEAD")
	if v, want := deb(), "0~git"+count+"."+short; v != want {
		t.Errorf("untagged HEAD %s: version %q, want %q", short, v, want)
	}
	g("tag", "v1.2")
	if v := deb(); v != "1.2" {
		t.Errorf("HEAD tagged v1.2: version %q, want 1.2", v)
	}
	g("commit", "-q", "--allow-empty", "-m", "after")
	if v, want := deb(), "1.2+1.g"+g("rev-parse", "--short", "HEAD"); v != want {
		t.Errorf("a commit after v1.2: version %q, want %q", v, want)
	}
	os.WriteFile(filepath.Join(repo, "scripts/deb.sh"), append(fileBytes(t, script), "\n"...), 0o755)
	if v, want := deb(), "1.2+1.g"+g("rev-parse", "--short", "HEAD")+".dirty"; v != want {
		t.Errorf("a changed working tree after v1.2: version %q, want %q", v, want)
	}
}
