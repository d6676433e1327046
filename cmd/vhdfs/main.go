// Command vhdfs mounts a chain of VHD or VHDX images as one raw disk and works on such
// chains offline: create, info, check, merge, export, convert and more.
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime/pprof"
	"slices"
	"strings"

	"github.com/spf13/pflag"
)

// Exit codes.
const (
	exitOK    = 0
	exitError = 1 // the operation failed; the message says why
	exitUsage = 2 // the command line was wrong
	exitCheck = 3 // check found errors
)

const usage = `usage:
  vhdfs mount [-r|--read-only [--salvage]] [--force-rw] [-f|--foreground] [--allow-other] [--debug] [-o OPTS] [--parent PARENT]... IMAGE MOUNTPOINT
  vhdfs IMAGE MOUNTPOINT [-o OPTS]   (as mount.fuse3 runs it for mount -t fuse.vhdfs)
  vhdfs umount [--abort] MOUNTPOINT
  vhdfs info [--json] [-U] [--salvage] [--parent PARENT]... IMAGE
  vhdfs create --size SIZE [--type dynamic|fixed] [--format vhd|vhdx] [--block-size SIZE] [--exact-size]
               [--logical-sector 512|4096] [--physical-sector 512|4096] [--json|-q] IMAGE
  vhdfs create --parent PARENT [--block-size SIZE] IMAGE
  vhdfs snapshot IMAGE NEW
  vhdfs merge [-p|--progress] [--depth N] [--from S] [--delete] [--force-rw] IMAGE
  vhdfs check [--repair [--force-rw]] [-U] [-v|--verbose] [--salvage] [--json] [--parent PARENT]... IMAGE
  vhdfs compact [-n|--dry-run] [-p|--progress] [--force-rw] IMAGE
  vhdfs export [-p|--progress] [-U] [--salvage] [--hash sha256|md5] [--force] [--parent PARENT]... IMAGE OUT.raw|-|DEVICE
  vhdfs convert [--format vhd|vhdx] [--type dynamic|fixed] [--block-size SIZE] [--azure]
                [-p|--progress] [-U] [--parent PARENT]... [-q] IN OUT
  vhdfs relink [--force-rw] IMAGE PARENT
  vhdfs resize [--exact-size] [--force] [--force-rw] IMAGE SIZE
  vhdfs resize --smallest [--exact-size] IMAGE
  vhdfs help [COMMAND]               (or vhdfs COMMAND --help: every flag, described)
  vhdfs completion bash|zsh|fish|powershell
  vhdfs version
`

// reported is an error already told where it belongs (a background mount process's
// startup error, sent to the command that started it): it is not printed again.
type reported struct{ error }

// usageError is a mistake on the command line. It is told in one line that points
// at the command's help, unless it suggests what was meant (a mistyped command).
type usageError struct {
	msg       string
	suggested bool
}

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return usageError{msg: fmt.Sprintf(format, args...)}
}

// commands maps each command to the function that runs it (filled in init: help and
// completion describe the commands, which would be an initialization cycle).
var commands map[string]func(args []string) error

func init() {
	commands = map[string]func(args []string) error{
		"mount":      cmdMount,
		"umount":     cmdUmount,
		"info":       cmdInfo,
		"create":     cmdCreate,
		"merge":      cmdMerge,
		"check":      cmdCheck,
		"export":     cmdExport,
		"map":        cmdMap,
		"scan":       cmdScan,
		"convert":    cmdConvert,
		"compact":    cmdCompact,
		"snapshot":   cmdSnapshot,
		"relink":     cmdRelink,
		"resize":     cmdResize,
		"version":    cmdVersion,
		"help":       cmdHelp,
		"completion": cmdCompletion,
		"man":        cmdMan,
		"__control":  cmdControl,
		"__complete": func(args []string) error { return runTree(append([]string{"__complete"}, args...)) },
		"__completeNoDesc": func(args []string) error {
			return runTree(append([]string{"__completeNoDesc"}, args...))
		},
	}
}

