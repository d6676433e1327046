package main

import "runtime/debug"

// Version is set at build time with -ldflags "-X main.Version=…" (make build does, from
// git describe). A binary built without it, by a plain go build or go install, takes its
// version from what the Go toolchain recorded in it: see version.
var Version = "dev"

// version is the version vhdfs reports: Version when the build set it, else the
// revision go build stamped (vcs.revision, "-dirty" for uncommitted changes), else the
// module version go install records (v1.2.3, or a pseudo-version naming the commit),
// else "dev". A go build in a git worktree, whose .git is a file, records no revision
// (the go command looks for a .git directory).
func version() string {
	if Version != "dev" {
		return Version
	}
	bi, _ := debug.ReadBuildInfo()
	return versionFrom(bi)
}

// versionFrom is version's reading of the build information.
func versionFrom(bi *debug.BuildInfo) string {
	if bi == nil {
		return "dev"
	}
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value
		}
	}
	if rev != "" {
		if len(rev) > 12 {
			rev = rev[:12]
		}
		if modified == "true" {
			rev += "-dirty"
		}
		return rev
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	return "dev"
}
