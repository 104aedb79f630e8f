"""After training: export the best checkpoint to ONNX, check it against PyTorch, register the run's model.

:func:`export_and_register` is the step between ``train_tracked`` and a promotion. It

1. exports the run's best checkpoint to ONNX (:func:`serving.export.export_onnx`);
2. runs PyTorch and ONNX Runtime on held-out samples of the task's test split (val when the data
   has none) and compares them (max |diff| ≤ ``atol`` on every output, arg-max labels agree);
3. logs ``onnx/model.onnx`` plus a *smoke set* (``onnx/smoke_set.npz``: those held-out inputs and
   PyTorch's outputs for them, which the promotion's Triton smoke test replays) to the training
   run, with metrics ``parity/max_abs_diff``, ``parity/label_agreement`` and tag ``parity_passed``;
4. registers the run's logged model as a new version of ``fer-<network>`` whose tags trace it
   (data version and whether it passed its data gate, git commit, recipe fingerprint, parity, the
   primary metric and the key metrics of the final split) and makes it the ``challenger``.

A failed parity check still registers the version (tagged ``parity_passed=false``), so the
promotion's ``onnx_parity`` gate refuses it by name and the record of why stays in the registry.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from fer_core.training.recipe import Recipe
from fer_core.workspace import Workspace
from registry import models as reg
from registry.datasets import DatasetStore, parse_ref
from registry.tracking import git_commit, setup_tracking
from registry.training import TrainOutcome

PARITY_ATOL = 1e-4
ONNX_ARTIFACT = "onnx/model.onnx"
SMOKE_ARTIFACT = "onnx/smoke_set.npz"
# Held-out samples kept for parity and the smoke set: enough to catch a wrong export, small to log.
MAX_HELD_OUT = 32

__all__ = ["ONNX_ARTIFACT", "SMOKE_ARTIFACT", "PARITY_ATOL", "ParitySummary", "HeldOut", "export_and_register",
           "register_run", "held_out_inputs", "data_gate_status", "version_tags"]


@dataclass(frozen=True)
class ParitySummary:
    """What the parity check on held-out samples found."""

    max_abs_diff: float
    label_agreement: float
    passed: bool
    num_samples: int
    split: str


@dataclass(frozen=True)
class HeldOut:
    """Held-out model inputs of a dataset version, the split they come from and the task's primary metric."""

    inputs: np.ndarray
    split: str
    primary_metric: str


def held_out_inputs(network: str, data_ref: str, recipe: Recipe, max_samples: int = MAX_HELD_OUT,
                    workspace: Workspace | None = None) -> HeldOut:
    """Up to ``max_samples`` model inputs of the test split (val if empty) of ``data_ref``."""
    from fer_core.training.tasks import create_task

    name, version = parse_ref(data_ref)
    root = DatasetStore(workspace).pull(name, version)
    task = create_task(network, root, recipe)
    datasets = task.build_datasets(recipe)
    split = next((s for s in ("test", "val") if s in datasets and len(datasets[s])), None)
    if split is None:
        raise ValueError(f"{data_ref} has no test or val samples to check the export on")
    dataset = datasets[split]
    inputs = [dataset[i][0].numpy() for i in range(min(max_samples, len(dataset)))]
    return HeldOut(np.stack(inputs).astype(np.float32), split, task.primary_metric)


def data_gate_status(data_ref: str, workspace: Workspace | None = None) -> str:
    """``passed`` when the data version is in the DatasetStore index (only gated data gets there)."""
    name, version = parse_ref(data_ref)
    if not version:
        return "unknown"
    return "passed" if any(v.version == version for v in DatasetStore(workspace).list(name)) else "not_in_index"


def version_tags(*, data_ref: str, data_gate: str, commit: str, recipe: Recipe, parity: ParitySummary,
                 primary_metric: str, metrics: Mapping[str, float]) -> dict[str, str]:
    """The tags a registered version carries (all strings; metric values with 4 decimals)."""
    split_metrics = {k: float(v) for k, v in metrics.items() if k.count("/") == 1 and math.isfinite(float(v))}
    primary_key = f"{parity.split}/{primary_metric}"
    tags = {
        "data_version": data_ref, "data_gate": data_gate, "git_commit": commit,
        "recipe_fingerprint": recipe.fingerprint(), "profile": recipe.profile,
        "parity_passed": "true" if parity.passed else "false",
        "parity_max_abs_diff": f"{parity.max_abs_diff:.3g}",
        "parity_label_agreement": f"{parity.label_agreement:.4f}",
        "primary_metric": primary_key,
    }
    if primary_key in split_metrics:
        tags["primary_metric_value"] = f"{split_metrics[primary_key]:.4f}"
    tags.update({f"metric.{k}": f"{v:.4f}" for k, v in sorted(split_metrics.items())})
    return tags


