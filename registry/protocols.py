"""Research protocols as tracked runs: leave-one-subject-out (LOSO) for micro-expressions.

``train_loso(network, data_ref, recipe)`` builds on :func:`fer_core.training.tasks.micro.run_loso`,
one held-out subject at a time: one parent MLflow run (tag ``protocol=loso``) with a child run per
fold (``fold=<subject>``, subject ids kept as strings, e.g. SAMM's ``006``). Each finished fold
saves its test labels and predictions (``predictions.npz`` in its fold folder, and
``fold/predictions.json`` in its child run), so a killed protocol resumes with the next fold and the
parent's pooled metrics (``loso/uf1``, ``loso/uar``, ``loso/accuracy``: every fold's predictions
pooled, as MEGC reports them) are recomputed from what the children recorded.

``train_kfold`` does k-fold (DFEW: mean ± std of the folds' test metrics) the same way.

Not built yet (issue 15): a flow with folds
in parallel on a work pool, the composite CASME II + SAMM + SMIC protocol.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_core.metrics.classification import classification_metrics
from fer_core.training.recipe import Recipe
from fer_platform.workspace import Workspace
from registry.datasets import DatasetStore, parse_ref
from registry.tracking import get_or_create_experiment, setup_tracking
from registry.training import run_dir_for

PARENT_ID_FILE = "protocol_run_id"


@dataclass(frozen=True)
class ProtocolOutcome:
    """Pooled and per-fold metrics of a protocol run and its MLflow ids."""

    network: str
    data_ref: str
    pooled: dict[str, float]
    per_fold: dict[str, dict[str, float]]
    parent_run_id: str
    child_run_ids: dict[str, str]
    resumed_folds: tuple[str, ...] = ()


def train_loso(network: str, data_ref: str, recipe: Recipe, *, subjects: list[str] | None = None,
               workspace: Workspace) -> ProtocolOutcome:
    """Leave-one-subject-out training of a micro-expression network, tracked and resumable by fold."""
    import mlflow

    from fer_core.training.tasks.micro import _folder_name, run_loso
    from registry.tracking import MlflowCallback, RUN_ID_FILE

    workspace = workspace.ensure()
    setup_tracking(workspace)
    name, version = parse_ref(data_ref)
    store = DatasetStore(workspace)
    data = store.get(name, version)
    root = store.pull(name, data.version)
    import pandas as pd

    manifest = pd.read_parquet(root / "manifest.parquet")
    all_subjects = sorted(set(manifest["subject"].astype(str)))
    chosen = all_subjects if subjects is None else [str(s) for s in subjects]
    run_dir = run_dir_for(workspace, network, data.version, recipe) / "loso"
    run_dir.mkdir(parents=True, exist_ok=True)
    experiment = get_or_create_experiment(network, workspace)
    id_file = run_dir / PARENT_ID_FILE
    parent_id = id_file.read_text().strip() if id_file.is_file() else None
    start = (dict(run_id=parent_id) if parent_id else
             dict(experiment_id=experiment, run_name=f"{network} LOSO on {data.name}@{data.short}",
                  tags={"protocol": "loso", "network": network, "data_version": data.ref}))
    folds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    children: dict[str, str] = {}
    resumed: list[str] = []
    label_names: tuple[str, ...] = ()
    with mlflow.start_run(**start) as parent:
        id_file.write_text(parent.info.run_id)
        for subject in chosen:
            fold_dir = run_dir / _folder_name(subject)
            saved = fold_dir / "predictions.npz"
            if saved.is_file():  # finished before an interruption: keep it
                z = np.load(saved)
                folds[subject] = (z["y_true"], z["y_pred"])
                label_names = tuple(str(n) for n in z["label_names"])
                children[subject] = (fold_dir / RUN_ID_FILE).read_text().strip()
                resumed.append(subject)
                continue
            trackers: list[MlflowCallback] = []

            def factory(s: str, d: Path) -> list:
                trackers.append(MlflowCallback(network, d, data_ref=data.ref, parent_run_id=parent.info.run_id,
                                               run_name=f"fold {s}", tags={"protocol": "loso", "fold": s},
                                               log_model=False, workspace=workspace))
                return trackers

            result = run_loso(recipe, root, run_dir, callbacks_factory=factory, subjects=[subject])
            fold = result.folds[0]
            label_names = result.label_names
            child = trackers[0].run_id
            mlflow.tracking.MlflowClient().log_dict(
                child, {"subject": subject, "y_true": fold.y_true.tolist(), "y_pred": fold.y_pred.tolist(),
                        "label_names": list(label_names)}, "fold/predictions.json")
            np.savez(saved, y_true=fold.y_true, y_pred=fold.y_pred, label_names=np.array(label_names))
            folds[subject] = (fold.y_true, fold.y_pred)
            children[subject] = child
        y_true = np.concatenate([folds[s][0] for s in chosen])
        y_pred = np.concatenate([folds[s][1] for s in chosen])
        pooled = classification_metrics(y_true, y_pred, len(label_names), label_names)
        per_fold = {s: classification_metrics(folds[s][0], folds[s][1], len(label_names), label_names)
                    for s in chosen}
        mlflow.log_metrics({f"loso/{k}": v for k, v in pooled.items() if "/" not in k})
        mlflow.log_dict({"pooled": pooled, "per_fold": per_fold, "children": children}, "loso/summary.json")
        mlflow.log_param("num_folds", len(chosen))
    return ProtocolOutcome(network, data.ref, pooled, per_fold, parent.info.run_id, children, tuple(resumed))


@dataclass(frozen=True)
class KFoldOutcome:
    """Per-fold final metrics, their mean and (population) std, and the MLflow ids."""

    network: str
    data_ref: str
    per_fold: dict[int, dict[str, float]]
    mean: dict[str, float]
    std: dict[str, float]
    parent_run_id: str
    child_run_ids: dict[int, str]


def mean_std(per_fold: dict[int, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and std (ddof 0, as DFEW's papers report over 5 folds) of every metric all folds share."""
    keys = sorted(set.intersection(*(set(m) for m in per_fold.values()))) if per_fold else []
    values = {k: np.array([m[k] for m in per_fold.values()], dtype=np.float64) for k in keys}
    return {k: float(v.mean()) for k, v in values.items()}, {k: float(v.std()) for k, v in values.items()}


