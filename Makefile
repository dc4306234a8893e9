# wsimil: two commands do all the set-up on a fresh machine.
#   make demo   install, then run the whole pipeline (dvc repro) on the embedded demo cohort
#   make test   install, then lint (ruff, import contracts) and the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Telemetry off for every tool we start (also set by the CLI itself).
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The venv's bin must be on PATH: `mlflow models serve` spawns uvicorn through the shell.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test test-fast lint lock clean

install: $(STAMP)

# One locked set. uv installs it exactly (torch, torchvision and timm together);
# the package itself goes in with --no-deps so nothing can swap torch afterwards.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==0.13.8
	$(BIN)/uv pip install --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	# Bytecode once, here: every CLI process otherwise recompiles ~5,000 modules (about
	# 15 s each) where PYTHONDONTWRITEBYTECODE is set. A few third-party files that are not
	# Python 3 (templates, test fixtures) fail to compile; that is expected.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	$(BIN)/python -c "import torch, torchvision, timm; assert torch.__version__.startswith('2.15.0'), torch.__version__"
	touch $(STAMP)

demo: install
	$(BIN)/python -m wsimil doctor
	time $(BIN)/dvc repro
	$(BIN)/dvc metrics show || true

# In parallel, one worker per core (pytest-xdist); --dist loadfile keeps each test file on one
# worker, so a module's fixtures (a trained project, a server) are built once.
test: lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=25

test-fast: lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

# Style and architecture: ruff's lint and format, and import-linter's contracts
# (pyproject.toml: stages import down the data flow; models/train free of MLflow & co).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Re-resolve the lock after editing requirements.in.
lock:
	$(BIN)/uv pip compile requirements.in --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
