package main

import (
	"slices"
	"testing"

	"github.com/spf13/pflag"
)

// TestDescribeEveryCommand: every command hands its flags to help through parse, and
// every flag has a description.
func TestDescribeEveryCommand(t *testing.T) {
	for name := range commands {
		if slices.Contains(notDescribed, name) {
			continue
		}
		t.Run(name, func(t *testing.T) {
			d := describe(name)
			if d.fs == nil {
				t.Fatalf("%s does not parse its flags through parse: help cannot show them", name)
			}
			if summaries[name] == "" {
				t.Errorf("%s has no summary for vhdfs help", name)
			}
			d.fs.VisitAll(func(f *pflag.Flag) {
				if f.Usage == "" {
					t.Errorf("%s --%s has no description", name, f.Name)
				}
			})
		})
	}
	if root := commandTree(); len(root.Commands()) != len(commands)-len(notDescribed)+2 {
		t.Errorf("help shows %d commands for %d", len(root.Commands()), len(commands))
	}
}