def train_kfold(network: str, data_ref: str, recipe: Recipe, *, folds: int = 5,
                workspace: Workspace) -> KFoldOutcome:
    """k-fold cross-validation (DFEW's ``data.fold`` = 1..k) as a parent run with one child run per fold.

    Each fold is :func:`registry.training.train_tracked` with ``data.fold`` set, so a fold's run
    folder and MLflow run are the ones a single ``fer train --set data.fold=K`` would use, and a
    finished fold (its run folder holds ``best.pt`` and its run id) is kept on a re-run.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from registry.tracking import RUN_ID_FILE
    from registry.training import train_tracked

    workspace = workspace.ensure()
    setup_tracking(workspace)
    name, version = parse_ref(data_ref)
    data = DatasetStore(workspace).get(name, version)
    run_dir = run_dir_for(workspace, network, data.version, recipe) / f"kfold-{folds}"
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / PARENT_ID_FILE
    parent_id = id_file.read_text().strip() if id_file.is_file() else None
    start = (dict(run_id=parent_id) if parent_id else
             dict(experiment_id=get_or_create_experiment(network, workspace),
                  run_name=f"{network} {folds}-fold on {data.name}@{data.short}",
                  tags={"protocol": f"kfold-{folds}", "network": network, "data_version": data.ref}))
    client = MlflowClient()
    per_fold: dict[int, dict[str, float]] = {}
    children: dict[int, str] = {}
    with mlflow.start_run(**start) as parent:
        id_file.write_text(parent.info.run_id)
        for fold in range(1, folds + 1):
            fold_recipe = recipe.with_overrides({"data.fold": fold})
            fold_dir = run_dir_for(workspace, network, data.version, fold_recipe)
            child = (fold_dir / RUN_ID_FILE).read_text().strip() if (fold_dir / RUN_ID_FILE).is_file() else None
            if child and client.get_run(child).info.status == "FINISHED":
                metrics = {k.split("/", 1)[1]: v for k, v in client.get_run(child).data.metrics.items()
                           if k.startswith("test/") and k.count("/") == 1}
            else:
                outcome = train_tracked(network, data.ref, fold_recipe, resume=(fold_dir / "last.pt").exists(),
                                        parent_run_id=parent.info.run_id, progress=False, workspace=workspace)
                child = outcome.run_id or ""
                metrics = {k.split("/", 1)[1]: v for k, v in outcome.result.test_metrics.items()
                           if k.startswith("test/") and k.count("/") == 1}
                client.set_tag(child, "fold", str(fold))
            per_fold[fold], children[fold] = metrics, child
        mean, std = mean_std(per_fold)
        mlflow.log_metrics({**{f"kfold/{k}_mean": v for k, v in mean.items()},
                            **{f"kfold/{k}_std": v for k, v in std.items()}})
        mlflow.log_dict({"per_fold": per_fold, "mean": mean, "std": std, "children": children},
                        "kfold/summary.json")
    return KFoldOutcome(network, data.ref, per_fold, mean, std, parent.info.run_id, children)
