package image

import (
	"fmt"
	"strings"
)

// Severity of a problem found by Check.
type Severity int

const (
	Note Severity = iota
	Warning
	Error
)

func (s Severity) String() string {
	return [...]string{"note", "warning", "error"}[s]
}

// Problem is one finding of Check.
type Problem struct {
	Severity Severity
	File     string
	Message  string
}

// String is "file: severity: message", without the file twice when the message
// (an error from Open) already starts with it.
func (p Problem) String() string {
	msg := strings.TrimPrefix(p.Message, p.File+": ")
	return fmt.Sprintf("%s: %s: %s", p.File, p.Severity, msg)
}