// summaries are the one-line descriptions help shows; details, when given, follow in
// the command's own help.
var summaries = map[string]string{
	"mount":      "mount the chain whose top is IMAGE; MOUNTPOINT/disk.raw is the whole disk",
	"umount":     "sync and unmount a vhdfs mount, waiting for its process to finish",
	"info":       "show every image of the chain, top to base",
	"create":     "create a dynamic or fixed image, or a differencing image of a parent (--parent)",
	"merge":      "merge the top image (or a range) into its parent, offline",
	"check":      "check the structure of every image in the chain",
	"compact":    "drop all-zero blocks and shrink the file (Optimize-VHD), offline; --dry-run says by how much",
	"export":     "write the whole chain as one raw file, to a file, stdout (-) or a block device",
	"scan":       "list the VHD and VHDX images of directories as chains, by ID: ok, orphan or stale; no locks",
	"map":        "show which layer holds each run of the disk (qemu-img map's shape; --json)",
	"convert":    "flatten the chain (or one image) into a new VHD or VHDX, dynamic or fixed",
	"snapshot":   "freeze IMAGE's current state as NEW (beside it); IMAGE stays the live top, a new empty image on NEW",
	"relink":     "point IMAGE's parent locators at PARENT, once its unique ID matches (qemu-img rebase -u)",
	"resize":     "change the virtual size of IMAGE, offline (ResizeVirtualDisk); a shrink past a partition or data needs --force",
	"version":    "print the version",
	"help":       "show the help of vhdfs or of one command",
	"completion": "print a bash, zsh, fish or powershell completion script",
}

var details = map[string]string{
	"create": "Sizes are bytes or a number with a unit, decimals allowed (1.5G):\n" +
		"  K, M, G, T (also KiB, MiB, GiB, TiB) are powers of 1024, as in qemu-img;\n" +
		"  KB, MB, GB, TB are powers of 1000.\n" +
		"Without --exact-size the size is rounded up to a CHS geometry, as qemu-img does.",
	"convert": "OUT is written under a temporary name beside it (.OUT.vhdfs-convert-PID), synced,\n" +
		"and renamed into place: it never exists half-written, and an existing OUT is refused.\n" +
		"All-zero data is not stored; a fixed OUT's zero ranges are holes in its file.\n" +
		"A VHD keeps the exact size (the footer's geometry is 65535/16/255 when no CHS\n" +
		"geometry gives it); a VHDX takes the logical sector size of IN.",
	"check": "Each finding is an error (on stderr; check exits 3), a warning (worth a look; exit 0)\n" +
		"or a note (unusual but harmless, such as how the tool that made an image writes it),\n" +
		"shown only with -v. --json has every finding, each with its severity.",
	"export": "A regular file that is not empty is refused without --force; an image of the chain\n" +
		"always. --hash prints the digest of the whole disk, holes as zeros, as sha256sum\n" +
		"prints it: on stdout, or on stderr when OUT is stdout.",
	"merge": "The images merged away are left on disk, no longer valid, unless --delete removes\n" +
		"them once the merge is complete (its journal gone), as Merge-VHD does. It keeps an image\n" +
		"that an image in their directories records as its parent (a sibling chain), one still in\n" +
		"the chain, and all of them while an image there cannot be read, saying why\n" +
		"(\"kept X: Y records it as its parent\"). It removes them by name in their directory,\n" +
		"with the authority of the top image's owner, never through a symlink. Children in\n" +
		"other directories (a Hyper-V Snapshots folder) are not looked for: find them first\n" +
		"with vhdfs scan -r over the VM's folder, and leave --delete out if there is one.",
	"snapshot": "NEW is a new name of IMAGE's file, in IMAGE's directory, with its unique ID: what\n" +
		"IMAGE holds now, read-only from then on. IMAGE becomes a new empty differencing\n" +
		"image on NEW, so the name you mount and write stays the live disk. IMAGE's own\n" +
		"children now belong to NEW: 'vhdfs relink CHILD NEW' points them there. A mounted\n" +
		"IMAGE takes its snapshot through its control file (echo snapshot NEW > control).",
	"completion": "bash:  source <(vhdfs completion bash)\n" +
		"zsh:   vhdfs completion zsh > \"${fpath[1]}/_vhdfs\"",
}

