"""``fer register`` / ``fer promote`` / ``fer rollback`` / ``fer models`` end to end (real MLflow, DVC, Triton).

One tracked training run is registered twice (v1, v2: same weights, distinct registry versions),
enough to exercise every command: the embedded Triton path of ``fer promote`` (no ``--url``), a
refusal (exit 1, repository untouched), then promotion and rollback against a running Triton
given by ``--url`` or ``$FER_TRITON_URL``.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from fer_cli.main import main
from fer_core.data.formats import adapt, get_format
from fer_platform.workspace import Workspace
from registry import models as reg
from registry.datasets import DatasetStore
from registry.training import resolve_recipe, train_tracked
from serving.repository import ModelRepository
from serving.server import EmbeddedTriton, free_port

pytestmark = pytest.mark.integration  # starts the embedded tritonserver

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

NETWORK = "ca_resnet"
OPEN = ["--floor", "0", "--margin", "1", "--latency-budget-ms", "10000", "--smoke-samples", "4",
        "--latency-requests", "5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli-registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_HOME", str(root / "home"))
        for var in ("FER_TRACKING_URI", "FER_REGISTRY_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                    "FER_DVC_REMOTE", "FER_TRITON_URL"):
            mp.delenv(var, raising=False)
        ws = Workspace(root / "home").ensure()
        source = get_format("fer2013").write_synthetic(root / "src", size=140)
        adapt("fer2013", source, root / "prepared", name="fer")
        data = DatasetStore(ws).add("fer", root / "prepared")
        recipe = resolve_recipe(NETWORK, "quick", None, {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16,
                                                         "model_kwargs.width": 8})
        outcome = train_tracked(NETWORK, data.ref, recipe, progress=False, workspace=ws)
        yield SimpleNamespace(ws=ws, run_id=outcome.run_id, repo=ModelRepository(ws.triton_repository))


def _files(repo: ModelRepository) -> dict[str, bytes]:
    return {str(p.relative_to(repo.root)): p.read_bytes() for p in sorted(repo.root.rglob("*")) if p.is_file()}


def test_register_then_promote_with_the_embedded_triton(trained, capsys):
    assert main(["register", NETWORK, "--run", trained.run_id]) == 0
    out = capsys.readouterr().out
    assert "registered ca_resnet v1" in out and "(challenger)" in out and "parity_passed          true" in out
    assert reg.get_version(NETWORK, 1, trained.ws).tags["data_gate"] == "passed"

    before = _files(trained.repo)
    assert main(["promote", NETWORK, "--floor", "1.01"]) == 1  # the first version must reach the floor
    captured = capsys.readouterr()
    assert "metric_vs_champion" in captured.err and "refused by" in captured.err
    assert "metric_vs_champion   FAIL" in captured.out and "floor=1.01" in captured.out
    assert _files(trained.repo) == before and reg.get_alias(NETWORK, "champion", trained.ws) is None

    start = time.perf_counter()
    assert main(["promote", NETWORK, *OPEN]) == 0
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n`fer promote` with the embedded Triton (start + promote + stop): {seconds:.1f}s (shared CPUs)")
    assert "started the embedded Triton" in out and "promoted ca_resnet v1" in out
    for gate in ("data_gate", "onnx_parity", "metric_vs_champion", "triton_smoke", "latency_p95"):
        assert f"{gate:20s} PASS" in out
    # The server is gone, the repository is left ready for `fer serve`.
    assert trained.repo.describe()[NETWORK] == {"versions": [1], "served": [1], "champion": 1}
    assert (trained.repo.root / f"{NETWORK}_ensemble" / "config.pbtxt").is_file()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "champion" in out and "not served (no Triton); the repository pins 1" in out and "test/accuracy" in out


def test_promote_and_rollback_against_a_running_triton(trained, capsys, monkeypatch):
    assert main(["register", NETWORK, "--run", trained.run_id]) == 0
    capsys.readouterr()
    server = EmbeddedTriton(trained.repo, trained.ws.root / "triton-cli", models=trained.repo.load_order()).start()
    try:
        url = server.grpc_url
        assert main(["promote", NETWORK, "--url", url, *OPEN]) == 0
        assert "promoted ca_resnet v2" in capsys.readouterr().out
        assert server.endpoint().served_versions(NETWORK) == [2] and trained.repo.champion(NETWORK) == 2

        monkeypatch.setenv("FER_TRITON_URL", url)
        assert main(["rollback", NETWORK]) == 0
        assert "rolled ca_resnet back to v1 (v2 is now `previous`)" in capsys.readouterr().out
        assert main(["models", "--json"]) == 0
        listing = {n["network"]: n for n in json.loads(capsys.readouterr().out)}[NETWORK]
        assert listing["triton"] == {"served": [1], "ensemble_ready": True}
        assert {v["version"]: v["aliases"] for v in listing["versions"]} == {1: ["champion"], 2: ["previous"]}
        assert main(["promote", NETWORK, "--version", "1", *OPEN]) == 2  # already the champion
        assert "champion already" in capsys.readouterr().err
    finally:
        server.stop()


def test_bad_input_is_one_line_with_exit_codes(trained, capsys, monkeypatch):
    dead = f"127.0.0.1:{free_port()}"
    assert main(["register", NETWORK, "--run", "0" * 32]) == 2
    assert main(["promote", "resnet18", "--url", dead]) == 2  # nothing registered for it
    assert main(["rollback", "resnet18", "--url", dead]) == 2
    assert main(["promote", NETWORK, "--url", dead, "--margin", "-1"]) == 2
    # A version that passes the registry gates needs Triton: unreachable is exit 1, nothing changed.
    before = _files(trained.repo)
    assert main(["promote", NETWORK, "--version", "2", "--url", dead, *OPEN]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("fer: error:") == 5 and "unreachable" in err
    assert _files(trained.repo) == before
