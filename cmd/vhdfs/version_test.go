package main

import (
	"runtime/debug"
	"testing"
)

// TestVersionFrom: a binary built without -X main.Version names what go build or
// go install recorded: the revision first, then the module version.
func TestVersionFrom(t *testing.T) {
	rev := "f602f71c1e6a0b1c2d3e4f5a6b7c8d9e0f1a2b3c"
	settings := func(kv ...string) []debug.BuildSetting {
		var s []debug.BuildSetting
		for i := 0; i < len(kv); i += 2 {
			s = append(s, debug.BuildSetting{Key: kv[i], Value: kv[i+1]})
		}
		return s
	}
	for _, tc := range []struct {
		name string
		bi   *debug.BuildInfo
		want string
	}{
		{"no build info", nil, "dev"},
		{"go build, clean", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: settings("vcs", "git", "vcs.revision", rev, "vcs.modified", "false")}, "f602f71c1e6a"},
		{"go build, changed", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: settings("vcs.revision", rev, "vcs.modified", "true")}, "f602f71c1e6a-dirty"},
		{"go install module@version", &debug.BuildInfo{Main: debug.Module{Version: "v1.2.3"}}, "v1.2.3"},
		{"go build, no vcs", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: settings("-buildmode", "exe")}, "dev"},
	} {
		if got := versionFrom(tc.bi); got != tc.want {
			t.Errorf("%s: versionFrom = %q, want %q", tc.name, got, tc.want)
		}
	}
}
