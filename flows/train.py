"""Flow ``train``: tracked training of one network on one dataset version → ONNX export + parity →
a registered MLflow model version (tagged with its data version and recipe fingerprint)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from fer_platform.workspace import Workspace
from flows.steps import recipe_for, register_model, train_network
from registry.models import ModelVersion


@flow(name="train", flow_run_name="train-{network}")
def train(network: str, data_ref: str, profile: str = "quick",
          overrides: dict[str, Any] | None = None) -> ModelVersion:
    """Train ``network`` on ``data_ref`` (``name@version``) with the ``profile`` recipe plus ``overrides``."""
    workspace = Workspace.load().ensure()  # this flow run's platform context
    recipe = recipe_for(network, profile, overrides)
    outcome = train_network(network, data_ref, recipe, workspace)
    return register_model(outcome, workspace)
