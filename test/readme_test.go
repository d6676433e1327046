package test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestReadmeCommands: the README's Commands block and the command definitions agree:
// every command it shows exists, `vhdfs CMD --help` lists every flag its line shows,
// and every command `vhdfs help` lists is in the block.
func TestReadmeCommands(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile(filepath.Join(moduleRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(readme), "\n## Commands\n\n```\n")
	block, _, ok2 := strings.Cut(after, "\n```\n")
	if !ok || !ok2 {
		t.Fatal("README has no ## Commands section opening with a code block")
	}
	flagRE := regexp.MustCompile(`(?:^|[\s\[|])(--?[a-zA-Z][a-zA-Z-]*)`)
	shown := map[string]bool{}
	for _, line := range strings.Split(block, "\n") {
		line, _, _ = strings.Cut(line, "#")
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "vhdfs" {
			continue
		}
		cmd := f[1]
		if cmd == strings.ToUpper(cmd) || strings.HasPrefix(cmd, "-") {
			cmd = "mount" // the mount helper's form, or vhdfs --version
			if f[1] == "--version" {
				cmd = "version"
			}
		}
		shown[cmd] = true
		help, stderr, code := vhdfs(t, cmd, "--help")
		if code != 0 {
			t.Errorf("%s --help: exit %d, stderr %q", cmd, code, stderr)
			continue
		}
		for _, m := range flagRE.FindAllStringSubmatch(strings.Join(f[2:], " "), -1) {
			flag := m[1]
			// A long flag starts its help line (after a shorthand); a shorthand precedes its long flag.
			re := regexp.MustCompile(`(?m)^\s+` + regexp.QuoteMeta(flag) + `, --`)
			if strings.HasPrefix(flag, "--") {
				re = regexp.MustCompile(`(?m)^\s+(-\w, )?` + regexp.QuoteMeta(flag) + `\b`)
			}
			if !re.MatchString(help) {
				t.Errorf("README shows %s for %s; %s --help does not list it:\n%s", flag, cmd, cmd, help)
			}
		}
	}
	help := mustVhdfs(t, "help")
	_, list, _ := strings.Cut(help, "Available Commands:\n")
	list, _, _ = strings.Cut(list, "\n\n")
	for _, l := range strings.Split(list, "\n") {
		if f := strings.Fields(l); len(f) > 0 && !shown[f[0]] {
			t.Errorf("vhdfs help lists %s; the README's Commands block does not", f[0])
		}
	}
	if !shown["mount"] {
		t.Error("the README's Commands block shows no mount")
	}
}
