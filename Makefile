# canhazgpu: `make demo` to try it, `make test` to check it.
PYTHON ?= python3
# Python modules the tests need (each is also its pip name).
PY_DEPS := redis psutil fakeredis lupa pytest hypothesis ruff

.PHONY: all deps test lint format demo clean

all: test

# Idempotent: installs only what is missing, so a second run takes a fraction of a second.
deps:
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing redis-server (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "redis-server is missing: install it (e.g. sudo apt-get install redis-server) and re-run" >&2; \
	    exit 1; \
	  fi; \
	fi
	@missing=$$($(PYTHON) -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' $(PY_DEPS)); \
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

test: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q

lint: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: deps
	$(PYTHON) -m ruff format .

demo: deps
	PYTHON=$(PYTHON) bash demo.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
