package vhd

import "github.com/vhdfs/vhdfs/internal/pagecache"

// Bitmaps are read, cached and written in pages: 4 KiB of bitmap (16 MiB of data),
// or the whole bitmap when it is smaller. A 4 KiB read of a block with 2 GiB of data
// reads one page of its 512 KiB bitmap. Pages start on sector boundaries of the
// bitmap and are whole sectors long, as bitmaps are.
const (
	bitmapPage       = 4096
	sectorsPerPage   = bitmapPage * 8
	bytesPerPageData = sectorsPerPage * SectorSize
)

// maxDirtyBitmapBytes bounds the bitmap pages a writable image holds between syncs;
// past it, WriteAt syncs.
const maxDirtyBitmapBytes = 4 << 20

// pageKey names page page of the bitmap of block blk of the image with id img.
func pageKey(img uint64, blk, page uint32) pagecache.Key {
	return pagecache.Key{Image: img, Block: int64(blk), Page: int64(page)}
}

// bitmapCache holds clean bitmap pages (their bits as on disk), shared with every
// other image of the process, whatever its format.
var bitmapCache = pagecache.Bitmaps
