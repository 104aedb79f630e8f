"""A tracked training run: data version → recipe → Trainer with MLflow tracking → outcome.

The one place that wires a training run together; ``fer train`` and the Prefect ``train`` flow both
call :func:`train_tracked`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from filelock import FileLock, Timeout

from fer_core.training.callbacks import Callback, ProgressBar
from fer_core.training.recipe import Recipe
from fer_core.training.trainer import Trainer, TrainResult
from fer_platform.workspace import Workspace
from registry.datasets import DatasetStore, DatasetVersion, parse_ref


class RunExistsError(RuntimeError):
    """A finished or interrupted run of the same recipe on the same data exists (use resume)."""


class RunBusyError(RuntimeError):
    """Another process is training the same recipe on the same data right now (same run folder)."""


@dataclass(frozen=True)
class TrainOutcome:
    """What a tracked training produced."""

    network: str
    data_ref: str  # name@full-version
    recipe: Recipe  # the effective recipe (data-decided model kwargs folded in)
    result: TrainResult
    run_dir: Path
    run_id: str | None  # MLflow run, None when not tracked
    model_uri: str | None  # logged MLflow model


def resolve_recipe(network: str, profile: str = "quick", config: Path | None = None,
                   overrides: Mapping[str, Any] | None = None) -> Recipe:
    """The registered profile recipe of ``network`` with a YAML file and ``key=value`` overrides applied."""
    from fer_core.training.tasks import get_recipe

    recipe = get_recipe(network, profile)
    if config is not None:
        recipe = recipe.with_yaml(config)
    return recipe.with_overrides(dict(overrides or {}))


# Recipe fields that name another network's weights by model version (resolved here, not in fer_core).
WEIGHT_REF_FIELDS = ("data.magnifier_weights",)


def resolve_weight_refs(recipe: Recipe, workspace: Workspace) -> Recipe:
    """Replace ``models:/...`` URIs in :data:`WEIGHT_REF_FIELDS` by the local checkpoint of that version."""
    from registry.models import checkpoint_for

    overrides = {}
    for dotted in WEIGHT_REF_FIELDS:
        section, key = dotted.split(".", 1)
        value = dict(getattr(recipe, section)).get(key)
        if isinstance(value, str) and value.startswith("models:/"):
            overrides[dotted] = str(checkpoint_for(value, workspace))
    return recipe.with_overrides(overrides) if overrides else recipe


def run_dir_for(workspace: Workspace, network: str, data_version: str, recipe: Recipe) -> Path:
    """Deterministic run folder: the same network, data version, recipe and code resume the same run.

    The code fingerprint is part of it like it is of the retrain cache key: after a fix to the
    network's code a resumed (finished) run would register a second, different package for one run.
    """
    from fer_core.training.fingerprint import code_fingerprint

    try:
        code = f"-{code_fingerprint(network)[:8]}"
    except ValueError:  # a model without a training task has no code fingerprint
        code = ""
    return workspace.runs / network / f"{data_version[:12]}-{recipe.fingerprint()}{code}"


# What each split is called in the source dataset, for an honest "measured on" (FER2013's CSV Usage).
_SOURCE_SPLIT_NAMES = {"fer2013": {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}}


def measured_on(source_format: str, test_metrics: dict[str, float]) -> str:
    """Which split the final metrics were measured on, named as the source names it, e.g.
    ``test (PrivateTest)`` or ``val (PublicTest; no test split, and val also chose the best epoch)``."""
    split = next(iter(test_metrics), "").split("/", 1)[0]
    if not split:
        return "nothing (no val or test split)"
    source = _SOURCE_SPLIT_NAMES.get(source_format, {}).get(split)
    note = "; no test split, and val also chose the best epoch" if split == "val" else ""
    return f"{split} ({source}{note})" if source else f"{split}{f' ({note[2:]})' if note else ''}"


def train_tracked(
    network: str,
    data_ref: str,
    recipe: Recipe,
    *,
    resume: bool = False,
    track: bool = True,
    parent_run_id: str | None = None,
    extra_callbacks: tuple[Callback, ...] = (),
    progress: bool = True,
    workspace: Workspace,
) -> TrainOutcome:
    """Train ``network`` on the dataset version ``data_ref`` (``name@version``), tracked in MLflow.

    Raises :class:`RunBusyError` when another process trains the same run folder right now.
    """
    workspace = workspace.ensure()
    name, version = parse_ref(data_ref)
    store = DatasetStore(workspace)
    data = store.get(name, version)
    root = store.pull(name, data.version)
    recipe = resolve_weight_refs(recipe, workspace)
    run_dir = run_dir_for(workspace, network, data.version, recipe)
    # One process per run folder: two identical trainings at once would share the MLflow run (its id
    # is kept in the folder) and register two versions of one run. The lock file sits beside the
    # folder and the OS drops it when its holder dies, so a killed run never wedges --resume.
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir.parent / f"{run_dir.name}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunBusyError(f"another process is training {network} with this recipe on {data.ref} right now "
                           f"(run folder {run_dir}); wait for it or change the recipe") from None
    try:
        return _train_locked(network, data, root, recipe, run_dir, resume=resume, track=track,
                             parent_run_id=parent_run_id, extra_callbacks=extra_callbacks,
                             progress=progress, workspace=workspace)
    finally:
        lock.release()


def _train_locked(network: str, data: DatasetVersion, root: Path, recipe: Recipe, run_dir: Path, *, resume: bool,
                  track: bool, parent_run_id: str | None, extra_callbacks: tuple[Callback, ...],
                  progress: bool, workspace: Workspace) -> TrainOutcome:
    from fer_core.training.tasks import create_task

    task = create_task(network, root, recipe)
    if not resume and (run_dir / "last.pt").exists():
        raise RunExistsError(f"{run_dir} holds a run of this recipe on {data.ref} already; resume it or "
                             "change the recipe")
    callbacks: list[Callback] = [ProgressBar()] if progress else []
    tracker = None
    if track:
        import pandas as pd

        from registry.tracking import MlflowCallback

        tracker = MlflowCallback(network, run_dir, data_ref=data.ref, parent_run_id=parent_run_id,
                                 manifest=pd.read_parquet(root / "manifest.parquet"), workspace=workspace)
        callbacks.append(tracker)
    callbacks.extend(extra_callbacks)
    trainer = Trainer(recipe, task, run_dir, callbacks=callbacks, data_version=data.ref)
    try:
        result = trainer.fit(resume=resume)
    except BaseException:
        if tracker is not None:
            from registry.tracking import end_active_run

            end_active_run("KILLED")
        raise
    model_uri = tracker.model_info.model_uri if tracker is not None and tracker.model_info else None
    if tracker is not None and tracker.run_id:
        from mlflow.tracking import MlflowClient

        MlflowClient().set_tag(tracker.run_id, "measured_on", measured_on(data.source_format, result.test_metrics))
    return TrainOutcome(network=network, data_ref=data.ref, recipe=trainer.recipe, result=result,
                        run_dir=run_dir, run_id=tracker.run_id if tracker else None, model_uri=model_uri)
