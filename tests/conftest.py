"""Shared fixtures: an isolated workspace per test and deterministic, thread-limited torch."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def _torch_determinism():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks(monkeypatch):
    """``mlflow.set_tracking_uri`` writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` (for subprocesses),
    so one test's store would become the next test's "user-set" URI: every test starts without it, and
    MLflow's process-wide URIs are put back afterwards."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FER_MLFLOW_URI_SET_BY_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    try:
        import mlflow.tracking._model_registry.utils as registry_utils
        import mlflow.tracking._tracking_service.utils as tracking_utils
    except ImportError:  # pragma: no cover
        yield
        return
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    yield
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved


# Variables that would point a test's platform somewhere other than its own fresh $FER_HOME.
PLATFORM_ENV_VARS = ("FER_TRACKING_URI", "FER_REGISTRY_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                     "FER_DVC_REMOTE", "FER_CONFIG", "FER_ARTIFACT_ROOT", "FER_S3_ENDPOINT_URL", "FER_TRITON_URL",
                     "FER_MODEL_REPOSITORY", "FER_FACE_DETECTION")


def isolated_home(mp: pytest.MonkeyPatch, root):
    """Point ``$FER_HOME`` at ``root``, clear :data:`PLATFORM_ENV_VARS`, return the ensured workspace
    (module fixtures call it inside ``pytest.MonkeyPatch.context()``)."""
    from fer_platform.workspace import Workspace

    mp.setenv("FER_HOME", str(root))
    for var in PLATFORM_ENV_VARS:
        mp.delenv(var, raising=False)
    return Workspace(root).ensure()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh ``$FER_HOME`` for the test."""
    return isolated_home(monkeypatch, tmp_path / "fer-home")
