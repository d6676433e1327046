package main

import "testing"

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64 // -1: an error
	}{
		{"bytes", 4096},
		{"0", 0},
		{"512", 512},
		{"512K", 512 << 10},
		{"10m", 10 << 20},
		{"10M", 10 << 20},
		{"10MiB", 10 << 20},
		{"10Mi", 10 << 20},
		{"2G", 2 << 30},
		{"1T", 1 << 40},
		{"1.5G", 3 << 29},
		{"0.5K", 512},
		{"1.1K", 1126}, // truncated to whole bytes, as qemu-img does
		{"10KB", 10000},
		{"10MB", 10_000_000},
		{"1.5GB", 1_500_000_000},
		{"2TB", 2_000_000_000_000},
		{"1kb", 1000},
		{"100B", 100},
		{" 8M ", 8 << 20},
		{"", -1},
		{"lots", -1},
		{"12Q", -1},
		{"-5M", -1},
		{"1.5", -1}, // a fraction of a byte
		{"1.", -1},
		{".5G", -1},
		{"1e3", -1},
		{"0x10", -1},
		{"8 M", -1},
		{"9999999T", -1},
		{"M", -1},
	} {
		name := tc.in
		if name == "bytes" {
			tc.in = "4096"
		}
		t.Run(name, func(t *testing.T) {
			got, err := parseSize(tc.in)
			if tc.want < 0 {
				if err == nil {
					t.Errorf("parseSize(%q) = %d, want an error", tc.in, got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("parseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
			}
		})
	}
}
