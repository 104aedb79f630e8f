"""Flow ``au_noisy_rounds``: AU co-training, then K rounds that refine the noisy labels.

Each round's refined label table is a DVC dataset version (parent = the previous round) and each
round an MLflow child run of one parent run (``registry.tracked_refinement``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from fer_platform.workspace import Workspace
from flows.steps import recipe_for, register_final_round, run_au_rounds
from registry.models import ModelVersion


@flow(name="au_noisy_rounds")
def au_noisy_rounds(data_ref: str, rounds: int = 2, profile: str = "quick", overrides: dict[str, Any] | None = None,
                    gamma: float = 0.3, retrain: str = "full", round_epochs: int | None = None) -> dict[str, Any]:
    """Run the rounds on the AU dataset ``data_ref``; returns the MLflow parent run, child runs and versions."""
    recipe = recipe_for("au_cotrain", profile, overrides)
    workspace = Workspace.load().ensure()  # this flow run's platform context
    tracked = run_au_rounds(data_ref, recipe, rounds, gamma, retrain, round_epochs, workspace)
    return {"parent_run_id": tracked.parent_run_id,
            "child_run_ids": {str(k): v for k, v in tracked.child_run_ids.items()},
            "data_versions": {str(k): v.ref for k, v in tracked.versions.items()}}


@flow(name="train_au_rounds", flow_run_name="train-au_cotrain-{rounds}-rounds")
def train_au_rounds(data_ref: str, rounds: int, profile: str = "quick", overrides: dict[str, Any] | None = None,
                    gamma: float = 0.3, round_epochs: int | None = None) -> ModelVersion:
    """``retrain_all``'s training of au_cotrain with label refinement: the co-training, ``rounds``
    rounds retraining the whole network (``retrain="full"``: the refined labels reach the trunks and
    the clean heads that are served), then the last round's model registered as the new version."""
    recipe = recipe_for("au_cotrain", profile, overrides)
    workspace = Workspace.load().ensure()  # this flow run's platform context
    tracked = run_au_rounds(data_ref, recipe, rounds, gamma, "full", round_epochs, workspace)
    return register_final_round(tracked, data_ref, recipe, workspace)

