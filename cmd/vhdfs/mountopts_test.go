package main

import (
	"errors"
	"slices"
	"testing"
)

func TestHelperArgs(t *testing.T) {
	exists := func(p string) bool { return p != "frobnicate" }
	for _, tc := range []struct {
		name  string
		argv0 string
		args  []string
		want  []string
	}{
		{"a command stays", "vhdfs", []string{"mount", "a.vhd", "m"}, []string{"mount", "a.vhd", "m"}},
		{"mount.fuse3's order", "vhdfs", []string{"/i/a.vhd", "/m", "-o", "rw,nosuid"}, []string{"mount", "/i/a.vhd", "/m", "-o", "rw,nosuid"}},
		{"no options", "/usr/bin/vhdfs", []string{"a.vhd", "m"}, []string{"mount", "a.vhd", "m"}},
		{"named mount.vhdfs", "/sbin/mount.vhdfs", []string{"a.vhd", "m", "-o", "ro"}, []string{"mount", "a.vhd", "m", "-o", "ro"}},
		{"named mount.fuse.vhdfs", "mount.fuse.vhdfs", []string{"-o", "ro", "a.vhd", "m"}, []string{"mount", "-o", "ro", "a.vhd", "m"}},
		{"unknown command with one word", "vhdfs", []string{"snap3.vhd"}, []string{"snap3.vhd"}},
		{"flags first stay", "vhdfs", []string{"--help"}, []string{"--help"}},
		{"help stays", "vhdfs", []string{"help", "mount"}, []string{"help", "mount"}},
		{"an unknown word that is no file stays", "vhdfs", []string{"frobnicate", "a.vhd"}, []string{"frobnicate", "a.vhd"}},
		{"a command word with two arguments stays", "vhdfs", []string{"export", "a.vhd", "b.raw"}, []string{"export", "a.vhd", "b.raw"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := helperArgs(tc.argv0, tc.args, exists); !slices.Equal(got, tc.want) {
				t.Errorf("helperArgs(%q, %q) = %q, want %q", tc.argv0, tc.args, got, tc.want)
			}
		})
	}
}

func TestRewriteOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want []string // nil: a usage error
	}{
		{"no -o", []string{"-r", "a", "m"}, []string{"-r", "a", "m"}},
		{"ro and allow_other", []string{"-o", "ro,allow_other", "a", "m"}, []string{"--read-only=true", "--allow-other", "a", "m"}},
		{"joined -oOPTS", []string{"-oro", "a", "m"}, []string{"--read-only=true", "a", "m"}},
		{"--options=", []string{"--options=rw", "a", "m"}, []string{"--read-only=false", "a", "m"}},
		{"last of ro and rw wins", []string{"a", "m", "-o", "ro,rw"}, []string{"a", "m", "--read-only=true", "--read-only=false"}},
		{"values", []string{"-o", "uid=107,gid=kvm,umask=027,fsname=snap"}, []string{"--uid=107", "--gid=kvm", "--umask=027", "--fsname=snap"}},
		{"readahead and direct_io", []string{"-o", "readahead=512,direct_io"}, []string{"--readahead=512", "--direct-io"}},
		{"parents, top down", []string{"-o", "ro,parent=/i/b.vhd,parent=/i/c.vhd"}, []string{"--read-only=true", "--parent=/i/b.vhd", "--parent=/i/c.vhd"}},
		{"parent needs a value", []string{"-o", "parent="}, nil},
		{"readahead needs a value", []string{"-o", "readahead="}, nil},
		{"direct_io takes no value", []string{"-o", "direct_io=1"}, nil},
		{"debug and nonempty", []string{"-o", "debug,nonempty"}, []string{"--debug", "--nonempty"}},
		{"what mount.fuse3 passes for -t fuse.vhdfs", []string{"/i/a.vhd", "/m", "-o", "rw,noexec,nosuid,nodev,allow_other"},
			[]string{"/i/a.vhd", "/m", "--read-only=false", "--allow-other"}},
		{"fstab and systemd options are ignored", []string{"-o", "defaults,noauto,auto,nofail,_netdev,user,users,x-systemd.automount,x-systemd.idle-timeout=60,X-mount.mkdir,comment=systemd.x"}, []string{}},
		{"atime options are ignored", []string{"-o", "noatime,relatime,strictatime,lazytime,nodiratime,exec,suid,dev"}, []string{}},
		{"default_permissions is always on", []string{"-o", "default_permissions"}, []string{}},
		{"empty entries", []string{"-o", "ro,,"}, []string{"--read-only=true"}},
		{"after -- nothing is rewritten", []string{"--", "-o", "x"}, []string{"--", "-o", "x"}},
		{"unknown option", []string{"-o", "ro,bogus"}, nil},
		{"value on a flag option", []string{"-o", "ro=1"}, nil},
		{"generic option with a value", []string{"-o", "noauto=1"}, nil},
		{"missing value", []string{"-o", "uid="}, nil},
		{"-o at the end", []string{"a", "m", "-o"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := rewriteOptions(tc.args)
			if tc.want == nil {
				var ue usageError
				if !errors.As(err, &ue) {
					t.Errorf("rewriteOptions(%q) = %q, %v; want a usage error", tc.args, got, err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) && !(len(got) == 0 && len(tc.want) == 0) {
				t.Errorf("rewriteOptions(%q) = %q, %v; want %q", tc.args, got, err, tc.want)
			}
		})
	}
}
