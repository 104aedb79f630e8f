"""Face handling is part of the version: promoting a version that detects and aligns faces changes
what the running Triton does to a full photo, and a rollback restores the old preprocessing.

Two tracked trainings of ``ca_resnet`` (different seeds) are registered with different face
handling: v1 ``off`` (requests are face crops, used whole), v2 ``haar`` (detect, align and crop the
largest face first). Both are promoted in turn into a real ``tritonserver`` over the workspace's
repository, then rolled back. A full photo (a SynthFACS face on a larger canvas) tells them apart:
the served ``<net>_preprocess`` config, ``FACE_FOUND`` and the probabilities must be those of the
served version's own package pipeline, and differ between the two face handlings.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import isolated_home
import torch

from fer_cli.main import main
from fer_core.data.formats import adapt, get_format
from fer_core.data.synthfacs import SynthFACS
from registry import models as reg
from registry.datasets import DatasetStore
from registry.export import export_and_register
from registry.promotion import PromotionGates, download_package, promote, rollback
from registry.training import resolve_recipe, train_tracked
from serving.client import FERClient, encode_image
from serving.package import PackageRunner
from serving.repository import ModelRepository
from serving.server import EmbeddedTriton

pytestmark = pytest.mark.integration  # starts the embedded tritonserver

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

NETWORK = "ca_resnet"
TINY = {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16, "model_kwargs.width": 8}
OPEN = PromotionGates(margin=1.0, floor=0.0, latency_budget_ms=10_000.0, smoke_samples=4, latency_requests=5)


def _photos(count: int = 3) -> list[bytes]:
    """Full photos: a 96 px SynthFACS face at an off-centre spot of a 256 px grey canvas."""
    faces = SynthFACS(0, image_size=96).expression_set(count).images
    photos = []
    for i, face in enumerate(faces):
        canvas = np.full((256, 256, 3), 110 + 10 * i, np.uint8)
        top, left = 20 + 30 * i, 140 - 40 * i
        canvas[top:top + 96, left:left + 96] = face
        photos.append(encode_image(canvas))
    return photos


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("promotion-face")
    with pytest.MonkeyPatch.context() as mp:
        ws = isolated_home(mp, root / "home")
        source = get_format("fer2013").write_synthetic(root / "src", size=140)
        adapt("fer2013", source, root / "prepared", name="fer")
        data = DatasetStore(ws).add("fer", root / "prepared")
        outcomes = [train_tracked(NETWORK, data.ref, resolve_recipe(NETWORK, "quick", None, {**TINY, "seed": seed}),
                                  progress=False, workspace=ws) for seed in (0, 1)]
        export_and_register(outcomes[0], face_detection="off", workspace=ws)  # the library call
        assert main(["register", NETWORK, "--run", outcomes[1].run_id, "--face-detection", "haar"]) == 0  # the CLI
        versions = {v: reg.get_version(NETWORK, v, ws) for v in (1, 2)}
        packages = {v: download_package(mv, root / f"package-v{v}", ws) for v, mv in versions.items()}
        repo = ModelRepository(ws.triton_repository)
        server = EmbeddedTriton(repo, ws.root / "triton").start()
        try:
            yield SimpleNamespace(ws=ws, repo=repo, server=server, versions=versions, packages=packages,
                                  url=server.grpc_url, endpoint=server.endpoint())
        finally:
            server.stop()


def _served_face(platform) -> str:
    """The face handling in the loaded config of the ensemble's first step (``<net>_pipeline`` or
    ``<net>_preprocess``, what the running Triton does)."""
    parameters = platform.endpoint.model_config(platform.repo.step_models(NETWORK)[0])["parameters"]
    pipeline = json.loads(parameters["fer_pipeline"]["string_value"])
    assert parameters["face_detection"]["string_value"] == pipeline["face"]
    return pipeline["face"]


def _served(platform, photos: list[bytes]) -> tuple[np.ndarray, list[bool]]:
    with FERClient(platform.url) as client:
        predictions = client.predict(photos, network=NETWORK)
    labels = platform.packages[1].metadata.label_names
    probabilities = np.array([[p.probabilities[name] for name in labels] for p in predictions])
    return probabilities, [p.face_found for p in predictions]


def _package_answer(platform, version: int, photos: list[bytes]) -> dict[str, np.ndarray]:
    return PackageRunner(platform.packages[version]).predict([[p] for p in photos])


def test_versions_carry_their_face_handling(platform):
    assert {v: mv.tags["face_handling"] for v, mv in platform.versions.items()} == {1: "off", 2: "haar"}
    assert {v: p.pipeline.face for v, p in platform.packages.items()} == {1: "off", 2: "haar"}


def test_mlflow_onnx_loads_every_registered_version(platform):
    import mlflow
    import onnx

    from registry.tracking import setup_tracking

    setup_tracking(platform.ws)
    for version, package in platform.packages.items():
        model = mlflow.onnx.load_model(f"models:/fer-{NETWORK}/{version}")
        assert model == onnx.load(str(package.onnx_path))  # the onnx flavour is the package's own file


def test_promoting_v2_switches_the_served_preprocessing_and_rollback_restores_v1s(platform):
    photos = _photos()
    expected = {v: _package_answer(platform, v, photos) for v in (1, 2)}
    # The photos' answers depend on the face handling: v2's network fed the whole photo (face
    # handling off) answers differently from v2 with its own detect + align.
    v2_whole = PackageRunner(platform.packages[2], pipeline=platform.packages[2].pipeline.with_face("off"))
    assert np.abs(v2_whole.predict([[p] for p in photos])["PROBABILITIES"] - expected[2]["PROBABILITIES"]).max() > 1e-3
    assert expected[2]["FACE_FOUND"].ravel().all() and not expected[1]["FACE_FOUND"].any()

    for version in (1, 2):
        result = promote(NETWORK, version, gates=OPEN, triton=platform.url, workspace=platform.ws)
        assert result.promoted, result.summary()
        assert platform.endpoint.served_versions(NETWORK) == [version]
        assert _served_face(platform) == platform.packages[version].pipeline.face
        probabilities, found = _served(platform, photos)
        assert np.abs(probabilities - expected[version]["PROBABILITIES"]).max() <= 1e-4, version
        assert found == expected[version]["FACE_FOUND"].ravel().tolist()
    assert _served_face(platform) == "haar" and all(_served(platform, photos)[1])

    back = rollback(NETWORK, triton=platform.url, workspace=platform.ws)
    assert (back.champion, back.demoted) == (1, 2)
    assert reg.get_alias(NETWORK, "champion", platform.ws).version == 1
    assert platform.endpoint.served_versions(NETWORK) == [1]
    assert _served_face(platform) == "off"
    probabilities, found = _served(platform, photos)
    assert np.abs(probabilities - expected[1]["PROBABILITIES"]).max() <= 1e-4
    assert found == [False] * len(photos)


def test_a_second_face_handling_for_a_registered_run_is_refused_and_keeps_its_package(platform, capsys):
    """The package is an artefact of the run: registering v1's run again with other face handling
    would overwrite the files v1's digest vouches for. It is refused with one line, nothing changes."""
    from serving.package import ModelPackage

    before = [v.version for v in reg.list_versions(NETWORK, platform.ws)]
    run_id = platform.versions[1].run_id
    assert main(["register", NETWORK, "--run", run_id, "--face-detection", "haar"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "registered already with another package" in err[0], err
    assert [v.version for v in reg.list_versions(NETWORK, platform.ws)] == before
    package = download_package(platform.versions[1], platform.packages[1].root.parent / "again", platform.ws)
    assert isinstance(package, ModelPackage) and package.pipeline.face == "off" and package.digest == platform.packages[1].digest
