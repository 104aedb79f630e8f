"""Research protocols as tracked runs: leave-one-subject-out (LOSO) for micro-expressions, k-fold.

LOSO is three steps, so folds can run anywhere the workspace is shared (one process, or a flow run
per fold on a Prefect work pool, :mod:`flows.protocols`):

1. :func:`plan_loso` resolves the data (one dataset version, or the MEGC 2019 composite of several,
   :mod:`fer_core.data.composite`, merged under the protocol's run folder) and opens one parent
   MLflow run (tag ``protocol=loso``); planning again finds the same parent (its id is kept in the
   run folder), so a killed protocol resumes;
2. :func:`train_loso_fold` trains one held-out subject
   (:func:`fer_core.training.tasks.micro.run_loso` with that subject) as a child run (``fold=<subject>``,
   subject ids kept as strings, e.g. SAMM's ``006``) and saves its test labels and predictions
   (``predictions.npz`` in its fold folder, ``fold/predictions.json`` in the child run); a fold that
   has them is not trained again;
3. :func:`finish_loso` pools what the folds saved -- every fold's predictions concatenated, as MEGC
   reports ``loso/uf1``, ``loso/uar``, ``loso/accuracy`` -- plus, for a composite, the same per part
   (``loso/casme2/uf1`` ...: the part's subjects pooled), and ends the parent run.

:func:`train_loso` runs the three in this process, folds one after another. ``train_kfold`` does
k-fold (DFEW: mean ± std of the folds' test metrics).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fer_core.errors import StateError, UsageError
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
    per_part: dict[str, dict[str, float]] | None = None  # composite: metrics of each part's subjects


@dataclass(frozen=True)
class LosoPlan:
    """Where a LOSO protocol's folds train and what they train on (JSON-serialisable)."""

    network: str
    data_ref: str  # "name@version", or "composite:" + the parts' refs joined by "+"
    data_root: str
    run_dir: str
    subjects: tuple[str, ...]
    parent_run_id: str
    parts: tuple[str, ...] = ()  # composite: the part names, in order


def _resolve_data(data_refs: Sequence[str], store: DatasetStore, run_base) -> tuple[str, Path, tuple[str, ...], list]:
    """(data ref label, prepared root, composite part names, dataset versions) of the protocol's data."""
    from fer_core.data.composite import merge_composite

    versions = [store.get(*parse_ref(ref)) for ref in data_refs]
    if len(versions) == 1:
        return versions[0].ref, store.pull(versions[0].name, versions[0].version), (), versions
    names = [v.name for v in versions]
    if len(set(names)) != len(names):
        raise UsageError(f"the composite protocol merges different datasets; got {names}")
    label = "composite:" + "+".join(v.ref for v in versions)
    root = run_base(versions) / "data"
    if not (root / "manifest.parquet").is_file():
        try:
            merge_composite({v.name: store.pull(v.name, v.version) for v in versions}, root,
                            provenance={"versions": [v.ref for v in versions]})
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return label, root, tuple(names), versions


