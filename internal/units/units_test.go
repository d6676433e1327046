package units

import "testing"

func TestText(t *testing.T) {
	for n, want := range map[int64]string{
		0:             "0 bytes",
		1:             "1 byte",
		1023:          "1023 bytes",
		1024:          "1.0 KiB (1024 bytes)",
		343932928:     "328.0 MiB (343932928 bytes)",
		1610612736:    "1.5 GiB (1610612736 bytes)",
		3 << 40:       "3.0 TiB (3298534883328 bytes)",
		5 << 50:       "5.0 PiB (5629499534213120 bytes)",
		5<<50 + 1<<49: "5.5 PiB (6192449487634432 bytes)",
	} {
		if got := Text(n); got != want {
			t.Errorf("Text(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestExact(t *testing.T) {
	for n, want := range map[int64]string{
		512:           "512 bytes",
		1536:          "1.5 KiB (1536 bytes)",
		2190433320960: "2040 GiB (2190433320960 bytes)",
		64 << 40:      "64 TiB (70368744177664 bytes)",
		1 << 60:       "1024 PiB (1152921504606846976 bytes)",
		1025:          "1.0 KiB (1025 bytes)",
	} {
		if got := Exact(n); got != want {
			t.Errorf("Exact(%d) = %q, want %q", n, got, want)
		}
	}
}
