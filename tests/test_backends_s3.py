"""MLflow artifacts and the DVC remote on an S3 API, configured through the settings object.

The S3 server is moto's stand-alone server (``python -m moto.server``) in its own process on
127.0.0.1: an emulation of the S3 REST API (signatures, multipart uploads, listing) that s3fs,
which DVC's S3 remote uses, runs its own test suite against. It is not MinIO: MinIO-specific
behaviour (erasure coding, its IAM policies) is not covered, the S3 protocol the platform speaks is.

Skipped with the reason when moto, boto3 or dvc-s3 is missing on a developer machine; with ``CI``
set, that is a failure instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGION = "us-east-1"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it: see docs/deployment.md, 'Testing the backends')")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """URL of a fresh S3 server with buckets ``mlflow`` and ``dvc``."""
    for module, requirement in (("moto", "moto[server]"), ("boto3", "boto3"), ("dvc_s3", "dvc-s3")):
        try:
            __import__(module)
        except ImportError:
            _unavailable(f"{module} is not installed (requirement: {requirement})")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.3)
        import boto3

        client = boto3.client("s3", endpoint_url=url, region_name=REGION, aws_access_key_id="fer-test",
                              aws_secret_access_key="fer-test-secret")
        for bucket in ("mlflow", "dvc"):
            client.create_bucket(Bucket=bucket)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Credentials the way the stack passes them: environment only."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fer-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fer-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("FER_S3_ENDPOINT_URL", s3_endpoint)
    # setup_tracking exports MLFLOW_S3_ENDPOINT_URL from the settings; make monkeypatch undo it.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "placeholder")
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL")
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)


def _keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_mlflow_artifacts_and_model_go_to_s3(workspace, s3_env, tmp_path, monkeypatch):
    import mlflow
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from training_toy import ToyTask, toy_recipe

    from fer_core.training.trainer import Trainer
    from registry.tracking import MlflowCallback

    torch.set_num_threads(1)
    monkeypatch.setenv("FER_ARTIFACT_ROOT", "s3://mlflow/artifacts")
    from fer_platform.workspace import Workspace

    callback = MlflowCallback("toy_net", tmp_path / "run", workspace=Workspace.load())  # the context of the env above
    Trainer(toy_recipe(epochs=1), ToyTask(), tmp_path / "run", callbacks=[callback]).fit()

    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == os.environ["FER_S3_ENDPOINT_URL"]
    run = mlflow.get_run(callback.run_id)
    assert run.info.artifact_uri == f"s3://mlflow/artifacts/toy_net/{callback.run_id}/artifacts"
    keys = _keys(s3_env, "mlflow")
    prefix = f"artifacts/toy_net/{callback.run_id}/artifacts/"
    assert prefix + "checkpoint/best.pt" in keys and prefix + "plots/learning_curves.png" in keys
    assert not (workspace.mlflow_artifacts).exists() or not any(workspace.mlflow_artifacts.rglob("*.pt"))
    import torch

    model = mlflow.pytorch.load_model(callback.model_info.model_uri)  # downloaded back from S3
    assert mlflow.models.get_model_info(callback.model_info.model_uri).metadata["fer_metadata"]["name"] == "toy_net"
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_dvc_remote_on_s3_round_trips_a_dataset(workspace, s3_env, tmp_path, monkeypatch):
    import shutil

    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_versions import _prepared, _tree_digest

    from registry.datasets import DatasetStore

    from fer_platform.workspace import Workspace

    monkeypatch.setenv("FER_DVC_REMOTE", "s3://dvc/fer")
    workspace = Workspace.load()  # the context of the environment above
    store = DatasetStore(workspace)
    assert store.remote_url == "s3://dvc/fer"
    version = store.add("toy", _prepared(tmp_path / "a", seed=1), source="unit")
    digest = _tree_digest(store.path("toy"))
    keys = _keys(s3_env, "dvc")
    assert any(k.startswith("fer/files/md5/") and k.endswith(".dir") for k in keys), keys
    assert not workspace.dvc_remote.exists()  # nothing went to the local default remote

    # A clean workspace (no cache, no index): the hash and the S3 remote restore the data.
    shutil.rmtree(workspace.dvc_repo)
    restored = DatasetStore(workspace).pull("toy", version.version)
    assert _tree_digest(restored) == digest
