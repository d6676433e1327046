package vhdx

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"testing"
)

// fileSum is the sha256 of the file at p.
func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// headSum identifies a large file cheaply: its size, its modification time and the
// sha256 of its first 8 MiB (the headers, the log and the metadata regions).
func headSum(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.LimitReader(f, 8<<20)); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%d %v %x", st.Size(), st.ModTime().UnixNano(), h.Sum(nil))
}
