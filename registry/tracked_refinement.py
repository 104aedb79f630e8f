"""AU noisy-label rounds with data versions and tracking: DVC for each refined label table, MLflow
for each round.

:func:`run_tracked_au_rounds` runs :func:`fer_core.training.label_refinement.run_au_rounds` on a versioned
dataset with these hooks:

* every round's refined label table is added to the workspace's :class:`~registry.datasets.DatasetStore`
  as ``<name>-round<k>`` with ``parent`` = the previous round's ref (round 1's parent is the input
  version), so ``fer data`` shows the lineage and the hash alone restores any round's labels;
* one MLflow parent run (experiment ``fer-au_cotrain``, tag ``au_rounds=parent``) holds the
  settings and per-round summary metrics (``round/...`` at step k) plus tags
  ``round<k>.data_version`` / ``round<k>.run_id``; each round (0 = the base training) is a nested
  child run logged by :class:`~registry.tracking.MlflowCallback` with tags ``au_round``,
  ``data_version`` (its label table) and ``labels_parent`` (the table it was refined from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from fer_core.data.manifest import MANIFEST_FILE
from fer_core.training.label_refinement import AURoundsResult, RoundHooks, RoundResult, run_au_rounds
from fer_core.training.callbacks import Callback
from fer_core.training.recipe import Recipe
from fer_platform.workspace import Workspace
from registry.datasets import DatasetStore, DatasetVersion, parse_ref
from registry.tracking import MlflowCallback, get_or_create_experiment, setup_tracking


@dataclass
class TrackedRounds:
    """A finished tracked run of the rounds."""

    result: AURoundsResult
    parent_run_id: str
    child_run_ids: dict[int, str] = field(default_factory=dict)  # round -> MLflow run id
    versions: dict[int, DatasetVersion] = field(default_factory=dict)  # round -> label table version


class TrackedRoundHooks(RoundHooks):
    """Versions each refined table with DVC and gives each round an MLflow child run."""

    def __init__(self, store: DatasetStore, base: DatasetVersion, base_root: Path, parent_run_id: str,
                 settings: dict[str, Any], log_models: bool = True) -> None:
        self.store, self.base, self.parent_run_id = store, base, parent_run_id
        self.settings, self.log_models = settings, log_models
        self.roots: dict[str, Path] = {base.ref: Path(base_root)}
        self.parents: dict[str, str] = {base.ref: base.parent}
        self.versions: dict[int, DatasetVersion] = {0: base}
        self.trackers: dict[int, MlflowCallback] = {}

    def callbacks(self, round_index: int, data_ref: str, run_dir: Path) -> list[Callback]:
        root = self.roots[data_ref]
        tracker = MlflowCallback(
            "au_cotrain", run_dir, data_ref=data_ref, manifest=pd.read_parquet(root / MANIFEST_FILE),
            tags={"au_round": str(round_index), "labels_parent": self.parents.get(data_ref, ""),
                  "au_rounds_parent": self.parent_run_id},
            parent_run_id=self.parent_run_id, run_name=f"round{round_index}", log_model=self.log_models,
            workspace=self.store.workspace,
        )
        self.trackers[round_index] = tracker
        return [tracker]

    def publish(self, round_index: int, prepared: Path, parent_ref: str) -> tuple[Path, str]:
        name = f"{self.base.name}-round{round_index}"
        version = self.store.add(name, prepared, source=f"au-rounds:{self.parent_run_id}", parent=parent_ref,
                                 extra={"round": round_index, **self.settings})
        root = self.store.path(name)
        self.roots[version.ref], self.parents[version.ref] = root, parent_ref
        self.versions[round_index] = version
        return root, version.ref

    def on_round_end(self, result: RoundResult) -> None:
        client = MlflowClient()
        k = result.round
        row = result.summary()
        metrics = {"round/labels_changed": float(result.labels_changed)}
        if result.agreement_with_truth is not None:
            metrics["round/agreement_with_truth"] = result.agreement_with_truth
        for key in ("mean_f1", "mean_f1_truth", "mean_f1_noisy_labels"):
            value = row.get(key)
            if value is not None and math.isfinite(value):
                metrics[f"round/{row['split']}_{key}"] = float(value)
        for key, value in metrics.items():
            client.log_metric(self.parent_run_id, key, value, step=k)
        client.set_tag(self.parent_run_id, f"round{k}.data_version", result.data_ref)
        tracker = self.trackers.get(k)
        if tracker is not None and tracker.run_id:
            client.set_tag(self.parent_run_id, f"round{k}.run_id", tracker.run_id)


def run_tracked_au_rounds(
    data: str,
    recipe: Recipe,
    rounds: int = 2,
    *,
    gamma: float = 0.3,
    retrain: str = "full",
    round_epochs: int | None = None,
    workspace: Workspace,
    log_models: bool = True,
    run_name: str | None = None,
) -> TrackedRounds:
    """Run the AU rounds on dataset ``data`` (``NAME@VERSION`` or ``NAME``), versioned and tracked."""
    if recipe.network != "au_cotrain":
        raise ValueError(f"AU rounds train au_cotrain, got a recipe for {recipe.network!r}")
    workspace = workspace.ensure()
    store = DatasetStore(workspace)
    name, version = parse_ref(data)
    base = store.get(name, version)
    root = store.pull(name, base.version)
    setup_tracking(workspace)
    experiment_id = get_or_create_experiment(recipe.network, workspace)
    settings = {"gamma": gamma, "retrain": retrain, "rounds": rounds, "round_epochs": round_epochs}
    parent = mlflow.start_run(experiment_id=experiment_id, run_name=run_name or f"au-rounds {base.name}@{base.short}")
    parent_id = parent.info.run_id
    try:
        mlflow.log_params({**{k: str(v) for k, v in settings.items()}, "profile": recipe.profile,
                           "recipe_fingerprint": recipe.fingerprint()})
        mlflow.set_tags({"au_rounds": "parent", "network": recipe.network, "data_version": base.ref})
        hooks = TrackedRoundHooks(store, base, root, parent_id, settings, log_models)
        run_dir = workspace.runs / recipe.network / f"rounds-{base.short}-{recipe.fingerprint()}-{parent_id[:8]}"
        result = run_au_rounds(recipe, root, run_dir, rounds, gamma=gamma, retrain=retrain,
                               round_epochs=round_epochs, hooks=hooks, data_ref=base.ref)
    except BaseException:
        while mlflow.active_run() is not None:  # a failed round's child run, then the parent
            mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()
    children = {k: t.run_id for k, t in hooks.trackers.items() if t.run_id}
    return TrackedRounds(result=result, parent_run_id=parent_id, child_run_ids=children, versions=hooks.versions)


# Tags of a version registered from the rounds (``register_final_round``): how many rounds refined
# its labels, and the base data version and recipe they started from -- the rounds' part of the
# retrain cache key (``flows.cache.find_rounds_version``).
ROUNDS_TAG = "au_rounds"
ROUNDS_BASE_DATA_TAG = "au_rounds_base_data"
ROUNDS_BASE_RECIPE_TAG = "au_rounds_base_recipe"


def register_final_round(tracked: TrackedRounds, base_ref: str, base_recipe_fingerprint: str, *,
                         workspace: Workspace):
    """Register the last round's model -- the one the refined labels trained, trunks and clean heads
    included with ``retrain="full"`` -- as a version of ``au_cotrain``, through the same export,
    parity and package path as any training run, tagged with the rounds it took."""
    from registry import models as reg
    from registry.export import register_run

    if not tracked.child_run_ids:
        raise ValueError("the AU rounds recorded no round run to register")
    last = max(tracked.child_run_ids)
    version = register_run("au_cotrain", tracked.child_run_ids[last], workspace=workspace)
    return reg.set_version_tags("au_cotrain", version.version, {
        ROUNDS_TAG: str(last), ROUNDS_BASE_DATA_TAG: base_ref, ROUNDS_BASE_RECIPE_TAG: base_recipe_fingerprint,
    }, workspace)

