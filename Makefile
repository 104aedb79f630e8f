# Two commands set everything up on a fresh machine:
#   make demo   the whole pipeline end to end on generated data (embedded MLflow, DVC, Triton)
#   make test   the test suite (everything, servers included)
#   make test-fast  no servers, no slow learning tests (-m "not integration and not slow")
# Both bootstrap the virtualenv first: every version comes from the lock requirements/constraints.txt,
# torch's CPU build from the PyTorch CPU index (TORCH_INDEX_URL; e.g. .../whl/cu128 for CUDA, or a
# mirror). A machine without that index finds the wheel in pip's own find-links/indexes instead.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
LOCK   := requirements/constraints.txt

# Quiet, offline-friendly defaults for the embedded stack (see docs in README).
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv test test-fast demo clean help lock

help:
	@echo "make demo   run the whole pipeline on generated data (bootstraps .venv)"
	@echo "make test   run the test suite (bootstraps .venv)"
	@echo "make test-fast  the fast lane: no tests that start servers or learn (-m 'not integration and not slow')"
	@echo "make clean  remove the virtualenv and the workspace (.fer/)"

venv: $(STAMP)

# torch alone from TORCH_INDEX_URL (--no-deps: its dependencies come with the rest, from the lock).
$(STAMP): requirements/*.txt docker/requirements-deploy.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q --no-deps --index-url $(TORCH_INDEX_URL) -c $(LOCK) torch
	$(PIP) install -q -c $(LOCK) -r requirements/test.txt -e ".[all]"
	touch $(STAMP)

# Re-pin after adding a package: the lock is this venv's exact versions (see requirements/lock.py).
lock: $(STAMP)
	$(PY) requirements/lock.py > $(LOCK).new && mv $(LOCK).new $(LOCK)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/fer demo

clean:
	rm -rf $(VENV) .fer