def _export_and_check(checkpoint: Path, inputs: np.ndarray, out_dir: Path, atol: float,
                      split: str) -> tuple[Path, Path, ParitySummary]:
    """ONNX file, smoke set file and parity summary of a checkpoint on ``inputs``."""
    import torch

    from fer_core.training.trainer import load_model_from_checkpoint
    from serving.export import check_parity, export_onnx

    model, _ = load_model_from_checkpoint(checkpoint)
    onnx_path = export_onnx(model, out_dir / "model.onnx")
    report = check_parity(model, onnx_path, inputs=inputs, atol=atol)
    with torch.no_grad():
        reference = {k: v.numpy() for k, v in model.outputs_as_dict(model(torch.from_numpy(inputs))).items()}
    smoke_path = out_dir / "smoke_set.npz"
    # Keys: "input" and "output:<name>" (PyTorch's answer, what Triton must reproduce).
    np.savez_compressed(smoke_path, input=inputs, **{f"output:{k}": v for k, v in reference.items()})
    parity = ParitySummary(max_abs_diff=report.max_abs_diff, label_agreement=report.label_agreement,
                           passed=report.passed, num_samples=report.num_samples, split=split)
    return onnx_path, smoke_path, parity


def _register(network: str, run_id: str, model_uri: str, checkpoint: Path, data_ref: str, recipe: Recipe,
              metrics: Mapping[str, float], commit: str, atol: float, set_challenger: bool,
              workspace: Workspace | None) -> reg.ModelVersion:
    from mlflow.tracking import MlflowClient

    held_out = held_out_inputs(network, data_ref, recipe, workspace=workspace)
    setup_tracking(workspace)
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, smoke_path, parity = _export_and_check(checkpoint, held_out.inputs, Path(tmp), atol,
                                                            held_out.split)
        client.log_artifact(run_id, str(onnx_path), "onnx")
        client.log_artifact(run_id, str(smoke_path), "onnx")
    client.log_metric(run_id, "parity/max_abs_diff", parity.max_abs_diff)
    client.log_metric(run_id, "parity/label_agreement", parity.label_agreement)
    client.set_tag(run_id, "parity_passed", "true" if parity.passed else "false")
    tags = version_tags(data_ref=data_ref, data_gate=data_gate_status(data_ref, workspace), commit=commit,
                        recipe=recipe, parity=parity, primary_metric=held_out.primary_metric, metrics=metrics)
    registered = reg.register(network, model_uri, run_id, tags, workspace)
    if set_challenger:
        reg.set_alias(network, "challenger", registered.version, workspace)
        registered = reg.get_version(network, registered.version, workspace)
    return registered


def export_and_register(outcome: TrainOutcome, *, atol: float = PARITY_ATOL, set_challenger: bool = True,
                        workspace: Workspace | None = None) -> reg.ModelVersion:
    """Export, parity-check and register the model of a tracked training (see the module docstring)."""
    if not outcome.run_id or not outcome.model_uri:
        raise ValueError("export_and_register needs a tracked training (run_id and logged model); "
                         "train without --no-track")
    from mlflow.tracking import MlflowClient

    setup_tracking(workspace)
    commit = MlflowClient().get_run(outcome.run_id).data.tags.get("git_commit") or git_commit()
    return _register(outcome.network, outcome.run_id, outcome.model_uri, outcome.result.best_checkpoint,
                     outcome.data_ref, outcome.recipe, outcome.result.test_metrics, commit, atol,
                     set_challenger, workspace)


def _logged_model_uri(run_id: str, experiment_id: str) -> str:
    """URI of the model a run logged (MLflow 3 logged model, else the run-relative ``model`` folder)."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient().search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    models = [m for m in found if m.name == "model"] or list(found)
    return f"models:/{models[0].model_id}" if models else f"runs:/{run_id}/model"


def register_run(network: str, run_id: str, *, atol: float = PARITY_ATOL, set_challenger: bool = True,
                 workspace: Workspace | None = None) -> reg.ModelVersion:
    """:func:`export_and_register` for a finished MLflow run (``fer register NETWORK --run RUN_ID``).

    Everything comes from the run: its ``checkpoint/best.pt`` artifact (weights, recipe, data
    version), its final-split metrics, its logged model and its ``git_commit`` tag.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from fer_core.training.checkpoint import load_checkpoint

    setup_tracking(workspace)
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"no MLflow run {run_id!r}") from None
    if run.data.tags.get("network", network) != network:
        raise ValueError(f"run {run_id} trained {run.data.tags['network']!r}, not {network!r}")
    if run.info.status != "FINISHED":
        raise ValueError(f"run {run_id} is {run.info.status}, not FINISHED; finish (resume) it first")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(client.download_artifacts(run_id, "checkpoint", tmp))
        except (MlflowException, OSError):
            folder = Path(tmp)
        checkpoints = sorted(folder.glob("*.pt"))
        if not checkpoints:
            raise ValueError(f"run {run_id} logged no checkpoint (checkpoint/*.pt)")
        state = load_checkpoint(checkpoints[0])
        recipe = Recipe.from_dict(state["recipe"])
        data_ref = state.get("data_version") or run.data.tags.get("data_version", "")
        if not data_ref:
            raise ValueError(f"run {run_id} records no data version")
        metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("test/", "val/"))}
        # A run with a test split evaluated its final model there; val/* are then per-epoch values.
        if any(k.startswith("test/") for k in metrics):
            metrics = {k: v for k, v in metrics.items() if k.startswith("test/")}
        commit = run.data.tags.get("git_commit") or git_commit()
        model_uri = _logged_model_uri(run_id, run.info.experiment_id)
        return _register(network, run_id, model_uri, checkpoints[0], data_ref, recipe, metrics, commit, atol,
                         set_challenger, workspace)
