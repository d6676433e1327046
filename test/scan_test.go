package test

import (
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type scanJSON struct {
	Images []struct {
		Path            string   `json:"path"`
		Format          string   `json:"format"`
		Type            string   `json:"type"`
		ID              string   `json:"id"`
		ParentID        string   `json:"parent_id"`
		State           string   `json:"state"`
		Parent          string   `json:"parent"`
		ParentCurrentID string   `json:"parent_current_id"`
		Chain           []string `json:"chain"`
		Siblings        []string `json:"siblings"`
	} `json:"images"`
	Skipped []struct {
		Path string `json:"path"`
	} `json:"skipped"`
}

// TestScan: a directory with two chains (one VHD, one VHDX with two children of its
// base), an image merged away (stale), an orphan, a file that is no image, a mounted
// chain and a qemu-io writer holding an image open: each is named by its state.
func TestScan(t *testing.T) {
	requireTool(t, "qemu-io")
	dir := t.TempDir()
	// Chain A: a-base <- a-mid <- a-top; merging two levels leaves a-mid behind,
	// recording a-base's old ID.
	aBase := createBase(t, dir, "vhd", 0, "a-base", "--size", "16M")
	aMid := filepath.Join(dir, "a-mid.vhd")
	mustVhdfs(t, "create", "--parent", aBase, aMid)
	aTop := filepath.Join(dir, "a-top.vhd")
	mustVhdfs(t, "create", "--parent", aMid, aTop)
	mustVhdfs(t, "merge", "--depth", "2", aTop)
	// Chain B (VHDX): two children of one base.
	bBase := createBase(t, dir, "vhdx", 0, "b-base", "--size", "16M")
	bS1 := filepath.Join(dir, "b-s1.avhdx")
	bS2 := filepath.Join(dir, "b-s2.avhdx")
	mustVhdfs(t, "create", "--parent", bBase, "--format", "vhdx", bS1)
	mustVhdfs(t, "create", "--parent", bBase, "--format", "vhdx", bS2)
	// An orphan: its parent deleted.
	gone := createBase(t, dir, "vhd", 0, "gone", "--size", "16M")
	orphan := filepath.Join(dir, "orphan.vhd")
	mustVhdfs(t, "create", "--parent", gone, orphan)
	os.Remove(gone)
	// A standalone image a qemu-io writer holds open, and a file that is no image.
	lone := createBase(t, dir, "vhd", 0, "lone", "--size", "16M")
	if err := os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("not an image\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	// Held while scanning: a read-write mount of b-s1, and qemu-io with lone.vhd
	// open for writing (it takes qemu's write lock).
	mountEnv(t, bS1, nil)
	qio := exec.Command("qemu-io", "-f", "vpc", lone)
	stdin, err := qio.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	qout, err := qio.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := qio.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qio.Process.Kill(); qio.Wait() })
	// qemu-io has the image open once it answers a command.
	io.WriteString(stdin, "help\n")
	buf := make([]byte, 256)
	if _, err := qout.Read(buf); err != nil {
		t.Fatal(err)
	}

	var got scanJSON
	out := mustVhdfs(t, "scan", "--json", dir)
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("scan --json: %v\n%s", err, out)
	}
	want := map[string]struct {
		state  string
		chain  []string
		parent string
		sibs   []string
	}{
		aBase:  {"ok", []string{aBase}, "", nil},
		aTop:   {"ok", []string{aTop, aBase}, aBase, nil},
		aMid:   {"stale", []string{aMid}, aBase, nil},
		bBase:  {"ok", []string{bBase}, "", nil},
		bS1:    {"ok", []string{bS1, bBase}, bBase, []string{bS2}},
		bS2:    {"ok", []string{bS2, bBase}, bBase, []string{bS1}},
		orphan: {"orphan", []string{orphan}, "", nil},
		lone:   {"ok", []string{lone}, "", nil},
	}
	if len(got.Images) != len(want) {
		t.Errorf("scan found %d images, want %d:\n%s", len(got.Images), len(want), out)
	}
	for _, im := range got.Images {
		w, ok := want[im.Path]
		if !ok {
			t.Errorf("unexpected image %s", im.Path)
			continue
		}
		if im.State != w.state || strings.Join(im.Chain, " ") != strings.Join(w.chain, " ") || im.Parent != w.parent || strings.Join(im.Siblings, " ") != strings.Join(w.sibs, " ") {
			t.Errorf("%s: state %s chain %v parent %q siblings %v; want %s %v %q %v", im.Path, im.State, im.Chain, im.Parent, im.Siblings, w.state, w.chain, w.parent, w.sibs)
		}
		if im.Path == aMid && (im.ParentCurrentID == "" || im.ParentCurrentID == im.ParentID) {
			t.Errorf("stale %s: parent id %s, parent's current id %s", im.Path, im.ParentID, im.ParentCurrentID)
		}
		if im.Format == "" || im.Type == "" || im.ID == "" {
			t.Errorf("%s: format %q type %q id %q", im.Path, im.Format, im.Type, im.ID)
		}
	}
	if len(got.Skipped) != 1 || filepath.Base(got.Skipped[0].Path) != "notes.txt" {
		t.Errorf("skipped %+v, want notes.txt", got.Skipped)
	}

	text, stderr, code := vhdfs(t, "scan", dir)
	if code != 0 {
		t.Fatalf("scan: exit %d: %s", code, stderr)
	}
	for _, line := range []string{
		"ok      " + aTop + " -> " + aBase + "\n",
		"stale   " + aMid + " -x " + aBase,
		"orphan  " + orphan + " -> ?",
		"ok      " + bS1 + " -> " + bBase + "  [siblings: " + bS2 + "]\n",
		"ok      " + lone + "\n",
	} {
		if !strings.Contains(text, line) {
			t.Errorf("scan text lacks %q:\n%s", line, text)
		}
	}
	if !strings.Contains(stderr, "notes.txt") {
		t.Errorf("scan stderr does not name the skipped file: %q", stderr)
	}

	// The writer was not held off: it still writes, and quits.
	io.WriteString(stdin, "write 0 512\nquit\n")
	stdin.Close()
	rest, _ := io.ReadAll(qout)
	done := make(chan error, 1)
	go func() { done <- qio.Wait() }()
	select {
	case err := <-done:
		if err != nil || !strings.Contains(string(rest), "wrote 512/512 bytes") {
			t.Errorf("qemu-io: %v: %s", err, rest)
		}
	case <-time.After(10 * time.Second):
		t.Errorf("qemu-io did not finish: %s", rest)
	}
}
