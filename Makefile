# The README's commands live here so that the README, CI and newcomers never drift apart.
#   make demo   set up .venv and run the main job on the built-in digits set
#   make test   set up .venv, lint, run the default test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo-out

.PHONY: setup demo test test-slow test-all lint bench clean

$(BIN)/flatdino: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/flatdino

demo: setup
	$(BIN)/flatdino extract-features --data digits --split train --backbone tiny --out $(DEMO)/features-train.zarr
	$(BIN)/flatdino extract-features --data digits --split val --backbone tiny --out $(DEMO)/features-val.zarr
	$(BIN)/flatdino train-vae --features $(DEMO)/features-train.zarr --val-features $(DEMO)/features-val.zarr \
		--out $(DEMO)/runs/vae --preset tiny --steps 300 --batch-size 64 --lr 1e-3 --num-workers 0 --resume
	$(BIN)/flatdino encode-latents --features $(DEMO)/features-train.zarr --vae $(DEMO)/runs/vae \
		--out $(DEMO)/latents-train.zarr --backend local
	$(BIN)/flatdino train-dit --latents $(DEMO)/latents-train.zarr --out $(DEMO)/runs/dit --preset tiny \
		--steps 2000 --batch-size 64 --lr 1e-3 --ema-decay 0.995 --log-every 200 --resume
	$(BIN)/flatdino train-decoder --features $(DEMO)/features-train.zarr --out $(DEMO)/runs/decoder --preset tiny \
		--steps 300 --batch-size 32 --lr 1e-3 --noise-tau 0 --num-workers 0 --log-every 50 --resume
	$(BIN)/flatdino sample --dit $(DEMO)/runs/dit --decoder $(DEMO)/runs/decoder --out $(DEMO)/samples \
		--classes all --per-class 8

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

test-slow: setup
	$(BIN)/pytest -m slow

test-all: lint
	$(BIN)/pytest -m ''

bench: setup
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/vae_loader.py
	$(BIN)/python bench/dit_cost.py
	$(BIN)/python bench/sample.py

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
