"""The MLflow callback against a real SQLite-backed MLflow store in the test's workspace."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from fer_core.training.trainer import Trainer
from registry.tracking import MlflowCallback, end_active_run, setup_tracking

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import _Crash  # noqa: E402
from training_toy import ToyTask, toy_recipe  # noqa: E402


class _ReportingToyTask(ToyTask):
    def report(self, outputs, targets):
        from fer_core.metrics.classification import confusion_matrix

        cm = confusion_matrix(targets["label"].numpy(), outputs["logits"].argmax(1).numpy(), 3)
        return {"confusion_matrix": cm.tolist(), "labels": ["a", "b", "c"]}


def test_a_run_logs_params_metrics_artifacts_and_model(workspace, tmp_path):
    manifest = pd.DataFrame({"id": ["a", "b"], "label": [0, 1]})
    cb = MlflowCallback("toy_net", tmp_path / "run", data_ref="toy@0123456789abcdef", manifest=manifest,
                       workspace=workspace)
    Trainer(toy_recipe(epochs=2), _ReportingToyTask(), tmp_path / "run", callbacks=[cb]).fit()
    setup_tracking(workspace)
    client = MlflowClient()
    run = client.get_run(cb.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.05" and run.data.params["network"] == "toy_net"
    assert run.data.tags["data_version"] == "toy@0123456789abcdef"
    assert len(run.data.tags["recipe_fingerprint"]) == 16
    assert [m.step for m in client.get_metric_history(cb.run_id, "val/accuracy")] == [1, 2]
    assert "test/accuracy" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(cb.run_id, "plots")}
    assert artifacts == {"plots/learning_curves.png", "plots/confusion_matrix.png"}
    assert {a.path for a in client.list_artifacts(cb.run_id, "checkpoint")} == {"checkpoint/best.pt", "checkpoint/best.pt.sha256"}
    assert run.inputs.dataset_inputs[0].dataset.name == "toy"
    assert str(workspace.root) in run.info.artifact_uri
    # The safe pt2 format: a torch.export graph with a dynamic batch axis, the metadata beside it,
    # and MLflow's own pyfunc serves it on an ndarray (unnamed tensor signature).
    model = mlflow.pytorch.load_model(cb.model_info.model_uri)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 3)
    info = mlflow.models.get_model_info(cb.model_info.model_uri)
    assert info.metadata["fer_metadata"]["name"] == "toy_net"
    local = Path(mlflow.artifacts.download_artifacts(cb.model_info.model_uri, dst_path=str(tmp_path / "model")))
    assert (local / info.flavors["pytorch"]["model_data"] / "model.pt2").is_file()
    assert not list(local.rglob("*.pth"))  # no pickled module
    assert mlflow.pyfunc.load_model(cb.model_info.model_uri).predict(np.zeros((4, 1, 8, 8), np.float32)).shape == (4, 3)


def test_logging_the_model_raises_no_mlflow_warning(workspace, tmp_path, recwarn):
    """No pickle warning and no failed input-example validation (both had been silenced before).
    MLflow's logger does not propagate to the root logger (pytest's caplog), so the test listens on it."""
    import logging

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(f"{record.name}: {record.getMessage()[:200]}")

    collect, mlflow_logger = Collect(), logging.getLogger("mlflow")
    mlflow_logger.addHandler(collect)
    try:
        cb = MlflowCallback("toy_net", tmp_path / "run", workspace=workspace)
        Trainer(toy_recipe(epochs=1), ToyTask(), tmp_path / "run", callbacks=[cb]).fit()
    finally:
        mlflow_logger.removeHandler(collect)
    assert cb.model_info is not None
    assert collect.messages == []
    assert not [str(w.message)[:200] for w in recwarn if "mlflow" in w.filename]


def test_a_killed_and_resumed_training_is_one_run(workspace, tmp_path):
    run_dir = tmp_path / "run"
    cb = MlflowCallback("toy_net", run_dir, log_model=False, workspace=workspace)
    with pytest.raises(KeyboardInterrupt):
        try:
            Trainer(toy_recipe(), ToyTask(), run_dir, callbacks=[cb, _Crash(at_step=15)]).fit()
        finally:
            end_active_run("KILLED")
    cb2 = MlflowCallback("toy_net", run_dir, log_model=False, workspace=workspace)
    Trainer(toy_recipe(), ToyTask(), run_dir, callbacks=[cb2]).fit(resume=True)
    assert cb2.run_id == cb.run_id
    setup_tracking(workspace)
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("fer-toy_net").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in MlflowClient().get_metric_history(cb.run_id, "val/accuracy")]
    assert sorted(set(steps)) == [1, 2, 3, 4]
