package vhdx

import (
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vhdfs/vhdfs/image"
)

// TestDescribe: Describe reports the creator, the locator entries in the file's
// order and the VHDX fields.
func TestDescribe(t *testing.T) {
	b := newBuilder(8*MiB, 2*MiB)
	b.logical, b.parent = 4096, true
	b.locator = []KeyValue{{"parent_linkage", "{" + NewGUID().String() + "}"}, {"relative_path", `..\p.vhdx`}, {"absolute_win32_path", `C:\p.vhdx`}}
	img, err := Open(writeFile(t, b.build()), false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	d := img.Describe()
	if d.Creator != "vhdfs test builder" {
		t.Errorf("Creator = %q", d.Creator)
	}
	wantLoc := []image.Locator{
		{Slot: 0, Platform: "parent_linkage", Path: b.locator[0].Value},
		{Slot: 1, Platform: "relative_path", Path: `..\p.vhdx`},
		{Slot: 2, Platform: "absolute_win32_path", Path: `C:\p.vhdx`},
	}
	if !reflect.DeepEqual(d.Locators, wantLoc) {
		t.Errorf("Locators = %+v, want %+v", d.Locators, wantLoc)
	}
	fields := map[string]string{}
	for _, f := range d.Fields {
		fields[f[0]] = f[1]
	}
	for k, v := range map[string]string{
		"logical sector size":  "4096",
		"physical sector size": "4096",
		"block size":           "2097152",
		"data write GUID":      b.dataWrite.String(),
		"file write GUID":      b.fileWrite.String(),
		"virtual disk ID":      img.VirtualDiskID().String(),
		"log entries replayed": "0",
	} {
		if fields[k] != v {
			t.Errorf("field %q = %q, want %q", k, fields[k], v)
		}
	}
	if len(d.Fields) != 7 {
		t.Errorf("%d fields, want 7", len(d.Fields))
	}

	lf, _, _ := logImage(t)
	li, err := Open(writeFile(t, lf), false)
	if err != nil {
		t.Fatal(err)
	}
	defer li.Close()
	for _, f := range li.Describe().Fields {
		if f[0] == "log entries replayed" && f[1] != "2" {
			t.Errorf("log entries replayed = %s, want 2", f[1])
		}
	}
	if li.Describe().Locators != nil {
		t.Error("locators in an image without a parent")
	}

	if _, err := exec.LookPath("qemu-img"); err == nil {
		p := filepath.Join(t.TempDir(), "q.vhdx")
		run(t, "qemu-img", "create", "-q", "-f", "vhdx", p, "8M")
		q, err := Open(p, false)
		if err != nil {
			t.Fatal(err)
		}
		defer q.Close()
		if c := q.Describe().Creator; !strings.HasPrefix(c, "QEMU") {
			t.Errorf("qemu-img's Creator = %q", c)
		}
	}
}
