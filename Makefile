GO ?= go
BIN := bin/vhdfs
VERSION := $(shell git describe --always --dirty 2>/dev/null || echo dev)

.PHONY: all build man demo test deps lint bench fuzz clean

all: build

build:
	$(GO) build -ldflags "-X main.Version=$(VERSION)" -o $(BIN) ./cmd/vhdfs

man: build
	mkdir -p man && $(BIN) man man

deps:
	@scripts/deps.sh

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet ./...

# Every test: unit tests, fuzz seeds and the end-to-end tests that mount for real.
test: deps lint
	$(GO) test -race -timeout 40m -count=1 ./...

demo: deps build
	@scripts/demo.sh

# BENCH_SIZE sets the size of the benchmark chain (default 2G).
bench: deps build
	@scripts/bench.sh

fuzz:
	$(GO) test ./vhd -run '^$$' -fuzz FuzzOpen -fuzztime $${FUZZTIME:-2m}

clean:
	rm -rf bin
