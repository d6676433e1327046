package main

import "errors"

func cmdMount(args []string) error  { return errors.New("not yet") }
func cmdUmount(args []string) error { return errors.New("not yet") }
func cmdMerge(args []string) error  { return errors.New("not yet") }