func cmdVersion(args []string) error {
	if _, err := parse(newFlags("version"), args); err != nil {
		return err
	}
	fmt.Println("vhdfs", version())
	return nil
}

func main() {
	stop := startProfile()
	code := run(helperArgs(os.Args[0], os.Args[1:], func(p string) bool {
		_, err := os.Stat(p)
		return err == nil
	}))
	stop()
	os.Exit(code)
}

// startProfile writes a CPU profile to the file named by VHDFS_CPUPROFILE (and a heap
// profile beside it, .heap) for the life of the process; the mount process too, until
// it is unmounted. Read them with go tool pprof.
func startProfile() func() {
	path := os.Getenv("VHDFS_CPUPROFILE")
	if path == "" || os.Getenv(notifyEnv) == "" && len(os.Args) > 1 && os.Args[1] == "mount" && !slices.Contains(os.Args, "-f") && !slices.Contains(os.Args, "--foreground") {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vhdfs: VHDFS_CPUPROFILE: %v\n", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintf(os.Stderr, "vhdfs: VHDFS_CPUPROFILE: %v\n", err)
		f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
		if h, err := os.Create(path + ".heap"); err == nil {
			pprof.WriteHeapProfile(h)
			h.Close()
		}
	}
}

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "-h", "--help":
		args[0] = "help"
	case "--version":
		args[0] = "version"
	}
	cmd, ok := commands[args[0]]
	if !ok {
		cmd = func([]string) error { return unknownCommand(args[0]) }
	}
	err := cmd(args[1:])
	var ue usageError
	var ce checkFailed
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, pflag.ErrHelp):
		return exitOK
	case errors.As(err, &ue):
		prefix, help := "vhdfs", "vhdfs --help"
		if ok {
			prefix, help = "vhdfs "+args[0], "vhdfs "+args[0]+" --help"
		}
		if ue.suggested {
			fmt.Fprintf(os.Stderr, "%s: %s\n", prefix, oneLine(ue.msg))
		} else {
			fmt.Fprintf(os.Stderr, "%s: %s; see '%s'\n", prefix, oneLine(ue.msg), help)
		}
		return exitUsage
	case errors.As(err, &ce):
		return exitCheck
	case errors.As(err, &reported{}):
		return exitError
	}
	fmt.Fprintf(os.Stderr, "vhdfs %s: %s\n", args[0], oneLine(err.Error()))
	return exitError
}

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", "; ") }

// newFlags returns a flag set for a subcommand whose errors come back as usage errors.
func newFlags(name string) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(os.Stderr)
	fs.Usage = func() {}
	return fs
}

// parse parses args and checks the number of positional arguments; a last name
// ending in "..." takes one or more.
func parse(fs *pflag.FlagSet, args []string, names ...string) ([]string, error) {
	if describing != nil {
		*describing = described{fs, names}
		return nil, errDescribed
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			if herr := printHelp(fs.Name()); herr != nil {
				return nil, herr
			}
			return nil, err
		}
		return nil, usagef("%v", err)
	}
	if n := len(names); n > 0 && strings.HasSuffix(names[n-1], "...") {
		if fs.NArg() < n {
			return nil, usagef("want %s, got %d arguments", strings.Join(names, " "), fs.NArg())
		}
		return fs.Args(), nil
	}
	if fs.NArg() != len(names) {
		return nil, usagef("want %s, got %d arguments", strings.Join(names, " "), fs.NArg())
	}
	return fs.Args(), nil
}
