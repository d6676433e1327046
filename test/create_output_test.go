package test

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestCreateOutput: create says what it made in one or two lines (path, format,
// virtual size in bytes and for people, type, block size, parent), notes a size
// rounded up to a CHS geometry, is quiet with -q, and with --json prints the layer
// entry info --json shows for the new image.
func TestCreateOutput(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.vhd")
	for _, tc := range []struct {
		name string
		args []string
		img  string
		want []string
		note bool // a second line on the rounding
	}{
		{"dynamic", []string{"--size", "1.5G", "--exact-size"}, base, []string{"vhd", "dynamic", "1.5 GiB", "(1610612736 bytes)", "2.0 MiB"}, false},
		{"rounded up", []string{"--size", "1"}, "one.vhd", []string{"dynamic"}, true},
		{"fixed", []string{"--size", "8M", "--type", "fixed", "--exact-size"}, "fixed.vhd", []string{"fixed", "8.0 MiB", "(8388608 bytes)"}, false},
		{"differencing", []string{"--parent", base}, "snap.vhd", []string{"differencing", "1.5 GiB", "parent", base}, false},
	} {
		img := tc.img
		if !filepath.IsAbs(img) {
			img = filepath.Join(dir, img)
		}
		out := mustVhdfs(t, append(append([]string{"create"}, tc.args...), img)...)
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		if wantLines := map[bool]int{false: 1, true: 2}[tc.note]; len(lines) != wantLines {
			t.Errorf("%s: %d lines, want %d:\n%s", tc.name, len(lines), wantLines, out)
		}
		for _, w := range append([]string{img}, tc.want...) {
			if !strings.Contains(lines[0], w) {
				t.Errorf("%s: %q does not say %q", tc.name, lines[0], w)
			}
		}
		if size := virtualSize(t, img); !strings.Contains(lines[0], fmt.Sprintf("(%d bytes)", size)) {
			t.Errorf("%s: %q does not give the size %d", tc.name, lines[0], size)
		}
		if tc.note && (len(lines) < 2 || !strings.Contains(lines[1], "1 byte was rounded up to 34.0 KiB (34816 bytes)") || !strings.Contains(lines[1], "--exact-size")) {
			t.Errorf("%s: no note on the rounding:\n%s", tc.name, out)
		}
	}
	if out := mustVhdfs(t, "create", "-q", "--size", "8M", filepath.Join(dir, "quiet.vhd")); out != "" {
		t.Errorf("create -q printed %q", out)
	}
	for _, args := range [][]string{{"--size", "64M"}, {"--parent", base}} {
		img := filepath.Join(dir, fmt.Sprintf("json%d.vhd", len(args[1])))
		out := mustVhdfs(t, append(append([]string{"create", "--json"}, args...), img)...)
		var got map[string]any
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("create --json: %v\n%s", err, out)
		}
		var info struct{ Layers []map[string]any }
		if err := json.Unmarshal([]byte(mustVhdfs(t, "info", "--json", img)), &info); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, info.Layers[0]) {
			t.Errorf("create --json %q:\n%v\ninfo --json's layer:\n%v", args, got, info.Layers[0])
		}
	}
}
