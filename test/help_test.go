package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// commandNames are the commands the README's Commands block lists.
var commandNames = []string{"mount", "umount", "info", "create", "merge", "check", "export", "version", "help", "completion"}

// TestCommandHelp: `vhdfs CMD --help` and `-h` print that command's usage on stdout
// and exit 0, with one described line per flag.
func TestCommandHelp(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		cmd   string
		flags []string
	}{
		{"mount", []string{"--read-only", "--foreground", "--allow-other", "--debug", "--nonempty", "--uid", "--gid", "--umask", "--fsname"}},
		{"umount", []string{"--abort"}},
		{"info", []string{"--json", "--force-share"}},
		{"create", []string{"--size", "--type", "--block-size", "--exact-size", "--parent", "--json", "--quiet"}},
		{"merge", []string{"--depth", "--from"}},
		{"check", []string{"--repair", "--force-share"}},
		{"export", []string{"--force-share"}},
	} {
		for _, h := range []string{"--help", "-h"} {
			t.Run(tc.cmd+" "+h, func(t *testing.T) {
				stdout, stderr, code := vhdfs(t, tc.cmd, h)
				if code != 0 || stderr != "" {
					t.Fatalf("exit %d, stderr %q", code, stderr)
				}
				if !strings.Contains(stdout, "vhdfs "+tc.cmd) {
					t.Errorf("stdout does not show the usage of %s:\n%s", tc.cmd, stdout)
				}
				for _, f := range tc.flags {
					line := flagLine(stdout, f)
					if line == "" {
						t.Errorf("no line for %s:\n%s", f, stdout)
						continue
					}
					// The description follows the flag (and its value name) after two spaces.
					if !regexp.MustCompile(regexp.QuoteMeta(f) + `(\[=[^\]]*\]|\s\w+)?\s{2,}\S`).MatchString(line) {
						t.Errorf("%s has no description: %q", f, line)
					}
				}
			})
		}
	}
}

// flagLine returns the help line that starts with flag (after an optional shorthand).
func flagLine(help, flag string) string {
	re := regexp.MustCompile(`^\s*(-\w, )?` + regexp.QuoteMeta(flag) + `\b`)
	for _, l := range strings.Split(help, "\n") {
		if re.MatchString(l) {
			return l
		}
	}
	return ""
}

// TestHelpCommand: `vhdfs help` says it is for VHD and VHDX and lists every command
// on stdout; `vhdfs help CMD` is `vhdfs CMD --help`; `vhdfs help nosuch` is a usage
// error.
func TestHelpCommand(t *testing.T) {
	t.Parallel()
	stdout, stderr, code := vhdfs(t, "help")
	if code != 0 || stderr != "" {
		t.Fatalf("help: exit %d, stderr %q", code, stderr)
	}
	if first, _, _ := strings.Cut(stdout, "\n"); !strings.Contains(first, "VHD and VHDX") {
		t.Errorf("help does not start by saying it is for VHD and VHDX:\n%s", stdout)
	}
	for _, c := range commandNames {
		if !regexp.MustCompile(`(?m)^\s+` + c + `\b`).MatchString(stdout) {
			t.Errorf("help does not list %s:\n%s", c, stdout)
		}
	}
	help, _, _ := vhdfs(t, "merge", "--help")
	if stdout, stderr, code := vhdfs(t, "help", "merge"); code != 0 || stderr != "" || stdout != help {
		t.Errorf("help merge: exit %d, stderr %q, stdout %q; want %q", code, stderr, stdout, help)
	}
	if stdout, stderr, code := vhdfs(t, "--help"); code != 0 || stderr != "" || !strings.HasPrefix(stdout, "vhdfs works with VHD and VHDX") {
		t.Errorf("--help: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	if _, stderr, code := vhdfs(t, "help", "mout"); code != 2 || !strings.Contains(stderr, `did you mean "mount"?`) {
		t.Errorf("help mout: exit %d, stderr %q", code, stderr)
	}
}

// TestVersionFlag: --version is the version command.
func TestVersionFlag(t *testing.T) {
	t.Parallel()
	stdout, stderr, code := vhdfs(t, "--version")
	if code != 0 || stderr != "" || stdout != "vhdfs "+testVersion+"\n" {
		t.Errorf("--version: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

// TestTypoSuggestion: a mistyped command names the nearest one.
func TestTypoSuggestion(t *testing.T) {
	t.Parallel()
	for typed, want := range map[string]string{"mout": "mount", "umonut": "umount", "crate": "create", "exprot": "export", "chek": "check"} {
		_, stderr, code := vhdfs(t, typed, "x")
		line := `vhdfs: unknown command "` + typed + `"; did you mean "` + want + `"?`
		if code != 2 || !strings.HasPrefix(stderr, line+"\n") {
			t.Errorf("%s: exit %d, stderr %q; want %q", typed, code, stderr, line)
		}
	}
	if _, stderr, code := vhdfs(t, "frobnicate"); code != 2 || strings.Contains(stderr, "did you mean") {
		t.Errorf("frobnicate: exit %d, stderr %q; want no suggestion", code, stderr)
	}
}

// TestCompletion: `vhdfs completion bash|zsh` prints a script that bash and zsh
// accept, and the script's back end completes commands and flags.
func TestCompletion(t *testing.T) {
	t.Parallel()
	for _, sh := range []string{"bash", "zsh"} {
		stdout, stderr, code := vhdfs(t, "completion", sh)
		if code != 0 || stderr != "" || !strings.Contains(stdout, "vhdfs") {
			t.Errorf("completion %s: exit %d, stderr %q, %d bytes", sh, code, stderr, len(stdout))
			continue
		}
		if _, err := exec.LookPath(sh); err != nil {
			continue
		}
		script := filepath.Join(t.TempDir(), "c."+sh)
		if err := os.WriteFile(script, []byte(stdout), 0o644); err != nil {
			t.Fatal(err)
		}
		mustRun(t, sh, "-n", script)
	}
	out := mustVhdfs(t, "__complete", "mo")
	if !strings.Contains(out, "mount") {
		t.Errorf("completing mo: %q", out)
	}
	out = mustVhdfs(t, "__complete", "mount", "--re")
	if !strings.Contains(out, "--read-only") {
		t.Errorf("completing mount --re: %q", out)
	}
	out = mustVhdfs(t, "__complete", "create", "--type", "")
	if !strings.Contains(out, "dynamic\nfixed\n") {
		t.Errorf("completing create --type: %q", out)
	}
	if _, stderr, code := vhdfs(t, "completion", "tcsh"); code != 2 {
		t.Errorf("completion tcsh: exit %d, stderr %q", code, stderr)
	}
}
