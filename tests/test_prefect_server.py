"""Prefect's own clients on what the platform deploys: a real ``prefect server start`` on 127.0.0.1,
the commands of docs/deployment.md run as written, two plain ``prefect worker start`` processes
from this checkout (``FER_CHECKOUT``, no image) training two networks of ``retrain_all`` in
parallel; INFO logs of the flow runs reach the API; the summary artifact links MLflow and Data
Docs. One bench run (``bench/prefect_workers.py``) serves all assertions: it is minutes long.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prefect")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import prefect_workers as bench  # noqa: E402


def _post(env: dict, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    seen: dict = {}

    def after(env: dict) -> None:
        # the other documented commands: create runs of the deployments (not awaited; the workers
        # are still up but one slot each). VERSION: the bench's dataset, by name = its newest version.
        for argv in bench.documented_commands(section=""):
            if argv[:2] == ["deployment", "run"]:
                argv = [a.replace("fer2013@VERSION", "fer2013") for a in argv]
                seen.setdefault("deployment_runs", []).append(bench.prefect(*argv, env=env).stdout)
        seen["runs"] = _post(env, "/flow_runs/filter", {"limit": 100})
        trains = [r["id"] for r in seen["runs"] if r["name"].startswith("train-")]
        seen["logs"] = _post(env, "/logs/filter", {"logs": {"flow_run_id": {"any_": trains}, "level": {"ge_": 20}},
                                                   "limit": 200})
        seen["artifacts"] = _post(env, "/artifacts/filter", {"artifacts": {"key": {"any_": ["retrain-all-summary"]}}})
        seen["loso"] = bench.loso_on_pool(env, tmp_path_factory.mktemp("loso"))

    result = bench.run(tmp_path_factory.mktemp("prefect-workers"), ("ca_resnet", "au_cotrain"), after=after)
    return result, seen


@pytest.mark.slow
@pytest.mark.integration
def test_two_process_workers_train_the_networks_in_parallel(bench_run):
    result, _ = bench_run
    assert result["state"].startswith("COMPLETED"), result
    assert [r["decision"] for r in result["rows"]] == ["promoted v1", "promoted v1"], result["rows"]
    trains = [s for s in result["train_runs"] if s["name"].startswith("train-")]
    assert sorted(s["name"] for s in trains) == ["train-au_cotrain", "train-ca_resnet"]
    assert all(s["state"] == "COMPLETED" for s in trains), trains
    # each worker takes one run at a time (--limit 1): an overlap means two workers trained at once
    assert result["overlap_s"] > 0, result


@pytest.mark.slow
@pytest.mark.integration
def test_documented_commands_flow_run_logs_and_summary_links(bench_run):
    result, seen = bench_run
    # `prefect deployment run 'retrain_all/retrain-all'` and 'train/train' --param ... both created runs
    assert len(seen["deployment_runs"]) == 2 and all("Created flow run" in out for out in seen["deployment_runs"])
    names = {r["name"] for r in seen["runs"]}
    assert {"train-ca_resnet", "train-au_cotrain"} <= names
    # INFO logs of the workers' flow runs reached the API (the UI shows them)
    train_ids = {r["id"] for r in seen["runs"] if r["name"].startswith("train-") and r["state_type"] == "COMPLETED"}
    info = [log for log in seen["logs"] if log["flow_run_id"] in train_ids and log["level"] == 20]
    assert info, "no INFO log of a worker's train flow run reached the API"
    (artifact,) = [a for a in seen["artifacts"] if a["type"] == "markdown"][:1]
    for network in ("ca_resnet", "au_cotrain"):
        assert f"#/models/fer-{network}/versions/1" in artifact["data"]
    assert "/#/experiments/" in artifact["data"] and "index.html" in artifact["data"]
    assert str(Path("/opt/fer")) not in json.dumps(seen["runs"])


@pytest.mark.slow
@pytest.mark.integration
def test_loso_folds_run_in_parallel_on_the_work_pool(bench_run):
    """``loso`` with ``dispatch="pool"``: every subject is its own ``loso-fold`` flow run on the pool,
    two workers train two folds at once, and the parent pools every fold (the pooling itself is
    checked against the children's recorded predictions in tests/test_protocols.py). The runs the
    documented ``deployment run`` commands created just before are cancelled first with
    ``prefect flow-run cancel``: with one of them on a worker, the folds ran one after another."""
    _, seen = bench_run
    loso = seen["loso"]
    folds = loso["result"]["per_fold"]
    assert len(folds) == 3 and sorted(r["name"] for r in loso["fold_runs"]) == \
        sorted(f"loso-fold-micro_lsh-{s}" for s in folds)
    assert all(r["state"] == "COMPLETED" for r in loso["fold_runs"]), loso["fold_runs"]
    print(f"loso-fold runs overlapped for {loso['overlap_s']} s; cancelled first: {loso['cancelled_first']}")
    assert loso["overlap_s"] > 0, loso
    assert set(loso["result"]["child_run_ids"]) == set(folds) and 0 <= loso["result"]["pooled"]["uf1"] <= 1
