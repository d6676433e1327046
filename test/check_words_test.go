package test

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// TestCheckSeverities: check prints errors (on stderr, exit 3) and warnings (exit 0)
// but keeps the notes — how the tool that made an image writes it — for -v; --json
// has every finding with its severity. The images of other tools are untouched:
// qemu-img's VHDX files, and a differencing VHD with a full path as its parent name,
// as Windows writes it.
func TestCheckSeverities(t *testing.T) {
	requireTool(t, "qemu-img")
	dir := t.TempDir()
	qemuVHDX := filepath.Join(dir, "qemu.vhdx")
	mustRun(t, "qemu-img", "create", "-q", "-f", "vhdx", qemuVHDX, "64M")
	qemuFixed := filepath.Join(dir, "qemu-fixed.vhdx")
	mustRun(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=fixed", qemuFixed, "8M")
	windows := filepath.Join(dir, "windows", "child.vhd")
	makePair(t, filepath.Join(dir, "windows", "base.vhd"), windows)
	patchParentName(t, windows, `C:\Hyper-V\Virtual Hard Disks\base.vhd`)
	saved := filepath.Join(dir, "saved.vhd")
	mustVhdfs(t, "create", "--size", "8M", saved)
	patchFooters(t, saved, 84, []byte{1}, false) // Saved State
	damaged := filepath.Join(dir, "damaged", "child.vhd")
	makePair(t, filepath.Join(dir, "damaged", "base.vhd"), damaged)
	patchAt(t, damaged, footerTimeOff, []byte{7, 7, 7, 7}) // the copy at 0, its checksum left

	for _, tc := range []struct {
		name, image string
		code        int
		shown       []string // by default (errors on stderr, warnings on stdout)
		notes       []string // only with -v
	}{
		{"qemu-img's VHDX", qemuVHDX, 0, nil, []string{"note: region 0 (the BAT) is not marked required, as qemu writes it"}},
		{"qemu-img's fixed VHDX", qemuFixed, 0, nil, []string{"note: fixed image has 1 blocks not fully allocated"}},
		{"a full path as the parent name, as Windows writes it", windows, 0, nil, []string{`note: the parent name "C:\Hyper-V\Virtual Hard Disks\base.vhd" is a full path, as Windows writes it`}},
		{"a warning", saved, 0, []string{"warning: footer saved state is set"}, nil},
		{"an error", damaged, 3, []string{"error: footer copy at offset 0"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stdout, stderr, code := vhdfs(t, "check", tc.image)
			out := stdout + stderr
			lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
			want := len(tc.shown)
			if tc.code == 0 {
				want++ // the summary
				if !strings.HasSuffix(stdout, tc.image+": chain is consistent\n") {
					t.Errorf("no summary: %q", stdout)
				}
			}
			if code != tc.code || len(lines) != want {
				t.Errorf("check: exit %d, %d lines; want exit %d, %d lines:\n%s", code, len(lines), tc.code, want, out)
			}
			for _, w := range tc.shown {
				if !strings.Contains(out, w) {
					t.Errorf("check does not say %q:\n%s", w, out)
				}
			}
			if strings.Contains(out, "note:") {
				t.Errorf("check shows notes without -v:\n%s", out)
			}

			stdout, stderr, code = vhdfs(t, "check", "-v", tc.image)
			if code != tc.code {
				t.Errorf("check -v: exit %d, want %d", code, tc.code)
			}
			for _, w := range append(tc.shown, tc.notes...) {
				if !strings.Contains(stdout+stderr, w) {
					t.Errorf("check -v does not say %q:\n%s%s", w, stdout, stderr)
				}
			}

			stdout, _, code = vhdfs(t, "check", "--json", tc.image)
			var r struct {
				Problems []struct{ Severity, Message string } `json:"problems"`
			}
			if err := json.Unmarshal([]byte(stdout), &r); err != nil || code != tc.code {
				t.Fatalf("check --json: exit %d, %v\n%s", code, err, stdout)
			}
			for _, w := range append(tc.shown, tc.notes...) {
				sev, msg, _ := strings.Cut(w, ": ")
				found := false
				for _, p := range r.Problems {
					found = found || p.Severity == sev && strings.Contains(p.Message, msg)
				}
				if !found {
					t.Errorf("check --json has no %s %q: %+v", sev, msg, r.Problems)
				}
			}
		})
	}
}
