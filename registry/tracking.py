"""MLflow tracking for training runs: a trainer callback plus the embedded-default configuration.

Embedded default: a SQLite store and an artifact root inside the workspace. ``FER_TRACKING_URI``
(or ``tracking_uri`` in the ``$FER_CONFIG`` file, see ``fer_platform.settings``) points at any other
store, e.g. a remote ``mlflow server`` with PostgreSQL. Precedence: ``FER_TRACKING_URI`` > the
config file's ``tracking_uri`` > MLflow's own ``MLFLOW_TRACKING_URI`` (when the user set it: the value
``mlflow.set_tracking_uri`` writes is recorded in ``FER_MLFLOW_URI_SET_BY_PLATFORM`` and not taken
for the user's, so one workspace's store does not leak into the next) > the workspace's SQLite file.
Basic-auth credentials come from MLflow's own ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``. One
experiment per network (``fer-<network>``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec as MlflowTensorSpec

from fer_core.models import FERModel, ModelMetadata
from fer_platform.settings import MLFLOW_TRACKING_ENV, MLFLOW_URI_SET_ENV
from fer_core.training.callbacks import Callback
from fer_platform.workspace import Workspace

TRACKING_ENV = "FER_TRACKING_URI"
RUN_ID_FILE = "mlflow_run_id"
PIP_REQUIREMENTS = ["torch==2.13.0", "numpy<2"]  # explicit: inference of requirements costs 10+ s


def tracking_uri(workspace: Workspace) -> str:
    """The configured tracking URI, else the workspace's SQLite store (its folder created)."""
    settings = workspace.settings
    if settings.is_set("tracking_uri"):
        return settings.tracking_uri
    workspace.mlflow_db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workspace.mlflow_db}"


def setup_tracking(workspace: Workspace) -> str:
    """Point MLflow (this process) at the workspace's tracking store and registry; returns the URI."""
    settings = workspace.settings
    uri = tracking_uri(workspace)
    if os.environ.get(MLFLOW_TRACKING_ENV) != uri:  # not the user's own MLFLOW_TRACKING_URI: mark what MLflow writes
        os.environ[MLFLOW_URI_SET_ENV] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(settings.registry_uri if settings.is_set("registry_uri") else uri)
    if settings.s3_endpoint_url:
        # MLflow's S3 artifact repository reads the endpoint only from its own variable.
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", settings.s3_endpoint_url)
    # Artifact downloads (promotion, export) would draw tqdm bars into flow logs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


def experiment_name(network: str) -> str:
    return f"fer-{network}"


def get_or_create_experiment(network: str, workspace: Workspace) -> str:
    """Experiment id of ``fer-<network>``.

    With a database store (SQLite, PostgreSQL) its artifacts go to ``FER_ARTIFACT_ROOT`` (local
    folder or ``s3://``), by default the workspace; an MLflow server decides for itself (its
    ``--artifacts-destination``, proxied, so clients need no object-store credentials).
    """
    client = MlflowClient()
    existing = client.get_experiment_by_name(experiment_name(network))
    if existing is not None:
        return existing.experiment_id
    location = None
    if not tracking_uri(workspace).startswith(("http://", "https://", "databricks")):
        settings = workspace.settings
        if settings.is_set("artifact_root"):
            root = settings.artifact_root
            location = f"{root}/{network}" if "://" in root else (Path(root) / network).resolve().as_uri()
        else:
            location = (workspace.mlflow_artifacts / network).resolve().as_uri()
    return client.create_experiment(experiment_name(network), artifact_location=location)


