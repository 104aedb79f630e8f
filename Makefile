# Two commands set everything up on a fresh machine:
#   make demo   the whole pipeline end to end on generated data (embedded MLflow, DVC, Triton)
#   make test   the test suite (everything, servers included)
#   make test-fast  no servers, no slow learning tests (-m "not integration and not slow")
# Both bootstrap the virtualenv first (CPU torch pinned through requirements/constraints.txt).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

# Quiet, offline-friendly defaults for the embedded stack (see docs in README).
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv test test-fast demo clean help

help:
	@echo "make demo   run the whole pipeline on generated data (bootstraps .venv)"
	@echo "make test   run the test suite (bootstraps .venv)"
	@echo "make test-fast  the fast lane: no tests that start servers or learn (-m 'not integration and not slow')"
	@echo "make clean  remove the virtualenv and the workspace (.fer/)"

venv: $(STAMP)

$(STAMP): requirements/*.txt docker/requirements-deploy.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q -c requirements/constraints.txt -r requirements/test.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/fer demo

clean:
	rm -rf $(VENV) .fer
