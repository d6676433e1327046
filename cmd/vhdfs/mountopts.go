package main

import (
	"path/filepath"
	"strings"
)

// helperArgs turns the command line of a mount helper into vhdfs's own. mount(8)
// runs mount.fuse3 for `-t fuse.vhdfs` and fstab lines, which runs
// `vhdfs IMAGE MOUNTPOINT -o OPTS`; a program named mount.vhdfs or mount.fuse.vhdfs
// is always a mount. The helper form needs an existing IMAGE (exists tells), so a
// mistyped command stays an unknown command. Anything else is left as it is.
func helperArgs(argv0 string, args []string, exists func(string) bool) []string {
	name := filepath.Base(argv0)
	if strings.HasPrefix(name, "mount.") {
		return append([]string{"mount"}, args...)
	}
	if len(args) >= 2 && commands[args[0]] == nil && args[0] != "help" &&
		!strings.HasPrefix(args[0], "-") && !strings.HasPrefix(args[1], "-") && exists(args[0]) {
		return append([]string{"mount"}, args...)
	}
	return args
}

// genericOptions are the options mount(8) and mount.fuse3 hand to every helper, or
// that belong to fstab and systemd; a helper ignores them.
var genericOptions = map[string]bool{
	"defaults": true, "auto": true, "noauto": true, "nofail": true, "_netdev": true,
	"user": true, "nouser": true, "users": true, "owner": true, "group": true,
	"exec": true, "noexec": true, "suid": true, "nosuid": true, "dev": true, "nodev": true,
	"atime": true, "noatime": true, "relatime": true, "norelatime": true,
	"strictatime": true, "nostrictatime": true, "lazytime": true, "nolazytime": true,
	"diratime": true, "nodiratime": true, "sync": true, "async": true, "dirsync": true,
	"silent": true, "loud": true,
}

// rewriteOptions replaces every `-o OPTS` (also `-oOPTS`, `--options OPTS`) in args
// by the long flags they stand for, as gocryptfs does, so one flag set parses both.
// Generic mount options are dropped; an unknown one is a usage error.
func rewriteOptions(args []string) ([]string, error) {
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		var opts string
		switch {
		case a == "--":
			return append(out, args[i:]...), nil
		case a == "-o" || a == "--options":
			if i+1 == len(args) {
				return nil, usagef("%s needs a list of options", a)
			}
			i++
			opts = args[i]
		case strings.HasPrefix(a, "--options="):
			opts = strings.TrimPrefix(a, "--options=")
		case strings.HasPrefix(a, "-o") && !strings.HasPrefix(a, "--"):
			opts = a[2:]
		default:
			out = append(out, a)
			continue
		}
		for _, o := range strings.Split(opts, ",") {
			flag, err := optionFlag(o)
			if err != nil {
				return nil, err
			}
			if flag != "" {
				out = append(out, flag)
			}
		}
	}
	return out, nil
}

// optionFlag returns the flag that stands for one -o option, or "" for one to ignore.
func optionFlag(o string) (string, error) {
	key, val, hasVal := strings.Cut(o, "=")
	switch {
	case o == "" || genericOptions[o] && !hasVal:
		return "", nil
	case strings.HasPrefix(o, "x-") || strings.HasPrefix(o, "X-") || key == "comment":
		return "", nil
	case hasVal && (key == "uid" || key == "gid" || key == "umask" || key == "fsname" || key == "readahead" || key == "parent"):
		if val == "" {
			return "", usagef("mount option %s needs a value", key)
		}
		return "--" + key + "=" + val, nil
	case hasVal:
	case o == "ro":
		return "--read-only=true", nil
	case o == "rw":
		return "--read-only=false", nil
	case o == "force_rw":
		return "--force-rw", nil
	case o == "allow_other":
		return "--allow-other", nil
	case o == "default_permissions":
		return "", nil // always on: the kernel checks the mode bits
	case o == "debug":
		return "--debug", nil
	case o == "nonempty":
		return "--nonempty", nil
	case o == "direct_io":
		return "--direct-io", nil
	}
	return "", usagef("unknown mount option %q", o)
}