def git_commit() -> str:
    """Commit of the platform's code (``+dirty`` if modified), or "unknown" outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def system_info(device: str) -> dict[str, str]:
    import torch

    return {
        "sys.python": platform.python_version(), "sys.torch": torch.__version__,
        "sys.platform": platform.platform(), "sys.cpu_count": str(os.cpu_count()),
        "sys.device": device,
        "sys.cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def model_signature(metadata: ModelMetadata) -> ModelSignature:
    """MLflow tensor signature from the model's metadata (batch axis -1).

    A single input or output is an *unnamed* spec: a named one makes MLflow's pyfunc hand the
    PyTorch flavour a dict, which it refuses ("does not support List or Dict input types",
    mlflow/mlflow#13931). Several outputs keep their names.
    """
    def schema(specs) -> Schema:
        named = len(specs) > 1
        return Schema([MlflowTensorSpec(np.dtype(s.dtype), (-1, *s.shape), s.name if named else None)
                       for s in specs])

    return ModelSignature(inputs=schema(metadata.inputs), outputs=schema(metadata.outputs))


def log_model(model: FERModel, name: str = "model") -> Any:
    """Log the trained PyTorch model in MLflow's safe ``pt2`` format (a ``torch.export`` graph, loaded
    without fer_core and without unpickling code) with its signature, an input example and the
    model's metadata (``fer_metadata`` in the MLflow model's metadata).

    The example has 2 samples: ``torch.export`` fixes an axis whose example size is 1, and the
    batch axis must stay dynamic. MLflow's PyTorch pyfunc returns a single tensor, so it can
    serve (and validate the example of) single-output networks only; a network with several
    outputs is served by its registered package model (:mod:`registry.pyfunc`), and MLflow is
    told not to try serving this example.
    """
    from fer_core.metadata import metadata_to_dict

    example = model.example_input(2).numpy()
    single_output = len(model.metadata.outputs) == 1
    return mlflow.pytorch.log_model(
        model.cpu().eval(), name=name, signature=model_signature(model.metadata), input_example=example,
        pip_requirements=PIP_REQUIREMENTS, serialization_format="pt2",
        metadata={"fer_metadata": metadata_to_dict(model.metadata)},
        **({} if single_output else {"validate_serving_input": False}),
    )


class MlflowCallback(Callback):
    """Logs a training run: params, tags, data version as an input dataset, per-epoch metrics,
    learning-curve and confusion-matrix PNGs, per-class report, checkpoint and the model.

    A resumed training (same ``run_dir``) continues the same MLflow run instead of starting a new one.
    """

    def __init__(
        self,
        network: str,
        run_dir: Path,
        data_ref: str = "",
        manifest: Any = None,  # pandas DataFrame of the training data's manifest, logged as the input
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        log_model: bool = True,
        *,
        workspace: Workspace,
    ) -> None:
        self.network, self.run_dir, self.data_ref, self.manifest = network, Path(run_dir), data_ref, manifest
        self.tags, self.parent_run_id, self.run_name = dict(tags or {}), parent_run_id, run_name
        self.log_model_enabled, self.workspace = log_model, workspace
        self.run_id: str | None = None
        self.model_info: Any = None

    # -- run lifecycle -----------------------------------------------------------------------
    def on_fit_start(self, trainer) -> None:
        setup_tracking(self.workspace)
        experiment_id = get_or_create_experiment(self.network, self.workspace)
        id_file = self.run_dir / RUN_ID_FILE
        resume_id = id_file.read_text().strip() if id_file.is_file() else None
        nested = self.parent_run_id is not None
        if resume_id:
            mlflow.start_run(run_id=resume_id, nested=nested)
            self._log_missing_epochs(resume_id)
        else:
            tags = {"mlflow.parentRunId": self.parent_run_id} if nested else None
            run = mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name, nested=nested, tags=tags)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run.info.run_id)
            recipe = trainer.recipe
            mlflow.log_params(recipe.to_params())
            mlflow.set_tags({
                "network": self.network, "profile": recipe.profile, "data_version": self.data_ref,
                "recipe_fingerprint": recipe.fingerprint(), "git_commit": git_commit(),
                "world_size": str(trainer.world_size), **system_info(str(trainer.device)),
                **_code_fingerprint_tag(self.network), **self.tags,
            })
            if self.manifest is not None:
                name, _, digest = self.data_ref.partition("@")
                with warnings.catch_warnings():  # schema-inference hints about the manifest's int columns
                    warnings.simplefilter("ignore", UserWarning)
                    dataset = mlflow.data.from_pandas(self.manifest, source=self.data_ref or "unversioned",
                                                      name=name or "dataset", digest=(digest or None) and digest[:36])
                    mlflow.log_input(dataset, context="training")
        self.run_id = mlflow.active_run().info.run_id

    def _log_missing_epochs(self, run_id: str) -> None:
        """Log the checkpointed epochs the run lacks: a kill between the trainer's checkpoint write
        and this callback's ``on_epoch_end`` leaves that epoch in ``last.pt`` but not in MLflow."""
        from fer_core.training.checkpoint import CheckpointError, load_checkpoint

        try:
            history = load_checkpoint(self.run_dir / "last.pt").get("history", [])
        except CheckpointError:
            return  # the trainer reports a bad checkpoint itself
        logged = {m.step for m in MlflowClient().get_metric_history(run_id, "train/loss")}
        for epoch, metrics in enumerate(history):
            if epoch + 1 not in logged:
                self.on_epoch_end(None, epoch, metrics)

    def on_epoch_end(self, trainer, epoch: int, metrics: Mapping[str, float]) -> None:
        finite = {_key(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        mlflow.log_metrics(finite, step=epoch + 1)

    def on_fit_end(self, trainer, result) -> None:
        from fer_core.metrics.plots import plot_confusion_matrix, plot_learning_curves

        mlflow.log_metrics({_key(k): v for k, v in result.test_metrics.items() if math.isfinite(v)})
        mlflow.log_metrics({"best_epoch": result.best_epoch + 1, "epochs_run": result.epochs_run})
        mlflow.set_tag("stopped_early", str(result.stopped_early))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if result.history:
                plot_learning_curves(result.history).savefig(tmp / "learning_curves.png", dpi=110)
                mlflow.log_artifact(str(tmp / "learning_curves.png"), "plots")
            report = result.extra.get("report")
            if report:
                (tmp / "report.json").write_text(json.dumps(report, indent=2))
                mlflow.log_artifact(str(tmp / "report.json"), "evaluation")
                if "confusion_matrix" in report:
                    fig = plot_confusion_matrix(np.array(report["confusion_matrix"]), report["labels"],
                                                f"{self.network} — {report['split']} split")
                    fig.savefig(tmp / "confusion_matrix.png", dpi=110)
                    mlflow.log_artifact(str(tmp / "confusion_matrix.png"), "plots")
        for path in (result.best_checkpoint, result.best_checkpoint.with_name(result.best_checkpoint.name + ".sha256")):
            if path.is_file():
                mlflow.log_artifact(str(path), "checkpoint")
        if self.log_model_enabled:
            self.model_info = log_model(trainer.model)
            trainer.model.to(trainer.device)
        mlflow.end_run()


def _code_fingerprint_tag(network: str) -> dict[str, str]:
    """``code_fingerprint`` of a trainable network (part of the retrain cache key), else nothing."""
    from fer_core.training.fingerprint import code_fingerprint

    try:
        return {"code_fingerprint": code_fingerprint(network)}
    except ValueError:  # a model without a training task (e.g. a bare backbone)
        return {}


def _key(name: str) -> str:
    # MLflow accepts letters, digits, _ - . space / ; anything else (e.g. '+') becomes '_'
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def end_active_run(status: str) -> None:
    """Close a run left open by a crash or interrupt ("FAILED" or "KILLED"); resume reopens it."""
    if mlflow.active_run() is not None:
        mlflow.end_run(status=status)
