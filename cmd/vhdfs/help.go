package main

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
	"github.com/spf13/pflag"
)

// Help, completion and man pages come from cobra, built from the same flag sets the
// commands parse: each command, run in describing mode, hands its flag set and the
// names of its arguments to parse, which records them and stops (errDescribed).
// The commands themselves still run through run and their own flag sets.

var (
	describing   *described
	errDescribed = errors.New("described")
)

type described struct {
	fs    *pflag.FlagSet
	names []string
}

// describe returns the flags and argument names of a command without running it.
func describe(name string) described {
	d := &described{}
	describing = d
	defer func() { describing = nil }()
	if err := commands[name](nil); !errors.Is(err, errDescribed) {
		return described{} // a command that does not parse its flags through parse
	}
	return *d
}

// commandOrder lists the commands as help shows them; a command missing here comes
// after them, in name order.
var commandOrder = []string{"mount", "umount", "info", "map", "scan", "create", "snapshot", "merge", "check", "export", "convert", "compact", "resize", "relink", "version"}

// notDescribed are the commands that are no vhdfs command of their own: cobra makes
// help and completion itself, and man, __complete and __control are hidden.
var notDescribed = []string{"help", "completion", "man", "__complete", "__completeNoDesc", "__control"}

// describedCommands are the commands help, completion and man pages show.
func describedCommands() []string {
	names := slices.Clone(commandOrder)
	var rest []string
	for n := range commands {
		if !slices.Contains(names, n) && !slices.Contains(notDescribed, n) {
			rest = append(rest, n)
		}
	}
	slices.Sort(rest)
	return append(names, rest...)
}

// flagValues are the values completion offers for a flag, in whichever command has it.
var flagValues = map[string][]string{
	"type":    {"dynamic", "fixed"},
	"options": {"ro", "rw", "force_rw", "allow_other", "default_permissions", "uid=", "gid=", "umask=", "fsname=", "debug", "nonempty"},
}

// commandTree is the command line as cobra sees it: for help, completion and man pages.
func commandTree() *cobra.Command {
	cobra.EnableCommandSorting = false
	root := &cobra.Command{
		Use:   "vhdfs",
		Short: "mount a chain of VHD or VHDX images as one raw disk, and work on such chains offline",
		Long: "vhdfs works with VHD and VHDX images, Microsoft's virtual disk formats. It mounts a chain of\n" +
			"them (a base and its differencing disks, all one format) as one raw disk, and creates, inspects,\n" +
			"checks, merges, converts, compacts, resizes and exports such chains offline.\n\n" +
			"mount -t fuse.vhdfs and fstab lines run it as: vhdfs IMAGE MOUNTPOINT -o OPTS\n" +
			"Exit codes: 0 ok, 1 the operation failed, 2 bad command line, 3 check found errors.",
		SilenceErrors:     true,
		SilenceUsage:      true,
		DisableAutoGenTag: true,
		Run:               func(*cobra.Command, []string) {},
	}
	root.Flags().Bool("version", false, "print the version")
	for _, name := range describedCommands() {
		d := describe(name)
		use := strings.TrimSpace(name + " " + strings.Join(d.names, " "))
		c := &cobra.Command{
			Use:   use,
			Short: summaries[name],
			Long:  details[name],
			Args:  cobra.ExactArgs(len(d.names)),
			Run:   func(*cobra.Command, []string) {},
		}
		c.Flags().SortFlags = false
		if d.fs != nil {
			c.Flags().AddFlagSet(d.fs)
		}
		for flag, values := range flagValues {
			if c.Flags().Lookup(flag) != nil {
				c.RegisterFlagCompletionFunc(flag, cobra.FixedCompletions(values, cobra.ShellCompDirectiveNoFileComp))
			}
		}
		root.AddCommand(c)
	}
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	root.InitDefaultHelpFlag()
	root.SuggestionsMinimumDistance = 2
	for _, c := range root.Commands() {
		c.InitDefaultHelpFlag()
		if s := summaries[c.Name()]; s != "" {
			c.Short = s
		}
		if s := details[c.Name()]; s != "" {
			c.Long = s
		}
	}
	return root
}

// printHelp prints the help of a command ("" for vhdfs itself) on stdout.
func printHelp(name string) error {
	root := commandTree()
	c := root
	if name != "" {
		var err error
		if c, _, err = root.Find([]string{name}); err != nil || c == root {
			return unknownCommand(name)
		}
	}
	c.SetOut(os.Stdout)
	return c.Help()
}

// unknownCommand is the usage error for a command that does not exist, naming the
// nearest one.
func unknownCommand(name string) error {
	if s := commandTree().SuggestionsFor(name); len(s) > 0 {
		return usageError{msg: fmt.Sprintf("unknown command %q; did you mean %q?", name, s[0]), suggested: true}
	}
	return usagef("unknown command %q", name)
}

func cmdHelp(args []string) error {
	if len(args) == 1 && (args[0] == "-h" || args[0] == "--help") {
		return printHelp("help")
	}
	switch len(args) {
	case 0:
		return printHelp("")
	case 1:
		return printHelp(args[0])
	}
	return usagef("want at most one COMMAND, got %d arguments", len(args))
}

// cmdCompletion prints a shell completion script; the script calls `vhdfs __complete`,
// which cobra answers from the same tree.
func cmdCompletion(args []string) error {
	if len(args) == 1 && (args[0] == "-h" || args[0] == "--help") {
		return printHelp("completion")
	}
	if len(args) != 1 || !slices.Contains([]string{"bash", "zsh", "fish", "powershell"}, args[0]) {
		return usagef("want one of bash, zsh, fish, powershell")
	}
	return runTree(append([]string{"completion"}, args...))
}

func runTree(args []string) error {
	root := commandTree()
	root.SetArgs(args)
	root.SetOut(os.Stdout)
	root.SetErr(os.Stderr)
	return root.Execute()
}

// cmdMan writes a man page for vhdfs and one for each command into DIR.
func cmdMan(args []string) error {
	if len(args) != 1 || strings.HasPrefix(args[0], "-") {
		return usagef("want DIR")
	}
	root := commandTree()
	return doc.GenManTree(root, &doc.GenManHeader{Title: "VHDFS", Section: "1", Source: "vhdfs " + version()}, args[0])
}
