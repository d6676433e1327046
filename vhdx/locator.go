package vhdx

import (
	"encoding/binary"
	"fmt"
	"strings"
	"unicode/utf16"

	"github.com/vhdfs/vhdfs/internal/fileio"
)

// newLocator returns the parent locator entries vhdfs writes (§2.6.2.6.3) for a
// parent whose DataWriteGuid has the text form linkage (lowercase, no braces), found
// at parentPath, for a child at childPath: parent_linkage as "{guid}"; relative_path
// from the child's folder (".\name.vhdx", "..\dir\name.vhdx"), so that a chain moved
// together resolves; and absolute_win32_path, the absolute Linux path with `\`
// separators, as Linux tools write it (and what libvhdi's vhdimount reads first: it
// takes the name after the last `\` and looks beside the child). No
// parent_linkage2, and no volume_path: no \\?\Volume{...} path names a Linux file.
// A path holding `\` is refused: readers turn every `\` into a separator.
func newLocator(linkage, parentPath, childPath string) ([]KeyValue, error) {
	for _, p := range []string{parentPath, childPath} {
		if p == "" || strings.ContainsRune(p, '\\') {
			return nil, fmt.Errorf("parent locator path %q is empty or holds a backslash: %w", p, ErrInvalidArg)
		}
	}
	rel, parentAbs, err := fileio.ParentPaths(parentPath, childPath)
	if err != nil {
		return nil, err
	}
	win := func(p string) string { return strings.ReplaceAll(p, "/", `\`) }
	return []KeyValue{
		{"parent_linkage", "{" + strings.ToLower(linkage) + "}"},
		{"relative_path", win(rel)},
		{"absolute_win32_path", win(parentAbs)},
	}, nil
}

// marshalParentLocator returns the parent locator item holding kvs (§2.6.2.6): the
// header, the entries, then each key and value, UTF-16LE without terminators, at
// offsets from the start of the item.
func marshalParentLocator(kvs []KeyValue) ([]byte, error) {
	b := make([]byte, locatorHeaderLen+len(kvs)*locatorEntryLen)
	h := locatorHeader{LocatorType: LocatorTypeVHDX, KeyValueCount: uint16(len(kvs))}
	if _, err := binary.Encode(b, binary.LittleEndian, h); err != nil {
		return nil, err
	}
	for i, kv := range kvs {
		k, v := utf16LE(kv.Key), utf16LE(kv.Value)
		if len(k) == 0 || len(k) > 0xffff || len(v) > 0xffff {
			return nil, fmt.Errorf("parent locator entry %q of %d bytes: keys and values are 2 to 65535 bytes: %w", kv.Key, len(v), ErrInvalidArg)
		}
		e := locatorEntry{KeyOffset: uint32(len(b)), ValueOffset: uint32(len(b) + len(k)), KeyLength: uint16(len(k)), ValueLength: uint16(len(v))}
		if _, err := binary.Encode(b[locatorHeaderLen+i*locatorEntryLen:], binary.LittleEndian, e); err != nil {
			return nil, err
		}
		b = append(append(b, k...), v...)
	}
	if len(b) > maxLocatorLength {
		return nil, fmt.Errorf("parent locator of %d bytes exceeds %d: %w", len(b), maxLocatorLength, ErrInvalidArg)
	}
	return b, nil
}

// utf16LE encodes s as UTF-16LE.
func utf16LE(s string) []byte {
	u := utf16.Encode([]rune(s))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		binary.LittleEndian.PutUint16(b[2*i:], c)
	}
	return b
}
