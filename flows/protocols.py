"""Flow ``loso``: a leave-one-subject-out protocol run (:func:`registry.protocols.train_loso`) as one
Prefect task; its MLflow parent run has one child run per subject and the pooled metrics.

Folds run one after another inside the task (each fold resumes from what a killed run saved);
running folds in parallel on a work pool is not built yet.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from fer_platform.workspace import Workspace
from flows.tasks import recipe_for, train_loso_protocol


@flow(name="loso", flow_run_name="loso-{network}")
def loso(network: str, data_ref: str, profile: str = "quick", overrides: dict[str, Any] | None = None,
         subjects: list[str] | None = None) -> dict[str, Any]:
    """LOSO of ``network`` on ``data_ref``; returns pooled metrics and the MLflow run ids."""
    recipe = recipe_for(network, profile, overrides)
    workspace = Workspace.load().ensure()  # this flow run's platform context
    return train_loso_protocol(network, data_ref, recipe, workspace, subjects)
