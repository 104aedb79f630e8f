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


def test_mean_std_over_folds():
    from registry.protocols import mean_std

    mean, std = mean_std({1: {"uar": 0.2, "war": 0.5}, 2: {"uar": 0.4, "war": 0.5, "extra": 1.0}})
    assert mean == pytest.approx({"uar": 0.3, "war": 0.5}) and std == pytest.approx({"uar": 0.1, "war": 0.0})


def test_dfew_like_five_fold_gives_mean_and_std(workspace, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient

    from registry.datasets import DatasetStore
    from registry.protocols import train_kfold

    torch.set_num_threads(1)
    src = get_format("dfew").write_synthetic(tmp_path / "src", seed=0, size=60, image_size=32, num_frames=8,
                                             num_subjects=10)
    adapt("dfew", src, tmp_path / "prep", name="dfew", fold=1)
    data = DatasetStore(workspace).add("dfew", tmp_path / "prep")
    recipe = get_recipe("c3d_ecstfl", "quick").with_overrides({
        "device": "cpu", "epochs": 1, "max_steps_per_epoch": 1, "batch_size": 8, "early_stopping_patience": 0})
    outcome = train_kfold("c3d_ecstfl", data.ref, recipe, folds=5, workspace=workspace)
    assert sorted(outcome.per_fold) == [1, 2, 3, 4, 5]
    uars = np.array([outcome.per_fold[k]["uar"] for k in range(1, 6)])
    assert outcome.mean["uar"] == pytest.approx(uars.mean()) and outcome.std["uar"] == pytest.approx(uars.std())
    client = MlflowClient()
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.metrics["kfold/uar_mean"] == pytest.approx(uars.mean())
    assert parent.data.metrics["kfold/war_std"] == pytest.approx(outcome.std["war"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    assert sorted(r.data.tags["fold"] for r in children) == ["1", "2", "3", "4", "5"]


TINY_MICRO = {"device": "cpu", "epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1, "early_stopping_patience": 0,
              "model_kwargs.img_size": 24, "model_kwargs.width": 4, "model_kwargs.magnifier_width": 4,
              "model_kwargs.num_mag_frames": 3, "model_kwargs.head_hidden": 16, "augment": {}}


def _add_composite_parts(workspace, tmp_path) -> list[str]:
    from registry.datasets import DatasetStore

    refs = []
    for fmt, options in (("casme2", {"classes": "composite"}), ("samm", {"classes": "composite"}), ("smic", {})):
        src = get_format(fmt).write_synthetic(tmp_path / f"{fmt}-src", seed=1, size=8, image_size=32, num_frames=5,
                                              num_subjects=2)
        adapt(fmt, src, tmp_path / f"{fmt}-prep", name=fmt, **options)
        refs.append(DatasetStore(workspace).add(fmt, tmp_path / f"{fmt}-prep").ref)
    return refs


def test_composite_protocol_merges_casme2_samm_and_smic_into_one_loso(workspace, tmp_path, monkeypatch):
    """MEGC 2019's composite: the three sets in 3 classes, one LOSO over all their subjects (prefixed
    by the set) run by the ``loso`` flow; per-set metrics equal pooling that set's subjects."""
    import torch
    from mlflow.tracking import MlflowClient

    from flows.protocols import loso

    torch.set_num_threads(1)
    refs = _add_composite_parts(workspace, tmp_path)
    monkeypatch.setenv("FER_HOME", str(workspace.root))
    result = loso("micro_lsh", refs, overrides=TINY_MICRO, dispatch="local")
    subjects = sorted(result["per_fold"])
    assert {s.split("/")[0] for s in subjects} == {"casme2", "samm", "smic"} and len(subjects) == 6
    parent = MlflowClient().get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["protocol"] == "loso-composite"
    assert parent.data.tags["data_version"].startswith("composite:casme2@")
    summary = json.loads(open(MlflowClient().download_artifacts(parent.info.run_id, "loso/summary.json",
                                                                str(tmp_path))).read())
    # Per-set metrics = the set's subjects pooled, recomputed from the children's recorded predictions.
    for part in ("casme2", "samm", "smic"):
        y_true, y_pred = [], []
        for subject, child in sorted(result["child_run_ids"].items()):
            if subject.startswith(part + "/"):
                recorded = json.loads(open(MlflowClient().download_artifacts(
                    child, "fold/predictions.json", str(tmp_path / subject.replace("/", "_")))).read())
                y_true += recorded["y_true"]
                y_pred += recorded["y_pred"]
        names = ("negative", "positive", "surprise")
        expected = classification_metrics(np.array(y_true), np.array(y_pred), 3, names)
        assert parent.data.metrics[f"loso/{part}/uf1"] == pytest.approx(expected["uf1"])
        assert summary["per_part"][part]["uar"] == pytest.approx(expected["uar"])


def test_composite_refuses_a_part_in_other_classes(workspace, tmp_path):
    from fer_core.errors import UsageError
    from registry.datasets import DatasetStore
    from registry.protocols import plan_loso

    src = get_format("casme2").write_synthetic(tmp_path / "src", seed=0, size=8, image_size=32, num_frames=5,
                                               num_subjects=2)
    adapt("casme2", src, tmp_path / "prep", name="casme2")  # CASME II's 5 classes
    smic = get_format("smic").write_synthetic(tmp_path / "smic", seed=0, size=8, image_size=32, num_frames=5,
                                              num_subjects=2)
    adapt("smic", smic, tmp_path / "smic-prep", name="smic")
    store = DatasetStore(workspace)
    refs = [store.add("casme2", tmp_path / "prep").ref, store.add("smic", tmp_path / "smic-prep").ref]
    recipe = get_recipe("micro_lsh", "quick").with_overrides(TINY_MICRO)
    with pytest.raises(UsageError, match="classes=composite"):
        plan_loso("micro_lsh", refs, recipe, workspace=workspace)


def test_several_data_are_only_for_the_loso_composite(workspace, capsys):
    from fer_cli.main import EXIT_USAGE, main

    assert main(["train", "ca_resnet", "-d", "fer@1", "-d", "fer@2"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "composite of --protocol loso" in err[0]
