package vhd

import "github.com/vhdfs/vhdfs/image"

// UUID is a 16-byte unique identifier as stored on disk: the image package's ID.
type UUID = image.ID

// NewUUID returns a random (version 4) UUID.
func NewUUID() UUID { return image.NewID() }
