"""``FER_MODEL_REPOSITORY=s3://bucket/prefix``: the working copy is published to the bucket and the
real ``tritonserver`` serves from Triton's own ``s3://`` repository support.

The S3 API is moto's stand-alone server, the one test_backends_s3.py runs (its fixtures are reused).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_backends_s3 import _keys, s3_endpoint, s3_env  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.integration  # a moto server; the second test starts tritonserver

BUCKET = "triton"


@pytest.fixture
def s3_workspace(workspace, s3_env, monkeypatch):
    """The context an entry point builds with the repository on S3."""
    from fer_platform.workspace import Workspace

    try:
        s3_env.create_bucket(Bucket=BUCKET)
    except s3_env.exceptions.BucketAlreadyOwnedByYou:
        pass
    for page in s3_env.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):  # a clean prefix per test
        for obj in page.get("Contents", []):
            s3_env.delete_object(Bucket=BUCKET, Key=obj["Key"])
    monkeypatch.setenv("FER_MODEL_REPOSITORY", f"s3://{BUCKET}/models")
    return Workspace.load()


def _onnx(tmp_path: Path, seed: int) -> Path:
    import torch

    from fer_core.models import create_model
    from serving.export import export_onnx

    torch.manual_seed(seed)
    return export_onnx(create_model("ca_resnet", width=4).eval(), tmp_path / f"ca-{seed}.onnx")


def test_publish_makes_the_bucket_equal_to_the_working_copy(s3_workspace, s3_env, tmp_path):
    from serving.repository import ModelRepository

    repo = ModelRepository.of_workspace(s3_workspace)
    assert repo.mirror is not None and repo.root == s3_workspace.root / "triton" / "models"
    assert repo.triton_location.startswith("s3://http://127.0.0.1:") and repo.triton_location.endswith("/triton/models")
    repo.install("ca_resnet", 1, _onnx(tmp_path, 1))
    report = repo.mirror.publish()
    keys = set(_keys(s3_env, BUCKET))
    assert {"models/ca_resnet/1/model.onnx", "models/ca_resnet/config.pbtxt",
            "models/ca_resnet_ensemble/config.pbtxt"} <= keys
    assert not any("/." in k for k in keys), keys  # the platform's own state stays local
    configs = [i for i, rel in enumerate(report.uploaded) if rel.endswith("config.pbtxt")]
    assert configs == list(range(len(report.uploaded) - len(configs), len(report.uploaded)))  # configs last

    again = repo.mirror.publish()
    assert again.uploaded == () and again.deleted == () and again.unchanged == len(report.uploaded)

    repo.write_model("ca_resnet", 2, _onnx(tmp_path, 2), keep_versions=[1])
    repo.remove_models(["ca_resnet_ensemble"])
    third = repo.mirror.publish()
    keys = set(_keys(s3_env, BUCKET))
    assert "models/ca_resnet/2/model.onnx" in keys and "models/ca_resnet/1/model.onnx" in keys
    assert not any(k.startswith("models/ca_resnet_ensemble/") for k in keys)
    assert "ca_resnet_ensemble/config.pbtxt" in third.deleted


def test_triton_serves_the_repository_from_the_bucket(s3_workspace, s3_env, tmp_path):
    pytest.importorskip("pytriton")
    import shutil

    import numpy as np

    from serving.client import FERClient
    from serving.repository import ModelRepository
    from serving.server import EmbeddedTriton

    repo = ModelRepository.of_workspace(s3_workspace)
    repo.install("ca_resnet", 1, _onnx(tmp_path, 1))
    with EmbeddedTriton(repo, s3_workspace.root / "triton", models=repo.load_order()) as server:
        assert not server.load_failures, server.load_failures
        face = np.random.default_rng(0).integers(0, 255, (48, 48), dtype=np.uint8)
        with FERClient(server.grpc_url, key=server.key) as client:
            assert client.predict([face], network="ca_resnet")[0].label
        # A new version reaches Triton only through the bucket: drop the local copy of version 1
        # after publishing, load, and Triton still serves both (it reads S3, not the folder).
        repo.write_model("ca_resnet", 2, _onnx(tmp_path, 2), keep_versions=[1])
        endpoint = server.endpoint()
        endpoint.load("ca_resnet")  # publishes first (before_load)
        assert endpoint.served_versions("ca_resnet") == [1, 2]
        assert "models/ca_resnet/2/model.onnx" in _keys(s3_env, BUCKET)
        shutil.rmtree(repo.root / "ca_resnet" / "2")
        endpoint.before_load = None  # no publish: the bucket still has version 2
        endpoint.load("ca_resnet")
        assert endpoint.served_versions("ca_resnet") == [1, 2]
