package test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestParentByHand: a moved and renamed parent is given with --parent to info,
// export, check and mount (and a wrong one refused); relink then writes it into the
// child so the chain opens alone, and refuses a parent with another unique ID.
func TestParentByHand(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.vhd"), filepath.Join(dir, "top.vhd")
	model := makePair(t, base, top)
	before := exportImage(t, top)
	assertFileEquals(t, before, model)

	moved := filepath.Join(dir, "elsewhere", "renamed.vhd")
	if err := os.MkdirAll(filepath.Dir(moved), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(base, moved); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code := vhdfs(t, "info", top); code != 1 || !strings.Contains(stderr, "not found") {
		t.Fatalf("info of a child whose parent moved: exit %d, %s", code, stderr)
	}

	out := mustVhdfs(t, "info", "--parent", moved, top)
	if !strings.Contains(out, "chain of 2 image(s)") || !strings.Contains(out, moved) || !strings.Contains(out, "--parent") {
		t.Errorf("info --parent:\n%s", out)
	}
	var info infoJSON
	if err := json.Unmarshal([]byte(mustVhdfs(t, "info", "--json", "--parent", moved, top)), &info); err != nil {
		t.Fatal(err)
	}
	if len(info.Layers) != 2 || info.Layers[1].Path != moved {
		t.Errorf("info --json --parent: %+v", info.Layers)
	}
	got := filepath.Join(t.TempDir(), "after.raw")
	mustVhdfs(t, "export", "--parent", moved, top, got)
	assertFileEquals(t, got, model)
	mustVhdfs(t, "check", "--parent", moved, top)
	if _, stderr, code := vhdfs(t, "info", "--parent", moved, "--parent", moved, top); code == 0 || !strings.Contains(stderr, "--parent") {
		t.Errorf("two --parent for a chain of one parent: exit %d, %s", code, stderr)
	}

	// A wrong parent: same size, another unique ID.
	wrong := filepath.Join(dir, "elsewhere", "wrong.vhd")
	mustVhdfs(t, "create", "--size", "8M", "--block-size", "512K", wrong)
	for _, cmd := range [][]string{{"info"}, {"export"}, {"check"}} {
		args := append(cmd, "--parent", wrong, top)
		if cmd[0] == "export" {
			args = append(args, filepath.Join(t.TempDir(), "x.raw"))
		}
		_, stderr, code := vhdfs(t, args...)
		if code == 0 || !strings.Contains(stderr, "unique ID changed") {
			t.Errorf("%s --parent WRONG: exit %d, %s", cmd[0], code, stderr)
		}
	}

	mnt := mMountpoint(t)
	mMount(t, top, mnt, "--parent", moved)
	if b := fileBytes(t, filepath.Join(mnt, "disk.raw")); !bytes.Equal(b, model) {
		t.Errorf("mount --parent: disk.raw differs from the export before the move")
	}
	// Mounted read-write: relink needs the image for writing, and is refused.
	if _, stderr, code := vhdfs(t, "relink", top, moved); code != 1 || !strings.Contains(stderr, "lock") {
		t.Errorf("relink of a mounted image: exit %d, %s", code, stderr)
	}
	mUmount(t, mnt)
	// As mount.fuse3 runs it for an fstab line with -o parent=.
	mCleanupMount(t, mnt)
	mustVhdfs(t, top, mnt, "-o", "ro,nosuid,nodev,parent="+moved)
	if b := fileBytes(t, filepath.Join(mnt, "disk.raw")); !bytes.Equal(b, model) {
		t.Errorf("mount -o parent=: disk.raw differs from the export before the move")
	}
	mUmount(t, mnt)

	snap := snapshotFiles(t, top)
	_, stderr, code := vhdfs(t, "relink", top, wrong)
	if code != 1 || !strings.Contains(stderr, "unique ID") {
		t.Errorf("relink to a wrong parent: exit %d, %s", code, stderr)
	}
	assertUnchanged(t, snap)
	sum := sha256file(t, top)

	out = mustVhdfs(t, "relink", top, moved)
	if !strings.Contains(out, moved) && !strings.Contains(out, "renamed.vhd") {
		t.Errorf("relink says: %q", out)
	}
	if sha256file(t, top) == sum {
		t.Errorf("relink left %s unchanged", top)
	}
	info = vhdfsInfo(t, top)
	if len(info.Layers) != 2 || info.Layers[1].Path != moved {
		t.Errorf("info after relink: %+v", info.Layers)
	}
	assertFileEquals(t, exportImage(t, top), model)
	mustVhdfs(t, "check", top)
}

// TestInfoMissingParent: info of a child whose parent is missing or mismatched shows
// the child and what it looked for, exit 1, in text and in JSON.
func TestInfoMissingParent(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.vhd"), filepath.Join(dir, "top.vhd")
	makePair(t, base, top)
	id := vhdfsInfo(t, top).Layers[0].UniqueID
	if err := os.Rename(base, filepath.Join(dir, "gone.vhd")); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := vhdfs(t, "info", top)
	if code != 1 || !strings.Contains(stdout, top) || !strings.Contains(stdout, id) || !strings.Contains(stderr, base) {
		t.Errorf("info with the parent missing: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	stdout, _, code = vhdfs(t, "info", "--json", top)
	var got struct {
		Layers []struct {
			Path     string `json:"path"`
			UniqueID string `json:"unique_id"`
		} `json:"layers"`
		Error         string `json:"error"`
		MissingParent *struct {
			Child    string   `json:"child"`
			UniqueID string   `json:"unique_id"`
			Tried    []string `json:"tried"`
		} `json:"missing_parent"`
	}
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatalf("info --json with the parent missing: exit %d: %v\n%s", code, err, stdout)
	}
	if code != 1 || len(got.Layers) != 1 || got.Layers[0].UniqueID != id || got.Error == "" || got.MissingParent == nil ||
		got.MissingParent.Child != top || len(got.MissingParent.Tried) == 0 || got.MissingParent.Tried[0] != base {
		t.Errorf("info --json with the parent missing: exit %d\n%s", code, stdout)
	}

	// Mismatched: another image where the parent was.
	mustVhdfs(t, "create", "--size", "8M", base)
	stdout, stderr, code = vhdfs(t, "info", top)
	if code != 1 || !strings.Contains(stdout, id) || !strings.Contains(stderr, "unique ID changed") {
		t.Errorf("info with a mismatched parent: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
}
