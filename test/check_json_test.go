package test

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestCheckJSON: check --json gives the problems and the chain in info --json's
// schema, for a sound chain (exit 0) and for an image merged away (exit 3, the
// reason among the problems, the layers it could open).
func TestCheckJSON(t *testing.T) {
	forEachFormat(t, func(t *testing.T, format string) {
		c := makeChain(t, chainOptions{Format: format, Depth: 3, Create: []string{"--size", "8M"}, Writes: 5, Seed: 71})
		type result struct {
			Image      string `json:"image"`
			Consistent bool   `json:"consistent"`
			Problems   []struct {
				Severity, File, Message string
			} `json:"problems"`
			Chain *infoJSON `json:"chain"`
		}
		parse := func(out string) result {
			t.Helper()
			var r result
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				t.Fatalf("check --json: %v\n%s", err, out)
			}
			return r
		}
		out, errs, code := vhdfs(t, "check", "--json", c.Top())
		r := parse(out)
		if code != 0 || errs != "" || !r.Consistent || r.Image != c.Top() || r.Chain == nil || len(r.Chain.Layers) != 3 {
			t.Fatalf("check --json of a sound chain: exit %d, stderr %q, %+v", code, errs, r)
		}
		if info := vhdfsInfo(t, c.Top()); r.Chain.Layers[2].UniqueID != info.Layers[2].UniqueID || r.Chain.VirtualSize != info.VirtualSize {
			t.Errorf("check --json's chain differs from info --json's: %+v vs %+v", r.Chain, info)
		}

		mustVhdfs(t, "merge", "--depth", "2", c.Top())
		out, _, code = vhdfs(t, "check", "--json", c.Images[1])
		r = parse(out)
		if code != 3 || r.Consistent || len(r.Problems) == 0 || !strings.Contains(r.Problems[len(r.Problems)-1].Message, "no longer valid") {
			t.Errorf("check --json of an image merged away: exit %d, %+v", code, r)
		}
		if r.Chain == nil || len(r.Chain.Layers) != 1 {
			t.Errorf("check --json of an image merged away shows the chain %+v, want its one layer", r.Chain)
		}
	})
}
