"""Training faults with real processes: a ``fer train`` subprocess SIGKILLed mid-run resumes with
``--resume`` to the same final metrics as an uninterrupted run, as one FINISHED MLflow run.

(The library-level kill/resume and corruption tests live in ``tests/test_trainer.py`` and
``tests/test_tracking.py``; the ``fer register`` path for a corrupted checkpoint in
``tests/test_security.py``.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fer_core.data.formats import get_format

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["--set", "epochs=3", "--set", "max_steps_per_epoch=4", "--set", "batch_size=16",
          "--set", "model_kwargs.width=4", "--set", "seed=7"]
NONDETERMINISTIC = ("throughput", "epoch_seconds", "seconds")


def _fer(home: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "FER_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("FER_TRACKING_URI", "FER_REGISTRY_URI", "FER_DVC_REMOTE", "FER_CONFIG", "MLFLOW_TRACKING_URI",
                "MLFLOW_REGISTRY_URI", "FER_MLFLOW_URI_SET_BY_PLATFORM"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-m", "fer_cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _run(home: Path, *args: str) -> str:
    process = _fer(home, *args)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out


def _runs(home: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")  # no process-wide URI
    experiment = client.get_experiment_by_name("fer-ca_resnet")
    assert experiment is not None, f"no fer-ca_resnet experiment in {home}"
    return client, client.search_runs([experiment.experiment_id])


def _final_metrics(client: MlflowClient, run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if not any(n in k for n in NONDETERMINISTIC)}


@pytest.mark.slow  # three `fer train` subprocesses that learn (one SIGKILLed): minutes on a loaded machine
def test_sigkilled_fer_train_resumes_to_the_uninterrupted_result_as_one_run(tmp_path):
    source = get_format("fer2013").write_synthetic(tmp_path / "src", size=140)
    homes = {"full": tmp_path / "full", "killed": tmp_path / "killed"}
    for home in homes.values():  # the same source gives the same data version in both workspaces
        _run(home, "data", "add", "fer", str(source), "--format", "fer2013")

    _run(homes["full"], "train", "ca_resnet", "--data", "fer", *RECIPE)

    victim = _fer(homes["killed"], "train", "ca_resnet", "--data", "fer", *RECIPE, start_new_session=True)
    runs_dir = homes["killed"] / "runs" / "ca_resnet"
    deadline = time.monotonic() + 300
    while not list(runs_dir.glob("*/last.pt")):  # epoch 1 is checkpointed: the kill lands in epoch 2 or 3
        assert victim.poll() is None, victim.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 1.0))  # a random step of what follows
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    if victim.returncode != -signal.SIGKILL:
        pytest.fail(f"the training ended (rc {victim.returncode}) before the kill; slow the recipe down")
    client, runs = _runs(homes["killed"])
    assert [r.info.status for r in runs] == ["RUNNING"]  # a SIGKILL leaves the run open

    out = _run(homes["killed"], "train", "ca_resnet", "--data", "fer", *RECIPE, "--resume")
    assert "mlflow run" in out
    client, runs = _runs(homes["killed"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    resumed = _final_metrics(client, runs[0])
    full_client, full_runs = _runs(homes["full"])
    expected = _final_metrics(full_client, full_runs[0])
    assert "test/accuracy" in expected and resumed.keys() == expected.keys()
    histories = {key: ([(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)],
                       [(m.step, m.value) for m in full_client.get_metric_history(full_runs[0].info.run_id, key)])
                 for key in expected}
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), (key, histories[key])
    # Every epoch's metrics are logged once per step (the resumed epochs overwrite nothing twice).
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/accuracy")]
    assert sorted(set(steps)) == [1, 2, 3]
