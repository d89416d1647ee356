# The README's commands live here so that the README, CI and newcomers never drift apart.
#   make demo   set up .venv and run the main job on the built-in digits set
#   make test   set up .venv, lint, run the default test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo-out

.PHONY: setup demo test test-slow test-all lint coverage bench clean

$(BIN)/flatdino: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/flatdino

demo: setup
	$(BIN)/flatdino demo --out $(DEMO)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/basedpyright --pythonpath $(BIN)/python

test: lint
	$(BIN)/pytest

test-slow: setup
	$(BIN)/pytest -m slow

test-all: lint
	$(BIN)/pytest -m ''

# Both suites under coverage.py, then the ledger of library lines no test runs (docs/coverage.md).
# A failing test still gets its ledger printed; make then fails with the tests' status.
coverage: setup
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest -m '' -q; status=$$?; \
	$(BIN)/coverage combine -q && $(BIN)/python tests/coverage_ledger.py && exit $$status

bench: setup
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/vae_loader.py
	$(BIN)/python bench/dit_cost.py
	$(BIN)/python bench/sample.py
	$(BIN)/python bench/sample_tokens.py
	$(BIN)/python bench/eval_fid.py

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
