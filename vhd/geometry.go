package vhd

// maxCHSSectors is the largest disk CHS can describe: 65535 × 16 × 255.
const maxCHSSectors = 65535 * 16 * 255

// MaxGeometry is the largest CHS geometry, which qemu, Hyper-V and Azure take as a
// marker meaning "the size is the footer's current size, not the geometry's".
// blktap's vhd-util check calls it "geometry too large" for disks under 127 GiB.
var MaxGeometry = Geometry{Cylinders: 65535, Heads: 16, Sectors: 255}

// CHS computes the geometry for a size in bytes with the algorithm from the
// specification's appendix. The geometry rounds down: Bytes() may be less than size.
func CHS(size int64) Geometry {
	total := size / SectorSize
	if total > maxCHSSectors {
		total = maxCHSSectors
	}
	var spt, heads, cth int64
	if total >= 65535*16*63 {
		spt, heads = 255, 16
		cth = total / spt
	} else {
		spt = 17
		cth = total / spt
		heads = (cth + 1023) / 1024
		if heads < 4 {
			heads = 4
		}
		if cth >= heads*1024 || heads > 16 {
			spt, heads = 31, 16
			cth = total / spt
		}
		if cth >= heads*1024 {
			spt, heads = 63, 16
			cth = total / spt
		}
	}
	return Geometry{Cylinders: uint16(cth / heads), Heads: uint8(heads), Sectors: uint8(spt)}
}

// RoundUpCHS returns the smallest size ≥ size that a CHS geometry describes exactly,
// as qemu-img create -f vpc does, so that tools deriving the size from the geometry
// agree with the footer. Sizes beyond what CHS can describe are returned unchanged
// (rounded up to a sector).
func RoundUpCHS(size int64) int64 {
	size = (size + SectorSize - 1) / SectorSize * SectorSize
	if size >= maxCHSSectors*SectorSize {
		return size
	}
	// The geometry for a size never exceeds it; grow one sector at a time until the
	// geometry covers the request. CHS granularity is at most 255×16 sectors.
	for s := size; s < size+255*16*SectorSize*2; s += SectorSize {
		if g := CHS(s); g.Bytes() >= size {
			return g.Bytes()
		}
	}
	return size
}
