"""After training: export the best checkpoint into a model package, check it, register it in MLflow.

:func:`export_and_register` is the step between ``train_tracked`` and a promotion. It

1. exports the run's best checkpoint to ONNX (:func:`serving.export.export_onnx`) and checks it
   against PyTorch on held-out samples of the task's test split (val when the data has none),
   decoded by training's own decode (max |diff| ≤ ``atol`` on every output, arg-max labels agree);
2. writes the **model package** (:mod:`serving.package`): the ONNX file, the metadata with the
   input-pipeline spec of the effective recipe (face handling: the version's choice, default from
   ``data.align_faces``), the code fingerprint and a smoke set of *raw encoded* held-out samples
   with the answers of the full pipeline; the package's pipeline must rebuild training's inputs
   from those raw bytes (``pipeline/max_abs_diff``);
3. logs the package to the run (``package/``) with its digest as the immutable run *parameter*
   ``package_sha256``, metrics ``parity/*`` and ``pipeline/max_abs_diff``, and the package as an
   MLflow model (:mod:`registry.pyfunc`: a raw-image pyfunc plus the ``onnx`` flavour);
4. registers that logged model as a new version of ``fer-<network>`` (linked to the run and its
   logged model; the run's training dataset is logged as the model's input) whose tags trace it
   (data version and gate, git commit, recipe and code fingerprints, parity, key metrics) and
   makes it the ``challenger``.

A failed parity check still registers the version (tagged ``parity_passed=false``), so the
promotion's ``onnx_parity`` gate refuses it by name and the record of why stays in the registry.
Tags are for people: promotion re-checks what matters from the package and the run's params.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fer_core.training.recipe import Recipe
from fer_platform.workspace import Workspace
from registry import models as reg
from registry.datasets import DatasetStore, parse_ref
from registry.tracking import git_commit, setup_tracking
from registry.training import TrainOutcome

PARITY_ATOL = 1e-4
PACKAGE_ARTIFACT = "package"
ONNX_ARTIFACT = "package/model.onnx"
PACKAGE_DIGEST_PARAM = "package_sha256"
# Held-out samples kept for parity and the smoke set: enough to catch a wrong export, small to log.
MAX_HELD_OUT = 32
SMOKE_SAMPLES = 16

__all__ = ["ONNX_ARTIFACT", "PACKAGE_ARTIFACT", "PACKAGE_DIGEST_PARAM", "PARITY_ATOL", "ParitySummary", "HeldOut",
           "export_and_register", "register_run", "held_out", "held_out_inputs", "raw_sample", "data_gate_status",
           "version_tags"]


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
    """Held-out samples of a dataset version: training-decoded model inputs, the same samples raw
    (decoded uint8 images: one, or a clip's frames), their targets, the split and the primary metric."""

    inputs: np.ndarray
    split: str
    primary_metric: str
    raw: tuple[tuple[np.ndarray, ...], ...] = ()
    targets: tuple[dict, ...] = ()
    # The input-pipeline spec training decoded these samples with (the task's, with choices such as
    # data.align_faces "auto" resolved against the dataset); None: derive it from the recipe.
    pipeline: Any = None


def raw_sample(root: Path, row, metadata) -> tuple[np.ndarray, ...]:
    """The raw pixels of one manifest row as serving receives them: an image, a clip's frames, or
    for onset/apex networks the clip's (onset, apex) frames (the manifest knows the apex, a user
    sending two frames does too)."""
    from fer_core.data.samples import read_clip, read_image

    if len(metadata.input.shape) != 4:
        return (read_image(root, row["path"]),)
    frames = read_clip(root, row["path"])
    if metadata.task == "micro" and metadata.input.shape[0] == 2:
        from fer_core.training.tasks.micro import clip_key_frames

        onset, apex = clip_key_frames(frames, int(row["onset"]), int(row["apex"]), int(row["offset"]))
        return (frames[onset], frames[apex])
    return tuple(frames)



def held_out_split(network: str, data_ref: str, recipe: Recipe, workspace, purpose: str):
    """The task of ``network`` on ``data_ref``, the held-out split's name (test, else val) and the split."""
    from fer_core.training.tasks import create_task

    name, version = parse_ref(data_ref)
    root = DatasetStore(workspace).pull(name, version)
    task = create_task(network, root, recipe)
    datasets = task.build_datasets(recipe)
    split = next((s for s in ("test", "val") if s in datasets and len(datasets[s])), None)
    if split is None:
        raise ValueError(f"{data_ref} has no test or val samples {purpose}")
    return task, split, datasets[split]

def held_out(network: str, data_ref: str, recipe: Recipe, max_samples: int = MAX_HELD_OUT, *,
             workspace: Workspace) -> HeldOut:
    """Up to ``max_samples`` samples of the test split (val if empty) of ``data_ref``, both as
    training decodes them and raw."""
    task, split, dataset = held_out_split(network, data_ref, recipe, workspace, "to check the export on")
    count = min(max_samples, len(dataset))
    items = [dataset[i] for i in range(count)]
    raw = tuple(raw_sample(dataset.root, dataset.rows.iloc[i], task.meta) for i in range(count))
    inputs = np.stack([x.numpy() for x, _ in items]).astype(np.float32)
    pipeline = task.input_pipeline() if hasattr(task, "input_pipeline") else None
    return HeldOut(inputs, split, task.primary_metric, raw, tuple(t for _, t in items), pipeline)


def held_out_inputs(network: str, data_ref: str, recipe: Recipe, max_samples: int = MAX_HELD_OUT, *,
                    workspace: Workspace) -> HeldOut:
    """Alias of :func:`held_out` (kept for callers of the model-input-only version)."""
    return held_out(network, data_ref, recipe, max_samples, workspace=workspace)


def data_gate_status(data_ref: str, workspace: Workspace) -> str:
    """``passed`` when the data version is in the DatasetStore index (only gated data gets there)."""
    name, version = parse_ref(data_ref)
    if not version:
        return "unknown"
    return "passed" if any(v.version == version for v in DatasetStore(workspace).list(name)) else "not_in_index"


def version_tags(*, data_ref: str, data_gate: str, commit: str, recipe: Recipe, parity: ParitySummary,
                 primary_metric: str, metrics: Mapping[str, float], code_fingerprint: str = "",
                 package_digest: str = "", face_handling: str = "") -> dict[str, str]:
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
    extra = {"code_fingerprint": code_fingerprint, "package_sha256": package_digest, "face_handling": face_handling}
    tags.update({k: v for k, v in extra.items() if v})
    if primary_key in split_metrics:
        tags["primary_metric_value"] = f"{split_metrics[primary_key]:.4f}"
    tags.update({f"metric.{k}": f"{v:.4f}" for k, v in sorted(split_metrics.items())})
    return tags


def _export_and_check(checkpoint: Path, held: HeldOut, out_dir: Path, atol: float, *, recipe: Recipe,
                      face: str | None, info: Mapping[str, str]):
    """Package folder, parity summary and pipeline max |diff| of a checkpoint on held-out samples."""
    from fer_core.data.pipeline import InputPipeline
    from fer_core.training.trainer import load_model_from_checkpoint
    from serving.export import check_parity, export_onnx
    from serving.package import PackageRunner, write_package

    model, _ = load_model_from_checkpoint(checkpoint)
    onnx_path = export_onnx(model, out_dir / "export" / "model.onnx")
    report = check_parity(model, onnx_path, inputs=held.inputs, atol=atol)
    parity = ParitySummary(max_abs_diff=report.max_abs_diff, label_agreement=report.label_agreement,
                           passed=report.passed, num_samples=report.num_samples, split=held.split)
    if held.pipeline is not None:
        pipeline = held.pipeline.with_face(face) if face else held.pipeline
    else:
        pipeline = InputPipeline.for_model(model.metadata, recipe.data, face=face)
    package = write_package(out_dir / "package", onnx_path, model.metadata, pipeline, held.raw[:SMOKE_SAMPLES],
                            info={**info, "split": held.split})
    # The package's pipeline must rebuild training's inputs from the raw bytes it stores (face
    # handling off: a detector would crop what training fed whole, so then this is not comparable).
    pipeline_diff = float("nan")
    if pipeline.face == "off" and package.smoke:
        runner = PackageRunner(package)
        rebuilt = np.stack([runner.prepare(s).tensor for s in package.smoke_samples()])
        pipeline_diff = float(np.abs(rebuilt - held.inputs[: len(rebuilt)]).max())
    return package, parity, pipeline_diff


def _register(network: str, run_id: str, model_uri: str, checkpoint: Path, data_ref: str, recipe: Recipe,
              metrics: Mapping[str, float], commit: str, atol: float, set_challenger: bool,
              workspace: Workspace | None, face: str | None = None) -> reg.ModelVersion:
    from mlflow.tracking import MlflowClient

    from fer_core.training.fingerprint import code_fingerprint
    from registry.pyfunc import log_package_model

    held = held_out(network, data_ref, recipe, workspace=workspace)
    setup_tracking(workspace)
    client = MlflowClient()
    code = code_fingerprint(network)
    info = {"network": network, "data_version": data_ref, "recipe_fingerprint": recipe.fingerprint(),
            "code_fingerprint": code, "git_commit": commit, "run_id": run_id,
            "primary_metric": held.primary_metric, "recipe": recipe.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        package, parity, pipeline_diff = _export_and_check(checkpoint, held, Path(tmp), atol, recipe=recipe,
                                                           face=face, info=info)
        # The package is an artefact of the run: a second, different one would overwrite the files an
        # earlier version's digest vouches for (and the digest param cannot change), so it is refused.
        logged = client.get_run(run_id).data.params.get(PACKAGE_DIGEST_PARAM)
        if logged and logged != package.digest:
            from fer_core.errors import UsageError

            raise UsageError(f"run {run_id} is registered already with another package (face handling or export "
                             f"differs; its package_sha256 is {logged[:12]}...): train again to register another choice")
        client.log_artifacts(run_id, str(package.root), PACKAGE_ARTIFACT)
        client.log_param(run_id, PACKAGE_DIGEST_PARAM, package.digest)
        model_info = log_package_model(package, run_id)
        digest, face_handling = package.digest, package.pipeline.face
    client.log_metric(run_id, "parity/max_abs_diff", parity.max_abs_diff)
    client.log_metric(run_id, "parity/label_agreement", parity.label_agreement)
    if math.isfinite(pipeline_diff):
        client.log_metric(run_id, "pipeline/max_abs_diff", pipeline_diff)
    client.set_tag(run_id, "parity_passed", "true" if parity.passed else "false")
    client.set_tag(run_id, "code_fingerprint", code)
    _link_dataset(client, run_id, model_info)
    tags = version_tags(data_ref=data_ref, data_gate=data_gate_status(data_ref, workspace), commit=commit,
                        recipe=recipe, parity=parity, primary_metric=held.primary_metric, metrics=metrics,
                        code_fingerprint=code, package_digest=digest, face_handling=face_handling)
    registered = reg.register(network, model_info.model_uri, run_id, tags, workspace)
    if set_challenger:
        reg.set_alias(network, "challenger", registered.version, workspace)
        registered = reg.get_version(network, registered.version, workspace)
    return registered


def _link_dataset(client, run_id: str, model_info) -> None:
    """Log the run's training dataset(s) again together with the logged model as an input, so
    MLflow links model, run and dataset (its model page then lists "Datasets used")."""
    from mlflow.entities import LoggedModelInput
    from mlflow.exceptions import MlflowException

    inputs = list(getattr(client.get_run(run_id).inputs, "dataset_inputs", None) or [])
    model_id = getattr(model_info, "model_id", None)
    if not inputs or not model_id:
        return
    try:
        client.log_inputs(run_id, datasets=inputs, models=[LoggedModelInput(model_id)])
    except MlflowException:
        pass  # a store without model inputs: the run keeps its dataset link


def export_and_register(outcome: TrainOutcome, *, atol: float = PARITY_ATOL, set_challenger: bool = True,
                        face_detection: str | None = None, workspace: Workspace) -> reg.ModelVersion:
    """Export, parity-check, package and register the model of a tracked training (see the module
    docstring). ``face_detection`` ("off" | "haar") is the version's face handling for full photos
    (default: "haar" when the recipe aligned its training faces, else "off")."""
    if not outcome.run_id or not outcome.model_uri:
        raise ValueError("export_and_register needs a tracked training (run_id and logged model); "
                         "train without --no-track")
    from mlflow.tracking import MlflowClient

    setup_tracking(workspace)
    commit = MlflowClient().get_run(outcome.run_id).data.tags.get("git_commit") or git_commit()
    return _register(outcome.network, outcome.run_id, outcome.model_uri, outcome.result.best_checkpoint,
                     outcome.data_ref, outcome.recipe, outcome.result.test_metrics, commit, atol,
                     set_challenger, workspace, face_detection)


def _logged_model_uri(run_id: str, experiment_id: str) -> str:
    """URI of the model a run logged (MLflow 3 logged model, else the run-relative ``model`` folder)."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient().search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    models = [m for m in found if m.name == "model"] or list(found)
    return f"models:/{models[0].model_id}" if models else f"runs:/{run_id}/model"


def register_run(network: str, run_id: str, *, atol: float = PARITY_ATOL, set_challenger: bool = True,
                 face_detection: str | None = None, workspace: Workspace) -> reg.ModelVersion:
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
                         set_challenger, workspace, face_detection)
