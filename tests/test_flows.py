"""Prefect flows end to end on tiny generated data: real Prefect API (test harness), real DVC,
MLflow (SQLite), Great Expectations and tritonserver; no mocks.

One module-scoped workspace and Triton serve three tests in order: the first ``retrain_all``
trains and promotes two networks, a re-run skips both as unchanged, and a corrupted dataset stops
at the data gate with nothing registered or served.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from fer_core.data.formats import DataFormat, get_format, register_format  # noqa: E402
from tests.corruptions import CORRUPTIONS  # noqa: E402

pytestmark = pytest.mark.integration  # starts Prefect flows (temporary local Prefect API server) and the embedded Triton

NETWORKS = ("ca_resnet", "au_cotrain")
SIZES = {"fer2013": 140, "au_table": 64}
TINY = {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16}
OVERRIDES = {"ca_resnet": {**TINY, "model_kwargs.width": 8}, "au_cotrain": TINY}
# Tiny models on tiny data are near chance: no floor, and a latency budget for a loaded shared CPU.
GATES = {"floor": 0.0, "latency_budget_ms": 2000.0, "smoke_samples": 4, "latency_requests": 5}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """FER workspace + Prefect test API + embedded Triton, shared by the tests of this module."""
    import torch
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from fer_platform.workspace import Workspace
    from serving.repository import ModelRepository
    from serving.server import EmbeddedTriton

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("flows")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_HOME", str(root / "fer-home"))
        for var in ("FER_TRACKING_URI", "FER_REGISTRY_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                    "FER_DVC_REMOTE", "FER_TRITON_URL"):
            mp.delenv(var, raising=False)
        workspace = Workspace.load().ensure()
        sources = {}
        for network, (name, fmt) in {"ca_resnet": ("fer", "fer2013"), "au_cotrain": ("au", "au_table")}.items():
            path = get_format(fmt).write_synthetic(root / "sources" / fmt, seed=0, size=SIZES[fmt])
            sources[network] = (name, fmt, str(path))
        triton = EmbeddedTriton(ModelRepository(workspace.triton_repository), root / "triton").start()
        try:
            with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: root / "prefect-results"}), \
                    prefect_test_harness(server_startup_timeout=120):
                yield {"workspace": workspace, "sources": sources, "url": f"grpc://{triton.grpc_url}", "root": root}
        finally:
            triton.stop()


def _run(env, networks=NETWORKS, sources=None):
    from flows.retrain_all import retrain_all

    return retrain_all(networks=list(networks), sources=sources or env["sources"], overrides=OVERRIDES,
                       gates={n: GATES for n in networks}, triton_url=env["url"], return_state=True)


def _flow_runs(name: str):
    from prefect import get_client

    async def runs():
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))

    import asyncio

    return asyncio.run(runs())


def test_retrain_all_trains_registers_promotes_and_serves(env):
    from mlflow.tracking import MlflowClient

    from registry import models as reg
    from registry.tracking import setup_tracking
    from serving.client import FERClient

    state = _run(env)
    assert state.is_completed(), state.message
    rows = {r["network"]: r for r in state.result()}
    assert set(rows) == set(NETWORKS)
    for network in NETWORKS:
        row = rows[network]
        assert row["decision"] == "promoted v1", row
        assert row["champion before"] == "none" and row["champion after"] == "v1"
        assert row["data version"].startswith(env["sources"][network][0] + "@")
        champion = reg.get_alias(network, "champion", env["workspace"])
        assert champion is not None and champion.version == 1
        assert champion.tags["data_gate"] == "passed" and champion.tags["parity_passed"] == "true"
        setup_tracking(env["workspace"])
        run = MlflowClient().get_run(champion.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["network"] == network

    # Every sub-flow ran and completed: ingest, train and promote once per network.
    for name in ("retrain_all", "ingest", "train", "promote"):
        runs = _flow_runs(name)
        expected = 1 if name == "retrain_all" else len(NETWORKS)
        assert len(runs) == expected and all(r.state.is_completed() for r in runs), (name, runs)

    # Triton answers through the ensemble of the promoted network, with a raw image.
    from fer_core.data.manifest import read_manifest
    from fer_core.data.samples import read_image
    from registry.datasets import DatasetStore

    root = DatasetStore(env["workspace"]).path("fer")
    row = read_manifest(root).iloc[0]
    from serving.server import control_key

    key = control_key(env["workspace"].triton_repository.parent)  # listing networks is model control: keyed
    with FERClient(env["url"].removeprefix("grpc://"), key=key) as client:
        assert set(NETWORKS) <= set(client.networks())
        prediction = client.predict([read_image(root, row["path"])], network="ca_resnet")[0]
    assert prediction.label in prediction.probabilities
    assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-3


def test_rerun_skips_unchanged_networks(env):
    from registry import models as reg

    before = {n: len(reg.list_versions(n, env["workspace"])) for n in NETWORKS}
    trains_before = len(_flow_runs("train"))
    state = _run(env)
    assert state.is_completed(), state.message
    assert [r["decision"] for r in state.result()] == ["unchanged"] * len(NETWORKS)
    assert {n: len(reg.list_versions(n, env["workspace"])) for n in NETWORKS} == before  # nothing retrained or registered
    assert len(_flow_runs("train")) == trains_before


def _corrupting_format(corruption_name: str) -> str:
    """Register a format that adapts FER2013 like the real one, then applies a catalogued corruption."""
    corruption = next(c for c in CORRUPTIONS if c.name == corruption_name)
    base = get_format("fer2013")
    name = f"fer2013_{corruption_name}"

    def adapt(source: Path, out_dir: Path, *, name: str, **options):
        card = base.adapt(source, out_dir, name=name, **options)
        corruption.apply(Path(out_dir))
        return card

    register_format(DataFormat(name=name, task=base.task, description="test: corrupted FER2013", adapt=adapt))
    return name


def test_a_corrupted_dataset_stops_at_the_gate_with_nothing_registered_or_served(env):
    from registry import models as reg
    from registry.datasets import DatasetStore
    from serving.repository import ModelRepository

    fmt = _corrupting_format("label_out_of_domain")
    repository = ModelRepository(env["workspace"].triton_repository)
    files_before = sorted(p.relative_to(repository.root) for p in repository.root.rglob("*"))
    versions_before = reg.list_versions("ca_resnet", env["workspace"])
    sources = {"ca_resnet": ("broken", fmt, env["sources"]["ca_resnet"][2])}

    state = _run(env, networks=("ca_resnet",), sources=sources)
    assert state.is_failed()
    assert "label_in_domain" in state.message  # the gate's failed check, by name
    ingest_runs = [r for r in _flow_runs("ingest") if r.state.is_failed()]
    assert len(ingest_runs) == 1
    assert DatasetStore(env["workspace"]).list("broken") == []  # nothing versioned
    assert reg.list_versions("ca_resnet", env["workspace"]) == versions_before  # nothing trained or registered
    assert sorted(p.relative_to(repository.root) for p in repository.root.rglob("*")) == files_before
    assert reg.get_alias("ca_resnet", "champion", env["workspace"]).version == 1  # still serving the old champion


def test_ingest_flow_versions_a_source(env):
    from flows.ingest import ingest

    name, fmt, path = env["sources"]["ca_resnet"]
    version = ingest("fer-again", fmt, path)
    assert version.ref.startswith("fer-again@") and version.num_samples > 0
    assert os.path.isdir(version_path := env["workspace"].dvc_repo / "datasets" / "fer-again"), version_path


def test_a_model_file_change_retrains_that_network_only(env, monkeypatch):
    """Issue 13: the code fingerprint is part of the cache key. A change to ca_resnet's model file
    (its source, as the fingerprint reads it, with a line appended) makes ``retrain_all`` retrain and
    register ca_resnet, and only ca_resnet; au_cotrain stays unchanged."""
    from fer_core.training import fingerprint
    from registry import models as reg

    before = {n: len(reg.list_versions(n, env["workspace"])) for n in NETWORKS}
    trains_before = len(_flow_runs("train"))
    real = fingerprint._read_source
    monkeypatch.setattr(fingerprint, "_read_source",
                        lambda name: real(name) + (b"\n# a fix\n" if name == "fer_core.models.ca_resnet" else b""))
    state = _run(env)
    assert state.is_completed(), state.message
    decisions = {r["network"]: r["decision"] for r in state.result()}
    assert decisions["au_cotrain"] == "unchanged", decisions
    assert decisions["ca_resnet"] != "unchanged" and not decisions["ca_resnet"].startswith("failed"), decisions
    after = {n: len(reg.list_versions(n, env["workspace"])) for n in NETWORKS}
    assert after == {**before, "ca_resnet": before["ca_resnet"] + 1}
    assert len(_flow_runs("train")) == trains_before + 1
    newest = reg.get_version("ca_resnet", after["ca_resnet"], env["workspace"])
    assert newest.tags["code_fingerprint"] == fingerprint.code_fingerprint("ca_resnet")


def test_retrain_all_with_au_rounds_registers_the_last_rounds_model_and_caches_it(env):
    """``retrain_all(au_rounds=1)``: au_cotrain is trained with one label-refinement round, the version
    registered is the round's model (its run is round 1's child run), and a re-run is ``unchanged``."""
    from mlflow.tracking import MlflowClient

    from flows.retrain_all import retrain_all
    from registry import models as reg
    from registry.tracked_refinement import ROUNDS_TAG
    from registry.tracking import setup_tracking

    ws = env["workspace"]

    def run():
        return retrain_all(networks=["au_cotrain"], sources=env["sources"], overrides=OVERRIDES,
                           gates={"au_cotrain": GATES}, triton_url=env["url"], au_rounds=1, return_state=True)

    before = len(reg.list_versions("au_cotrain", ws))
    state = run()
    assert state.is_completed(), state.message
    (row,) = state.result()
    assert row["decision"].startswith(("promoted", "kept champion")), row
    versions = reg.list_versions("au_cotrain", ws)
    assert len(versions) == before + 1
    version = versions[-1]
    assert version.tags[ROUNDS_TAG] == "1"
    setup_tracking(ws)
    run_tags = MlflowClient().get_run(version.run_id).data.tags
    assert run_tags.get("au_round") == "1"  # the refined-label round's weights, not the base training's
    again = run()
    assert again.is_completed(), again.message
    assert [r["decision"] for r in again.result()] == ["unchanged"]
    assert len(reg.list_versions("au_cotrain", ws)) == before + 1
