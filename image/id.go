package image

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
)

// ID identifies an image to its children: 16 bytes in the order of its usual
// text form (a VHDX GUID, stored mixed-endian, is converted by its package).
type ID [16]byte

// NewID returns a random (version 4) ID.
func NewID() ID {
	var u ID
	_, _ = rand.Read(u[:])
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return u
}

// IsZero reports whether u is all zeros.
func (u ID) IsZero() bool { return u == ID{} }

// String is the lowercase 8-4-4-4-12 form.
func (u ID) String() string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// ParseID reads the form String writes, with or without braces and dashes.
func ParseID(s string) (ID, error) {
	var u ID
	h := strings.ReplaceAll(strings.TrimSuffix(strings.TrimPrefix(s, "{"), "}"), "-", "")
	if len(h) != 32 {
		return u, fmt.Errorf("ID %q: %w", s, ErrInvalidArg)
	}
	if _, err := hex.Decode(u[:], []byte(h)); err != nil {
		return u, fmt.Errorf("ID %q: %w", s, ErrInvalidArg)
	}
	return u, nil
}
