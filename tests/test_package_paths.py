"""Every default network's registered, promoted version: training's decode, the MLflow pyfunc and the
Triton ensemble give the same probabilities (<= 1e-4) on the same raw held-out inputs, and
``mlflow.onnx.load_model`` loads the registered version.

One module-scoped platform (as ``tests/test_promotion.py`` builds its own): a workspace with a real
SQLite MLflow store and DVC store, for each network of ``list_networks(default_only=True)`` a little
generated data in the spec's own format (sized as ``tests/model_checks.py`` sizes it), one tiny
tracked training registered with :func:`registry.export.export_and_register`, an embedded
``tritonserver`` over the workspace's repository, and every version promoted with open gates.
The three paths are fed the held-out split of the data version (the same rows registration took
its smoke set from): training decodes them through the task's dataset and runs the PyTorch
checkpoint; the pyfunc and the ensemble get the rows' pixels PNG-encoded (lossless).
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import isolated_home
import torch

from fer_core.data.formats import adapt, get_format
from fer_core.models.catalog import get_network, list_networks
from registry import models as reg
from registry.datasets import DatasetStore
from registry.export import export_and_register, held_out_split, raw_sample
from registry.promotion import PromotionGates, _infer_raw, promote
from registry.training import resolve_recipe, train_tracked
from serving.ensembles import processing
from fer_core.metadata import metadata_from_json
from serving.package import METADATA_KEY, encode_png
from serving.repository import ModelRepository
from serving.server import EmbeddedTriton

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # trains five networks, starts tritonserver

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

NETWORKS = list_networks(default_only=True)
TINY = {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 8}
OPEN = PromotionGates(margin=1.0, floor=0.0, latency_budget_ms=10_000.0, smoke_samples=4, latency_requests=5)
SAMPLES = 6
ATOL = 1e-4
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("package-paths")
    with pytest.MonkeyPatch.context() as mp:
        ws = isolated_home(mp, root / "home")
        versions, outcomes = {}, {}
        for network in NETWORKS:
            spec = get_network(network)
            start = time.perf_counter()
            source = get_format(spec.data_format).write_synthetic(root / "src" / network, seed=0,
                                                                  size=max(40, spec.demo_size // 8))
            adapt(spec.data_format, source, root / "prepared" / network, name=f"{network}-data")
            data = DatasetStore(ws).add(f"{network}-data", root / "prepared" / network)
            outcome = train_tracked(network, data.ref, resolve_recipe(network, "quick", None, TINY), progress=False,
                                    workspace=ws)
            outcomes[network], versions[network] = outcome, export_and_register(outcome, workspace=ws)
            TIMINGS[f"{network} data+train+register s"] = time.perf_counter() - start
        repo = ModelRepository(ws.triton_repository)
        server = EmbeddedTriton(repo, ws.root / "triton").start()
        try:
            endpoint = server.endpoint()
            for network in NETWORKS:
                start = time.perf_counter()
                result = promote(network, versions[network].version, gates=OPEN, triton=endpoint, repository=repo,
                                 workspace=ws)
                assert result.promoted, result
                TIMINGS[f"{network} promote s"] = time.perf_counter() - start
            yield SimpleNamespace(ws=ws, endpoint=endpoint, versions=versions, outcomes=outcomes)
        finally:
            server.stop()
            print("\npackage-paths timings (2 shared CPU cores):",
                  json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


def _held_out(platform, network: str):
    """The held-out rows of the version's data: raw pixels, and training's decode of the same rows."""
    outcome = platform.outcomes[network]
    task, _, dataset = held_out_split(network, outcome.data_ref, outcome.recipe, platform.ws, "to compare on")
    count = min(SAMPLES, len(dataset))
    raw = [raw_sample(dataset.root, dataset.rows.iloc[i], task.meta) for i in range(count)]
    decoded = np.stack([dataset[i][0].numpy() for i in range(count)]).astype(np.float32)
    return raw, decoded, len(task.meta.input.shape) == 4


def _training_probabilities(platform, network: str, decoded: np.ndarray) -> np.ndarray:
    """Training's decode → the trained PyTorch checkpoint → the platform's post-processing."""
    from fer_core.training.trainer import load_model_from_checkpoint

    model, _ = load_model_from_checkpoint(platform.outcomes[network].result.best_checkpoint)
    with torch.no_grad():
        raw = model.outputs_as_dict(model.eval()(torch.from_numpy(decoded)))
    outputs = {name: value.numpy() for name, value in raw.items()}
    return processing.postprocess(outputs, model.metadata, np.zeros((len(decoded), 2, 3), np.float32))[
        "PROBABILITIES"]


@pytest.mark.parametrize("network", NETWORKS)
def test_training_decode_pyfunc_and_triton_ensemble_agree(platform, network):
    import mlflow

    from registry.tracking import setup_tracking

    champion = reg.get_alias(network, "champion", platform.ws)
    assert champion is not None and champion.version == platform.versions[network].version
    assert champion.tags["face_handling"] == "off"  # the held-out rows are crops, used whole
    raw, decoded, clip = _held_out(platform, network)
    encoded = [[encode_png(frame) for frame in sample] for sample in raw]
    training = _training_probabilities(platform, network, decoded)

    setup_tracking(platform.ws)
    model = mlflow.pyfunc.load_model(f"models:/{reg.registered_name(network)}@champion")
    frame = pd.DataFrame({"frames": encoded}) if clip else pd.DataFrame({"image": [s[0] for s in encoded]})
    pyfunc = np.array(model.predict(frame)["probabilities"].tolist(), dtype=np.float64)

    name = "FRAMES" if clip else "IMAGE"
    triton = np.stack([_infer_raw(platform.endpoint, f"{network}_ensemble", name, s) for s in encoded])

    assert pyfunc.shape == triton.shape == training.shape
    diffs = {"pyfunc": float(np.abs(pyfunc - training).max()), "triton": float(np.abs(triton - training).max()),
             "pyfunc vs triton": float(np.abs(pyfunc - triton).max())}
    print(f"\n{network} v{champion.version}: max |diff| vs training decode " + json.dumps(
        {k: f"{v:.1e}" for k, v in diffs.items()}))
    assert max(diffs.values()) <= ATOL, (network, diffs)


@pytest.mark.parametrize("network", NETWORKS)
def test_mlflow_onnx_loads_every_registered_version(platform, network):
    import mlflow
    import onnx

    from registry.tracking import setup_tracking

    setup_tracking(platform.ws)
    versions = reg.list_versions(network, platform.ws)
    assert versions
    for version in versions:
        loaded = mlflow.onnx.load_model(f"models:/{reg.registered_name(network)}/{version.version}")
        onnx.checker.check_model(loaded)
        metadata = metadata_from_json({p.key: p.value for p in loaded.metadata_props}[METADATA_KEY])
        assert metadata.name == network
        assert [i.name for i in loaded.graph.input] == [metadata.input.name]
        assert [o.name for o in loaded.graph.output] == list(metadata.output_names)
