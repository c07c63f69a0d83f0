# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: on these machines 2.13.0 is a CPU wheel on disk; an unpinned torch
# (asked for directly or by a dependency) would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-slow test-gpu bench lint clean

$(BIN)/alignctl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/alignctl

# SFT on the built-in task, then DPO from it; each prints held-out exact-match accuracy before and after.
demo: install
	$(BIN)/alignctl train recipe=sft hydra.run.dir=runs/demo/sft
	$(BIN)/alignctl train recipe=dpo inputs.policy=runs/demo/sft hydra.run.dir=runs/demo/dpo

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

lint: install
	$(BIN)/ruff check alignctl tests scripts

clean:
	rm -rf $(VENV) build dist *.egg-info runs