def plan_loso(network: str, data_refs: str | Sequence[str], recipe: Recipe, *, subjects: Sequence[str] | None = None,
              workspace: Workspace) -> LosoPlan:
    """Resolve the data and open (or find) the parent run; several ``data_refs``: the composite."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    workspace = workspace.ensure()
    setup_tracking(workspace)
    refs = [data_refs] if isinstance(data_refs, str) else list(data_refs)
    store = DatasetStore(workspace)

    def run_base(versions) -> Path:
        # The composite's folder is keyed by every part's version; a single set's by its own.
        key = hashlib.sha256("+".join(v.version for v in versions).encode()).hexdigest()
        path = run_dir_for(workspace, network, key if len(versions) > 1 else versions[0].version, recipe)
        return path / ("loso-composite" if len(versions) > 1 else "loso")

    label, root, parts, versions = _resolve_data(refs, store, run_base)
    run_dir = run_base(versions)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = pd.read_parquet(root / "manifest.parquet")
    all_subjects = sorted(set(manifest["subject"].astype(str)))
    chosen = tuple(all_subjects if subjects is None else [str(s) for s in subjects])
    unknown = sorted(set(chosen) - set(all_subjects))
    if unknown:
        raise UsageError(f"subjects {unknown} are not in the data; subjects: {all_subjects}")
    if len(all_subjects) < 2:
        raise UsageError("leave-one-subject-out needs at least two subjects")
    id_file = run_dir / PARENT_ID_FILE
    client = MlflowClient()
    if id_file.is_file():
        parent_id = id_file.read_text().strip()
    else:
        short = "+".join(f"{v.name}@{v.short}" for v in versions)
        run = client.create_run(get_or_create_experiment(network, workspace),
                                run_name=f"{network} LOSO on {short}",
                                tags={"protocol": "loso-composite" if parts else "loso", "network": network,
                                      "data_version": label, **({"composite_parts": ",".join(parts)} if parts else {})})
        parent_id = run.info.run_id
        client.log_param(parent_id, "num_folds", len(chosen))
        id_file.write_text(parent_id)
    return LosoPlan(network, label, str(root), str(run_dir), chosen, parent_id, parts)


def _fold_dir(plan: LosoPlan, subject: str) -> Path:
    from fer_core.training.tasks.micro import _folder_name

    return Path(plan.run_dir) / _folder_name(subject)


def train_loso_fold(plan: LosoPlan, subject: str, recipe: Recipe, *, workspace: Workspace) -> str:
    """Train the fold holding out ``subject`` (unless it is done); returns its child run id."""
    import mlflow

    from fer_core.training.tasks.micro import run_loso
    from registry.tracking import MlflowCallback, RUN_ID_FILE

    if subject not in plan.subjects:
        raise UsageError(f"subject {subject!r} is not a fold of this protocol; folds: {list(plan.subjects)}")
    setup_tracking(workspace)
    fold_dir = _fold_dir(plan, subject)
    if (fold_dir / "predictions.npz").is_file():
        return (fold_dir / RUN_ID_FILE).read_text().strip()
    trackers: list[MlflowCallback] = []

    def factory(s: str, d: Path) -> list:
        trackers.append(MlflowCallback(plan.network, d, data_ref=plan.data_ref, parent_run_id=plan.parent_run_id,
                                       run_name=f"fold {s}", tags={"protocol": "loso", "fold": s},
                                       log_model=False, workspace=workspace))
        return trackers

    result = run_loso(recipe, Path(plan.data_root), Path(plan.run_dir), callbacks_factory=factory, subjects=[subject])
    fold = result.folds[0]
    child = trackers[0].run_id
    mlflow.tracking.MlflowClient().log_dict(
        child, {"subject": subject, "y_true": fold.y_true.tolist(), "y_pred": fold.y_pred.tolist(),
                "label_names": list(result.label_names)}, "fold/predictions.json")
    # Written last: its presence is what "this fold is done" means.
    tmp = fold_dir / "predictions.tmp.npz"
    np.savez(tmp, y_true=fold.y_true, y_pred=fold.y_pred, label_names=np.array(result.label_names))
    tmp.replace(fold_dir / "predictions.npz")
    return child


def finish_loso(plan: LosoPlan, *, workspace: Workspace, resumed: Sequence[str] = ()) -> ProtocolOutcome:
    """Pool the folds' saved predictions into the parent run's metrics and end it."""
    from mlflow.tracking import MlflowClient

    from fer_core.data.composite import part_of
    from registry.tracking import RUN_ID_FILE

    setup_tracking(workspace)
    folds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    children: dict[str, str] = {}
    label_names: tuple[str, ...] = ()
    missing = [s for s in plan.subjects if not (_fold_dir(plan, s) / "predictions.npz").is_file()]
    if missing:
        raise StateError(f"LOSO folds {missing} have not finished; nothing was pooled (run the protocol again)")
    for subject in plan.subjects:
        z = np.load(_fold_dir(plan, subject) / "predictions.npz")
        folds[subject] = (z["y_true"], z["y_pred"])
        label_names = tuple(str(n) for n in z["label_names"])
        children[subject] = (_fold_dir(plan, subject) / RUN_ID_FILE).read_text().strip()

    def pooled_over(subjects: Sequence[str]) -> dict[str, float]:
        y_true = np.concatenate([folds[s][0] for s in subjects])
        y_pred = np.concatenate([folds[s][1] for s in subjects])
        return classification_metrics(y_true, y_pred, len(label_names), label_names)

    pooled = pooled_over(plan.subjects)
    per_fold = {s: classification_metrics(folds[s][0], folds[s][1], len(label_names), label_names)
                for s in plan.subjects}
    per_part = None
    metrics = {f"loso/{k}": v for k, v in pooled.items() if "/" not in k}
    if plan.parts:
        per_part = {part: pooled_over([s for s in plan.subjects if part_of(s) == part]) for part in plan.parts
                    if any(part_of(s) == part for s in plan.subjects)}
        metrics.update({f"loso/{part}/{k}": v for part, m in per_part.items() for k, v in m.items() if "/" not in k})
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(plan.parent_run_id, key, float(value))
    client.log_dict(plan.parent_run_id, {"pooled": pooled, "per_fold": per_fold, "per_part": per_part,
                                         "children": children}, "loso/summary.json")
    client.set_terminated(plan.parent_run_id, "FINISHED")
    return ProtocolOutcome(plan.network, plan.data_ref, pooled, per_fold, plan.parent_run_id, children,
                           tuple(resumed), per_part)


def train_loso(network: str, data_ref: str | Sequence[str], recipe: Recipe, *, subjects: list[str] | None = None,
               workspace: Workspace) -> ProtocolOutcome:
    """Leave-one-subject-out in this process, fold after fold, tracked and resumable by fold;
    several ``data_ref``: the MEGC 2019 composite of those sets."""
    plan = plan_loso(network, data_ref, recipe, subjects=subjects, workspace=workspace)
    resumed = [s for s in plan.subjects if (_fold_dir(plan, s) / "predictions.npz").is_file()]
    for subject in plan.subjects:
        train_loso_fold(plan, subject, recipe, workspace=workspace)
    return finish_loso(plan, workspace=workspace, resumed=resumed)


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
