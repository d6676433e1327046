GO ?= go
BIN := bin/vhdfs
VERSION := $(shell git describe --always --dirty 2>/dev/null || echo dev)

# make install / uninstall: PREFIX=/usr/local by default; DESTDIR stages the tree
# elsewhere (a package's root).
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR = $(PREFIX)/bin
MAN1DIR = $(PREFIX)/share/man/man1
BASHCOMPDIR = $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR = $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR = $(PREFIX)/share/fish/vendor_completions.d
# make deb writes dist/vhdfs_VERSION_ARCH.deb.
DISTDIR ?= dist

COMPDIR := bin/completion
COMPLETIONS := $(COMPDIR)/vhdfs.bash $(COMPDIR)/_vhdfs $(COMPDIR)/vhdfs.fish
GOSRC := $(shell find . -name '*.go' ! -name '*_test.go' ! -path './test/*' ! -path './.git/*' 2>/dev/null) go.mod go.sum

.PHONY: all build man completions install uninstall deb demo test deps lint bench fuzz clean FORCE

# make builds what make install installs, so that `sudo make install` only copies.
all: build man/vhdfs.1 completions

# build always runs go build (which rebuilds only what changed); install and deb use
# $(BIN), made only when a Go file or the version changed, so `sudo make install`
# after `make` needs no Go toolchain in root's PATH.
build: bin/.version
	$(GO) build -ldflags "-X main.Version=$(VERSION)" -o $(BIN) ./cmd/vhdfs

$(BIN): $(GOSRC) bin/.version
	$(GO) build -ldflags "-X main.Version=$(VERSION)" -o $(BIN) ./cmd/vhdfs

# The version the binary was built with: rewritten only when it changes. A version of
# dev, git describe failing, says nothing new once bin/vhdfs is built: `sudo make
# install` runs git as root, which refuses a repository another user owns ("dubious
# ownership"), and would rebuild bin/vhdfs as root, with root's Go, only to call it dev.
bin/.version: FORCE
	@mkdir -p bin; if [ '$(VERSION)' = dev ] && [ -f $@ ] && [ -f $(BIN) ]; then exit 0; fi; \
		echo '$(VERSION)' | cmp -s - $@ || echo '$(VERSION)' > $@

man: build
	rm -rf man && mkdir man && $(BIN) man man

man/vhdfs.1: $(BIN)
	rm -rf man && mkdir man && $(BIN) man man

completions: $(COMPLETIONS)

$(COMPDIR)/vhdfs.bash: $(BIN)
	@mkdir -p $(COMPDIR); $(BIN) completion bash > $@.tmp && mv $@.tmp $@
$(COMPDIR)/_vhdfs: $(BIN)
	@mkdir -p $(COMPDIR); $(BIN) completion zsh > $@.tmp && mv $@.tmp $@
$(COMPDIR)/vhdfs.fish: $(BIN)
	@mkdir -p $(COMPDIR); $(BIN) completion fish > $@.tmp && mv $@.tmp $@

install: $(BIN) man/vhdfs.1 $(COMPLETIONS)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MAN1DIR) $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	install -m 755 $(BIN) $(DESTDIR)$(BINDIR)/vhdfs
	install -m 644 man/*.1 $(DESTDIR)$(MAN1DIR)/
	install -m 644 $(COMPDIR)/vhdfs.bash $(DESTDIR)$(BASHCOMPDIR)/vhdfs
	install -m 644 $(COMPDIR)/_vhdfs $(DESTDIR)$(ZSHCOMPDIR)/_vhdfs
	install -m 644 $(COMPDIR)/vhdfs.fish $(DESTDIR)$(FISHCOMPDIR)/vhdfs.fish

# Removes the files install writes (every man page is vhdfs.1 or vhdfs-COMMAND.1),
# not the directories, which other packages share.
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/vhdfs $(DESTDIR)$(MAN1DIR)/vhdfs.1 $(DESTDIR)$(MAN1DIR)/vhdfs-*.1 \
		$(DESTDIR)$(BASHCOMPDIR)/vhdfs $(DESTDIR)$(ZSHCOMPDIR)/_vhdfs $(DESTDIR)$(FISHCOMPDIR)/vhdfs.fish

# A Debian package of what install puts under /usr, built with dpkg-deb.
deb: $(BIN) man/vhdfs.1 $(COMPLETIONS)
	rm -rf $(DISTDIR)/root
	$(MAKE) --no-print-directory install DESTDIR=$(abspath $(DISTDIR))/root PREFIX=/usr
	scripts/deb.sh $(DISTDIR)/root $(DISTDIR) '$(VERSION)'

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
	rm -rf bin man dist
