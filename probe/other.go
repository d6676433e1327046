package probe

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/vhdfs/vhdfs/internal/fileio"
)

// Other is a disk image format vhdfs does not read, as OtherFormat names it.
type Other struct {
	Name string // "qcow2", "qcow", "VMDK", "VDI", or "raw" for a raw disk
	// Table is a raw disk's partition table, "MBR" or "GPT"; "" for an image.
	Table string
}

// Describe says what the file is for people: "a qcow2 image", "a raw disk image
// (GPT)".
func (o Other) Describe() string {
	if o.Name == "raw" {
		return fmt.Sprintf("a raw disk image (%s)", o.Table)
	}
	return fmt.Sprintf("a %s image", o.Name)
}

// headSize is how much of a file OtherFormat reads: a GPT header after a 4 KiB
// sector is the furthest thing it looks at.
const headSize = 4096 + 8

// OtherFormat names the format of the file at path when it is a disk image of a
// format vhdfs does not read, from the signatures at its start: qcow2 (and qcow),
// VMDK (sparse, or a text descriptor), VDI, or a raw disk with an MBR or GPT
// partition table. ok is false for a file with none of them, or that cannot be read.
// It is for saying what a file is once no format of the list (formats) claims it: a
// fixed VHD whose footer is lost looks like a raw disk too.
func OtherFormat(path string) (o Other, ok bool) {
	f, err := fileio.OpenRegular(path, os.O_RDONLY)
	if err != nil {
		return Other{}, false
	}
	defer f.Close()
	head := make([]byte, headSize)
	n, err := f.ReadAt(head, 0)
	if err != nil && err != io.EOF {
		return Other{}, false
	}
	return otherFormat(head[:n])
}

// otherFormat is OtherFormat of a file that starts with head (headSize bytes, or
// the whole file when it is shorter).
func otherFormat(head []byte) (Other, bool) {
	at := func(off int, sig string) bool {
		return len(head) >= off+len(sig) && string(head[off:off+len(sig)]) == sig
	}
	switch {
	case at(0, "QFI\xfb"):
		// qcow's version, big-endian, follows the magic: 1 is the old qcow.
		if len(head) >= 8 && binary.BigEndian.Uint32(head[4:8]) == 1 {
			return Other{Name: "qcow"}, true
		}
		return Other{Name: "qcow2"}, true
	case at(0, "KDMV"), at(0, "COWD"), at(0, "# Disk DescriptorFile"):
		return Other{Name: "VMDK"}, true
	case len(head) >= 68 && binary.LittleEndian.Uint32(head[64:68]) == 0xbeda107f,
		at(0, "<<< ") && bytes.Contains(head[:min(len(head), 64)], []byte("VirtualBox Disk Image >>>")):
		return Other{Name: "VDI"}, true
	case at(512, "EFI PART"), at(4096, "EFI PART"):
		return Other{Name: "raw", Table: "GPT"}, true
	case len(head) >= 512 && head[510] == 0x55 && head[511] == 0xaa:
		return Other{Name: "raw", Table: "MBR"}, true
	}
	return Other{}, false
}

// convertHint says how to make a VHDX of a file of another format: a qemu-img
// command line, with the names quoted for a shell where they need it.
func convertHint(path string, o Other) string {
	out := strings.TrimSuffix(path, filepath.Ext(path)) + ".vhdx"
	from := ""
	if o.Name == "raw" {
		from = "-f raw "
	}
	hint := fmt.Sprintf("convert it with qemu-img convert %s-O vhdx %s %s", from, shellQuote(path), shellQuote(out))
	if o.Name == "raw" {
		hint += "; a fixed VHD whose footer is lost looks the same: --salvage reads it"
	}
	return hint
}

// shellQuote quotes s for a POSIX shell when it holds anything but the characters
// a file name usually has.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._/+-=,:@") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
