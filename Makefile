# `make run` and `make test` set themselves up: a virtual environment with pip, torch 2.13.0 first
# (the CPU wheel where no GPU is; a bare `torch` would pull GBs of CUDA packages), then the project.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shears-installed
PIP := $(PY) -m pip --disable-pip-version-check -q
# This machine's pip config names local indexes that may be absent; drop those warnings only.
QUIET := 2>&1 | { grep -v "is ignored: it is neither" || true; }
TORCH_VERSION := 2.13.0

.PHONY: install run migrate test test-fast lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel $(QUIET)
	$(PIP) install torch==$(TORCH_VERSION) $(QUIET)
	$(PY) -c "import torch; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	$(PIP) install -e '.[dev]' $(QUIET)
	$(PY) -c "import api.main, worker.tasks, core.pipeline, shears.cli"
	touch $(STAMP)

install: $(STAMP)

migrate: install
	$(PY) -m shears.cli migrate

run: install
	$(PY) -m shears.cli serve

test: install
	$(PY) -m pytest

# The in-process tiers only (no uvicorn or Celery processes): the fast feedback loop.
test-fast: install
	$(PY) -m pytest tests/api tests/core

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy api worker core shears
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .shears .pytest_cache .mypy_cache .ruff_cache
