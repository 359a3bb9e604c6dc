# canhazgpu: `make demo` to try it, `make test` to check it.
PYTHON ?= python3
# Python modules canhazgpu needs to run, and those the tests add (each is also its pip name).
PY_RUNTIME := redis psutil
PY_DEPS := $(PY_RUNTIME) fakeredis lupa pytest hypothesis ruff

.PHONY: all deps runtime-deps test lint format demo clean bench
.PHONY: shell-deps packaging-deps install uninstall man completions

all: test

# Idempotent: installs only what is missing, so a second run takes a fraction of a second.
# `make demo` needs only redis-server and the runtime packages (runtime-deps); the
# shells, Chromium and Debian's Python packages are for the tests.
deps: shell-deps packaging-deps
	@$(MAKE) --no-print-directory runtime-deps PY_RUNTIME="$(PY_DEPS)"

runtime-deps:
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing redis-server (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "redis-server is missing: install it (e.g. sudo apt-get install redis-server) and re-run" >&2; \
	    exit 1; \
	  fi; \
	fi
	@missing=$$($(PYTHON) -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' $(PY_RUNTIME)); \
	if [ -n "$$missing" ]; then \
	  if ! $(PYTHON) -m pip --version >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip; \
	    else \
	      echo "pip is missing for $(PYTHON): install it (e.g. sudo apt-get install python3-pip) and re-run" >&2; \
	      exit 1; \
	    fi; \
	  fi; \
	  echo "Installing Python packages: $$missing"; \
	  $(PYTHON) -m pip install -q $$missing 2>/dev/null \
	    || $(PYTHON) -m pip install -q --break-system-packages $$missing; \
	fi

# The web tests: prometheus_client parses /metrics; Playwright drives Debian's Chromium,
# installed here with apt (Playwright never downloads a browser of its own).
PY_DEPS += prometheus_client playwright
.PHONY: web-deps
deps: web-deps
web-deps:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing chromium (apt-get) for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "chromium is missing, so the browser tests skip (sudo apt-get install chromium)" >&2; \
	  fi; \
	fi

# The formatter that `make test` checks against: a newer ruff may format otherwise.
RUFF_VERSION := 0.17.6
.PHONY: ruff-version
deps: ruff-version
ruff-version: runtime-deps
	@$(PYTHON) -m ruff --version 2>/dev/null | grep -qx 'ruff $(RUFF_VERSION)' || { \
	  echo "Installing ruff $(RUFF_VERSION)"; \
	  $(PYTHON) -m pip install -q ruff==$(RUFF_VERSION) 2>/dev/null \
	    || $(PYTHON) -m pip install -q --break-system-packages ruff==$(RUFF_VERSION); }

test: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q

lint: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: deps
	$(PYTHON) -m ruff format .

demo: runtime-deps
	PYTHON=$(PYTHON) bash demo.sh

# Every benchmark, as one table of medians and ratios (bench/README.md); JSON in
# bench/results.json.  Not part of `make test`: timings are no assertions.
bench: deps
	cd bench && $(PYTHON) run.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# --------------------------------------------------------------------------- shells, packaging
# The completion tests drive bash (with Debian's bash-completion), zsh and fish; the install
# tests run the copied file with the distribution's /usr/bin/python3 and its python3-redis
# and python3-psutil (the oldest redis-py we support) and check the man page with groff.
shell-deps:
	@missing=""; \
	[ -f /usr/share/bash-completion/bash_completion ] || missing="$$missing bash-completion"; \
	command -v zsh >/dev/null 2>&1 || missing="$$missing zsh"; \
	command -v fish >/dev/null 2>&1 || missing="$$missing fish"; \
	command -v groff >/dev/null 2>&1 || missing="$$missing groff-base"; \
	for pkg in python3-redis python3-psutil; do \
	  dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing$$missing (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get -o DPkg::Lock::Timeout=300 install -y -qq $$missing; \
	  else \
	    echo "missing:$$missing; install them (e.g. sudo apt-get install$$missing) and re-run" >&2; \
	    exit 1; \
	  fi; \
	fi

# `setup.py bdist_wheel` needs the wheel package (setuptools < 70.1 has no bdist_wheel).  This
# runs before deps installs pip: without pip, the distribution's packages do (as root).
packaging-deps:
	@if ! $(PYTHON) -c 'import setuptools, wheel' 2>/dev/null; then \
	  if $(PYTHON) -m pip --version >/dev/null 2>&1; then \
	    echo "Installing Python packages: setuptools wheel"; \
	    $(PYTHON) -m pip install -q setuptools wheel 2>/dev/null \
	      || $(PYTHON) -m pip install -q --break-system-packages setuptools wheel; \
	  elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing python3-setuptools python3-wheel (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get -o DPkg::Lock::Timeout=300 install -y -qq python3-setuptools python3-wheel; \
	  else \
	    echo "setuptools and wheel are missing for $(PYTHON): install them and re-run" >&2; \
	    exit 1; \
	  fi; \
	fi

# `make install` (PREFIX=/usr/local, DESTDIR for staging): the program, its short name, the
# completions where bash-completion, zsh and fish look for them, and the man page.  The
# script runs with INSTALL_PYTHON, by default the distribution's python3 (whose
# python3-redis and python3-psutil it uses), so that an activated conda or virtual
# environment without redis does not break it.
PREFIX ?= /usr/local
INSTALL_PYTHON ?= $(if $(wildcard /usr/bin/python3),/usr/bin/python3,/usr/bin/env python3)
BINDIR = $(DESTDIR)$(PREFIX)/bin
LIBDIR = $(PREFIX)/lib/canhazgpu
BASHCOMPDIR = $(DESTDIR)$(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR = $(DESTDIR)$(PREFIX)/share/zsh/site-functions
FISHCOMPDIR = $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
MAN1DIR = $(DESTDIR)$(PREFIX)/share/man/man1

# The program goes to $(LIBDIR) with its bytecode, compiled now by the Python that will
# run it; bin/canhazgpu is a launcher that imports it (a script run as such is compiled
# anew on every call, some 70 ms for its 6,000 lines).
install:
	install -d $(BINDIR) $(DESTDIR)$(LIBDIR) $(BASHCOMPDIR) $(ZSHCOMPDIR) $(FISHCOMPDIR) $(MAN1DIR)
	install -m 644 canhazgpu.py $(DESTDIR)$(LIBDIR)/canhazgpu.py
	$(INSTALL_PYTHON) -m compileall -q -d $(LIBDIR) $(DESTDIR)$(LIBDIR)
	sed -e '1s|^#!.*|#!$(INSTALL_PYTHON)|' -e 's|/usr/local/lib/canhazgpu|$(LIBDIR)|' \
	  contrib/canhazgpu-launcher > $(BINDIR)/canhazgpu.tmp
	chmod 755 $(BINDIR)/canhazgpu.tmp && mv -f $(BINDIR)/canhazgpu.tmp $(BINDIR)/canhazgpu
	ln -sf canhazgpu $(BINDIR)/chg
	install -m 644 completions/canhazgpu.bash $(BASHCOMPDIR)/canhazgpu
	ln -sf canhazgpu $(BASHCOMPDIR)/chg
	install -m 644 completions/_canhazgpu $(ZSHCOMPDIR)/_canhazgpu
	install -m 644 completions/canhazgpu.fish $(FISHCOMPDIR)/canhazgpu.fish
	ln -sf canhazgpu.fish $(FISHCOMPDIR)/chg.fish
	install -m 644 canhazgpu.1 $(MAN1DIR)/canhazgpu.1
	ln -sf canhazgpu.1 $(MAN1DIR)/chg.1

uninstall:
	rm -rf $(DESTDIR)$(LIBDIR)
	rm -f $(BINDIR)/canhazgpu $(BINDIR)/chg $(BASHCOMPDIR)/canhazgpu $(BASHCOMPDIR)/chg \
	  $(ZSHCOMPDIR)/_canhazgpu $(FISHCOMPDIR)/canhazgpu.fish $(FISHCOMPDIR)/chg.fish \
	  $(MAN1DIR)/canhazgpu.1 $(MAN1DIR)/chg.1

# The man page and the option lists of the bash and fish completions are generated from
# the argparse parser; tests fail when they are out of date.
man:
	$(PYTHON) tools/gen_man.py > canhazgpu.1.tmp && mv canhazgpu.1.tmp canhazgpu.1

completions:
	$(PYTHON) tools/gen_completions.py
