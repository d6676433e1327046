// Package units writes sizes for people: in binary units, with the exact bytes
// beside them where the number matters.
package units

import "fmt"

// Human formats a byte count for people: "2.0 GiB", "512 B".
func Human(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// Text gives a size for people and in bytes: "1.5 GiB (1610612736 bytes)"; below
// 1 KiB the bytes alone: "512 bytes", "1 byte".
func Text(n int64) string {
	switch {
	case n == 1:
		return "1 byte"
	case n < 1024:
		return fmt.Sprintf("%d bytes", n)
	}
	return fmt.Sprintf("%s (%d bytes)", Human(n), n)
}

// Exact gives a size in the largest binary unit that holds it a whole number of
// times, with the bytes: "2040 GiB (2190433320960 bytes)", "64 TiB (70368744177664
// bytes)", where Text would round to "2.0 TiB"; below 1 KiB, or not whole KiB, the
// bytes alone.
func Exact(n int64) string {
	if n < 1024 || n%1024 != 0 {
		return Text(n)
	}
	v, u := n, -1
	for v%1024 == 0 && u < 4 {
		v /= 1024
		u++
	}
	return fmt.Sprintf("%d %ciB (%d bytes)", v, "KMGTP"[u], n)
}
