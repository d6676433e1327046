package main

import (
	"fmt"
	"math/big"
	"regexp"
	"strings"
)

// sizeUnits maps a unit, in upper case, to its multiplier. K, M, G, T, P count in
// powers of 1024 as qemu-img does, and so do KiB, MiB...; KB, MB... count in powers
// of 1000 (SI). B is bytes.
var sizeUnits = func() map[string]int64 {
	u := map[string]int64{"": 1, "B": 1}
	bin, si := int64(1), int64(1)
	for _, p := range "KMGTP" {
		bin, si = bin<<10, si*1000
		u[string(p)], u[string(p)+"I"], u[string(p)+"IB"] = bin, bin, bin
		u[string(p)+"B"] = si
	}
	return u
}()

var sizeRE = regexp.MustCompile(`^([0-9]+)(?:\.([0-9]+))?([A-Za-z]*)$`)

// parseSize reads a size in bytes: a number with an optional fraction and unit (512,
// 1.5G, 10MiB, 4GB; see sizeUnits). A fraction of a byte is cut off, as qemu-img does;
// a fraction without a unit is an error.
func parseSize(s string) (int64, error) {
	m := sizeRE.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return 0, fmt.Errorf("size %q is not a number of bytes with an optional unit (K, M, G, T, or KB, MB, GB, TB for powers of 1000)", s)
	}
	mult, ok := sizeUnits[strings.ToUpper(m[3])]
	if !ok {
		return 0, fmt.Errorf("size %q has an unknown unit %q (K, M, G, T, P count in 1024s; KB, MB, GB, TB, PB in 1000s)", s, m[3])
	}
	if m[2] != "" && mult == 1 {
		return 0, fmt.Errorf("size %q: a fraction needs a unit", s)
	}
	r, ok := new(big.Rat).SetString(m[1] + "." + m[2] + "0")
	if !ok {
		return 0, fmt.Errorf("size %q is not a number", s)
	}
	r.Mul(r, new(big.Rat).SetInt64(mult))
	n := new(big.Int).Quo(r.Num(), r.Denom())
	if !n.IsInt64() || n.Int64() > 1<<62 {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n.Int64(), nil
}
