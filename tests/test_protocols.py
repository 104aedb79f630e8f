"""Leave-one-subject-out as a tracked protocol: one MLflow child run per CASME II subject, pooled
metrics on the parent equal to recomputing them from the children's recorded predictions, resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fer_core.data.formats import adapt, get_format
from fer_core.metrics.classification import classification_metrics
from fer_core.training.tasks import get_recipe

pytestmark = pytest.mark.slow


def test_loso_over_casme2_subjects_has_one_child_per_subject(workspace, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient

    from registry.datasets import DatasetStore
    from registry.protocols import train_loso

    torch.set_num_threads(1)
    src = get_format("casme2").write_synthetic(tmp_path / "src", seed=0, size=12, image_size=32, num_frames=5,
                                               num_subjects=3)
    adapt("casme2", src, tmp_path / "prep", name="casme2")
    data = DatasetStore(workspace).add("casme2", tmp_path / "prep")
    recipe = get_recipe("micro_lsh", "quick").with_overrides({
        "device": "cpu", "epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1, "early_stopping_patience": 0,
        "model_kwargs.img_size": 24, "model_kwargs.width": 4, "model_kwargs.magnifier_width": 4,
        "model_kwargs.num_mag_frames": 3, "model_kwargs.head_hidden": 16, "augment": {}})
    outcome = train_loso("micro_lsh", data.ref, recipe, workspace=workspace)

    client = MlflowClient()
    parent = client.get_run(outcome.parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    subjects = sorted(outcome.per_fold)
    assert len(subjects) == 3 and all(isinstance(s, str) for s in subjects)
    assert sorted(r.data.tags["fold"] for r in children) == subjects
    y_true, y_pred, names = [], [], None
    for run in sorted(children, key=lambda r: r.data.tags["fold"]):
        recorded = json.loads(open(client.download_artifacts(run.info.run_id, "fold/predictions.json",
                                                             str(tmp_path))).read())
        y_true += recorded["y_true"]
        y_pred += recorded["y_pred"]
        names = tuple(recorded["label_names"])
    recomputed = classification_metrics(np.array(y_true), np.array(y_pred), len(names), names)
    for key in ("uf1", "uar", "accuracy"):
        assert parent.data.metrics[f"loso/{key}"] == pytest.approx(recomputed[key])

    # Resume: a fold whose predictions were saved is kept, a lost one is trained again.
    run_dir = next(iter(outcome.per_fold))
    fold_dirs = sorted((p for p in (workspace.root).rglob("fold-*") if p.is_dir()))
    (fold_dirs[-1] / "predictions.npz").unlink()
    again = train_loso("micro_lsh", data.ref, recipe, workspace=workspace)
    assert again.parent_run_id == outcome.parent_run_id and len(again.resumed_folds) == 2, run_dir
