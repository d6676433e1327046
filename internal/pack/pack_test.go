package pack

import (
	"slices"
	"testing"
)

func fitAny(start, end, n int64) (int64, bool) { return start, start+n <= end }

// fit4 aligns to 4 like a format that aligns its blocks.
func fit4(start, end, n int64) (int64, bool) {
	s := (start + 3) / 4 * 4
	return s, s+n <= end
}

func TestPlan(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ext     []Extent
		fit     Fit
		want    []Move
		wantEnd int64
	}{
		{"no holes", []Extent{{-1, 0, 4, true}, {1, 4, 4, false}, {2, 8, 4, false}}, fitAny, nil, 12},
		{"the last block into the first hole", []Extent{{-1, 0, 4, true}, {1, 8, 4, false}, {2, 12, 4, false}}, fitAny,
			[]Move{{2, 12, 4, 4}}, 12},
		{"the highest first, lowest holes first", []Extent{{-1, 0, 4, true}, {1, 8, 4, false}, {2, 16, 4, false}, {3, 24, 4, false}}, fitAny,
			[]Move{{3, 24, 4, 4}, {2, 16, 12, 4}}, 16},
		{"a block moves down into the hole just below it", []Extent{{-1, 0, 4, true}, {1, 8, 4, false}}, fitAny,
			[]Move{{1, 8, 4, 4}}, 8},
		{"a hole too small is skipped", []Extent{{-1, 0, 4, true}, {1, 6, 4, false}, {2, 12, 4, false}, {3, 20, 4, false}}, fitAny,
			[]Move{{3, 20, 16, 4}}, 20},
		{"fixed extents stay, even above the blocks", []Extent{{-1, 0, 4, true}, {1, 8, 4, false}, {-1, 40, 4, true}}, fitAny,
			[]Move{{1, 8, 4, 4}}, 44},
		{"alignment", []Extent{{-1, 0, 2, true}, {1, 8, 4, false}}, fit4, []Move{{1, 8, 4, 4}}, 8},
		{"never upwards", []Extent{{1, 0, 4, false}, {-1, 4, 4, true}}, fitAny, nil, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			moves, end := Plan(tc.ext, tc.fit)
			if !slices.Equal(moves, tc.want) || end != tc.wantEnd {
				t.Fatalf("Plan = %v, %d; want %v, %d", moves, end, tc.want, tc.wantEnd)
			}
		})
	}
}
