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

.PHONY: install chromium run migrate test test-fast lint format lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel $(QUIET)
	$(PIP) install torch==$(TORCH_VERSION) $(QUIET)
	$(PY) -c "import torch; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	$(PIP) install -c constraints.txt -e '.[dev]' $(QUIET)
	$(PY) -c "import api.main, worker.tasks, core.pipeline, shears.cli"
	touch $(STAMP)

install: $(STAMP)

migrate: install
	$(PY) -m shears.cli migrate

run: install
	$(PY) -m shears.cli serve

# The dashboard tests drive the system's Chromium (Debian's package: Playwright downloads no
# browser). Installed here when missing and apt-get is usable; otherwise those tests say how.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get install -y -qq chromium >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; \
	    else echo "Chromium is missing: apt-get install -y chromium (the dashboard tests need it)"; fi; }

test: install chromium
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

# After upgrading a dependency on purpose (pip install -U X, suite green): pin what is installed.
lock: install
	{ head -2 constraints.txt; $(PIP) freeze --exclude-editable | grep -v -E "^(torch|pip|setuptools|wheel)=="; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .shears .pytest_cache .mypy_cache .ruff_cache
