# Two commands set everything up on a fresh machine:
#   make demo   the whole pipeline end to end on generated data (embedded MLflow, DVC, Triton)
#   make test   the test suite (everything, servers included)
#   make test-fast  no servers, no slow learning tests (-m "not integration and not slow")
#   make images-local  the stack's images on a host without registry access (Debian base made here)
#   make stack-test    the production stack in Docker, end to end (slow; not part of `make test`)
# Both bootstrap the virtualenv first: every version comes from the lock requirements/constraints.txt,
# torch's CPU build from the PyTorch CPU index (TORCH_INDEX_URL; e.g. .../whl/cu128 for CUDA, or a
# mirror). A machine without that index finds the wheel in pip's own find-links/indexes instead.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Test files run in parallel, one worker per core (pytest-xdist; a file stays on one worker, so its
# module fixtures are built once). PYTEST_WORKERS=0 runs them in this process, one after another.
PYTEST_WORKERS ?= auto
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
LOCK   := requirements/constraints.txt

# Quiet, offline-friendly defaults for the embedded stack (see docs in README).
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv test test-fast demo clean help lock perf-tools engine images-local stack-test

help:
	@echo "make demo   run the whole pipeline on generated data (bootstraps .venv)"
	@echo "make test   run the test suite (bootstraps .venv)"
	@echo "make test-fast  the fast lane: no tests that start servers or learn (-m 'not integration and not slow')"
	@echo "make images-local  build the Docker images from a Debian base made here (no registry needed)"
	@echo "make stack-test  the compose stack end to end in Docker (slow; not part of make test)"
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
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=30 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not integration and not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/fer demo

# NVIDIA's perf_analyzer in its own venv (.venv-perf: tritonclient 2.41 ships the binary; the platform
# pins 2.73), plus Debian's libb64-0d; prints the wrapper's path. Used by bench/perf_analyzer.py.
perf-tools:
	bench/perf_tools.sh

# The Docker stack on this kind of host (see docs/deployment.md): an engine on the host network only,
# images FROM a debootstrapped Debian base, the stack test against docker/compose.local.yaml.
engine:
	docker/local/engine.sh

images-local: engine
	docker/local/images.sh

stack-test: images-local $(STAMP)
	$(PY) docker/local/stack_test.py

clean:
	rm -rf $(VENV) .fer
