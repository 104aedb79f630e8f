"""``fer evaluate``: run a registered model version on a dataset version and record the result.

One wiring for the CLI and the Prefect task (:func:`flows.steps.evaluate_version_task`):

1. resolve the version (``--version N``, ``--alias champion``; default the champion, else the newest);
2. restore the dataset version from DVC and take its ``test`` split (an evaluation-only set is all
   test); the encoded bytes of every sample are built once (image files as they are on disk, packed
   FER2013 rows as PNG) and sent unchanged to the backend;
3. predict in-process (the version's registered ONNX artifact through :class:`serving.local.LocalPredictor`)
   or through a served Triton ensemble (``url``) -- the same bytes and the same pre/post-processing,
   so both answer the same;
4. score over the network's classes (:func:`fer_core.metrics.evaluation.score_labels`: rows of classes
   the network lacks are reported, not scored) and log an MLflow *evaluation run* in the network's
   experiment, tagged with the model version, its training run and the dataset version: metrics
   ``eval/*``, the confusion-matrix PNG, the per-sample predictions table and ``evaluation.json``.

What is scored follows the network's outputs and what the test set labels:

* expression networks (ca_resnet, c3d_ecstfl, micro_lsh, multitask_fer's expression head): accuracy
  (WAR), UAR, UF1, per-class recall/F1, confusion matrix;
* multitask_fer, where the set annotates them (AffectNet's layout): CCC and RMSE of valence and
  arousal (``ccc/valence`` ...), and the inter-ocular NME of the 68 landmarks (``nme``);
* AU networks (au_cotrain) on a set with AU labels (an AU table, ``-o role=test`` for an
  evaluation-only one): F1 per AU and their mean over the AUs both share (unknown cells skipped;
  only ``clean`` rows of a co-training set are scored: noisy labels are not a truth), with a per-AU
  F1 bar chart instead of the confusion matrix.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from fer_core.data.manifest import read_card, read_manifest
from fer_core.errors import DataError, ServiceError, StateError, UsageError
from fer_core.metrics.evaluation import AUScore, LabelScore, score_affect, score_aus, score_labels, score_landmarks
from fer_platform.workspace import Workspace
from registry import models as reg
from registry.datasets import DatasetStore, parse_ref
from registry.tracking import get_or_create_experiment, setup_tracking

EVALUATION_TAG = "fer.evaluation"


@dataclass(frozen=True)
class EvaluationOutcome:
    """What one evaluation measured and where it is recorded."""

    network: str
    version: int
    data_ref: str
    split: str
    backend: str  # "onnxruntime" or the Triton URL
    score: LabelScore | None  # expression networks
    predictions: pd.DataFrame  # one row per sample: file, true, predicted, confidence, scored
    seconds: float
    run_id: str | None = None
    extra: Mapping[str, float] = field(default_factory=dict)  # valence/arousal CCC, landmark NME
    au: AUScore | None = None  # AU networks

    @property
    def metrics(self) -> dict[str, float]:
        """Every metric of this evaluation (what is logged as ``eval/*``)."""
        return {**(self.score.metrics if self.score else {}), **(self.au.metrics if self.au else {}), **self.extra}

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network, "version": self.version, "data": self.data_ref, "split": self.split,
                "backend": self.backend, "num_samples": len(self.predictions), "seconds": round(self.seconds, 3),
                "mlflow_run": self.run_id, **(self.score.to_dict() if self.score else {}),
                **(self.au.to_dict() if self.au else {}), "metrics": self.metrics}


def resolve_version(network: str, version: int | None = None, alias: str | None = None, *,
                    workspace: Workspace) -> reg.ModelVersion:
    """The model version to evaluate: explicit, by alias, else the champion, else the newest."""
    if version is not None and alias is not None:
        raise UsageError("give --version or --alias, not both")
    if version is not None:
        return reg.get_version(network, version, workspace)
    found = reg.get_alias(network, alias or "champion", workspace)
    if found is not None:
        return found
    if alias is not None:
        raise StateError(f"{reg.registered_name(network)} has no version with alias {alias!r}")
    versions = reg.list_versions(network, workspace)
    if not versions:
        raise StateError(f"{reg.registered_name(network)} has no registered version (fer train --register)")
    return versions[-1]


def dataset_samples(root: Path, split: str | None = None) -> tuple[str, pd.DataFrame, list[list[bytes]]]:
    """(split, its manifest rows, each sample's encoded bytes) of a prepared dataset.

    ``split`` None: ``test`` when the dataset has one, refused otherwise (val picked the checkpoint).
    """
    from serving.client import encode_image, read_clip_frames
    from fer_core.data.samples import read_image
    from fer_core.data.manifest import resolve_reference

    card = read_card(root)
    manifest = read_manifest(root)
    splits = set(manifest["split"])
    if split is None:
        if "test" not in splits:
            raise DataError(f"{card.name} has no test split (splits: {', '.join(sorted(splits))}); "
                             "pass --split val to measure on val, knowing it may have chosen the checkpoint")
        split = "test"
    if split not in splits:
        raise DataError(f"{card.name} has no {split!r} split (splits: {', '.join(sorted(splits))})")
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    names = list(card.classes)
    rows["true_label"] = [names[i] if 0 <= i < len(names) else "" for i in rows["label"]]
    samples: list[list[bytes]] = []
    for ref, frames in zip(rows["path"], rows["num_frames"]):
        path, row = resolve_reference(root, ref)
        if card.task in ("micro", "dynamic"):
            samples.append(read_clip_frames(path, max(int(frames), 1)))
        elif row is None:
            samples.append([path.read_bytes()])  # the file as on disk, as `fer infer` would send it
        else:
            samples.append([encode_image(read_image(root, ref))])
    return split, rows, samples


def _download_onnx(version: reg.ModelVersion, into: Path) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from registry.export import ONNX_ARTIFACT

    try:
        return Path(MlflowClient().download_artifacts(version.run_id, ONNX_ARTIFACT, str(into)))
    except (MlflowException, OSError) as exc:
        raise StateError(f"{reg.registered_name(version.network)} v{version.version}: its run "
                         f"{version.run_id} has no {ONNX_ARTIFACT} ({str(exc).splitlines()[0]})") from None


def evaluate(network: str, data_ref: str, *, version: int | None = None, alias: str | None = None,
             url: str | None = None, split: str | None = None, batch_size: int = 32, track: bool = True,
             face_detection: str | None = None, workspace: Workspace) -> EvaluationOutcome:
    """Evaluate a registered version of ``network`` on ``data_ref`` (see the module docstring)."""
    setup_tracking(workspace)
    mv = resolve_version(network, version, alias, workspace=workspace)
    name, data_version = parse_ref(data_ref)
    store = DatasetStore(workspace)
    dv = store.get(name, data_version)
    root = store.pull(name, dv.version)
    split_name, rows, samples = dataset_samples(root, split)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if url:
            from serving.client import FERClient, ServingError

            protocol = "http" if url.startswith("http://") else "grpc"
            try:
                with FERClient(url, protocol=protocol, batch_size=batch_size) as client:
                    served = client.endpoint.served_versions(network)
                    if served and mv.version not in served:
                        raise StateError(f"Triton at {url} serves {network} v{served}, not v{mv.version}; "
                                         "evaluate the served version (--version) or promote this one")
                    metadata = client._network(network)[0]
                    inputs = samples if metadata.input.shape and len(metadata.input.shape) == 4 else \
                        [s[0] for s in samples]
                    predictions = client.predict(inputs, network=network)
            except ServingError as exc:
                raise ServiceError(str(exc)) from None
            backend = client.url
        else:
            from serving.local import LocalPredictor

            mode = face_detection or workspace.settings.face_detection
            predictor = LocalPredictor(_download_onnx(mv, Path(tmp)), face_detection=mode, batch_size=batch_size)
            metadata = predictor.metadata
            predictions = predictor.predict(samples, network=network)
            backend = "onnxruntime"
    seconds = time.perf_counter() - start
    base = pd.DataFrame({"file": rows["source"].astype(str), "id": rows["id"].astype(str),
                         "subject": rows["subject"].astype(str)})
    if metadata.extra.get("multi_label"):
        outcome = _au_outcome(network, mv.version, dv, split_name, backend, rows, base, predictions, seconds,
                              read_card(root).au_names)
        return _log_run(outcome, mv, dv, workspace) if track else outcome
    classes = tuple(predictions[0].probabilities) if predictions else ()
    table = base.assign(true=rows["true_label"], predicted=[p.label for p in predictions],
                        confidence=[round(p.confidence, 6) for p in predictions],
                        face_found=[p.face_found for p in predictions])
    table["scored"] = table["true"].isin(classes)
    table["correct"] = table["scored"] & (table["true"] == table["predicted"])
    score = score_labels(list(table["true"]), list(table["predicted"]), classes)
    extra: dict[str, float] = {}
    if "valence" in rows and any(p.valence is not None for p in predictions):
        true_va = rows[["valence", "arousal"]].to_numpy(dtype=float)
        predicted_va = np.array([[p.valence, p.arousal] for p in predictions], dtype=float)
        extra.update(score_affect(true_va, predicted_va))
        table["valence"], table["arousal"] = predicted_va[:, 0].round(6), predicted_va[:, 1].round(6)
    if "landmarks" in rows and any(p.landmarks is not None for p in predictions):
        extra.update(score_landmarks([None if t is None else np.asarray(t) for t in rows["landmarks"]],
                                     [None if p.landmarks is None else np.asarray(p.landmarks) for p in predictions]))
    outcome = EvaluationOutcome(network, mv.version, dv.ref, split_name, backend, score, table, seconds, extra=extra)
    if track:
        outcome = _log_run(outcome, mv, dv, workspace)
    return outcome


def _au_outcome(network: str, version: int, dv, split: str, backend: str, rows: pd.DataFrame, base: pd.DataFrame,
                predictions: Sequence, seconds: float, data_au_names: Sequence[str]) -> EvaluationOutcome:
    """The evaluation of an AU network: per-AU F1 over the clean rows with AU labels."""
    if "aus" not in rows or not data_au_names:
        raise DataError(f"{dv.name} has no AU labels; an AU network is evaluated on an AU table (--format au_table)")
    true = np.array([list(a) for a in rows["aus"]], dtype=np.int64)
    clean = (rows["label_set"] == "clean").to_numpy() if "label_set" in rows else np.ones(len(rows), bool)
    scored = clean & (true >= 0).any(axis=1)
    if not scored.any():
        raise DataError(f"no {split} row of {dv.name} has a known AU label")
    active = [tuple(p.active or ()) for p in predictions]
    au = score_aus(true[scored], data_au_names, [a for a, s in zip(active, scored) if s], tuple(predictions[0].probabilities))
    table = base.assign(true=["+".join(n for n, v in zip(data_au_names, t) if v == 1) for t in true],
                        predicted=["+".join(a) for a in active], scored=scored,
                        face_found=[p.face_found for p in predictions])
    return EvaluationOutcome(network, version, dv.ref, split, backend, None, table, seconds, au=au)


def _log_run(outcome: EvaluationOutcome, mv: reg.ModelVersion, dv, workspace: Workspace) -> EvaluationOutcome:
    import dataclasses

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from fer_core.metrics.plots import plot_confusion_matrix, plot_per_label_f1

    experiment = get_or_create_experiment(outcome.network, workspace)
    tags = {
        EVALUATION_TAG: "true", "network": outcome.network, "model_name": reg.registered_name(outcome.network),
        "model_version": str(mv.version), "model_run_id": mv.run_id, "data_version": dv.ref,
        "data_name": dv.name, "data_split": outcome.split, "backend": outcome.backend,
        "data_role": str(dv.extra.get("options", {}).get("role", "train")) if isinstance(dv.extra, Mapping) else "",
    }
    run_name = f"evaluate v{mv.version} on {dv.name}@{dv.short}"
    with mlflow.start_run(experiment_id=experiment, run_name=run_name, tags=tags) as run:
        scored = outcome.score.num_scored if outcome.score else int(outcome.predictions["scored"].sum())
        mlflow.log_params({"model_version": mv.version, "data_version": dv.ref, "split": outcome.split,
                           "backend": outcome.backend, "num_samples": len(outcome.predictions),
                           "num_scored": scored})
        mlflow.log_metrics({f"eval/{k}": float(v) for k, v in outcome.metrics.items()})
        title = f"{outcome.network} v{mv.version} on {dv.name} ({outcome.split})"
        if outcome.score:
            fig = plot_confusion_matrix(outcome.score.confusion, outcome.score.classes, title=title)
            mlflow.log_figure(fig, "evaluation/confusion_matrix.png")
            plt.close(fig)
        if outcome.au:
            fig = plot_per_label_f1({a: outcome.au.metrics[f"f1/{a}"] for a in outcome.au.au_names}, title=title)
            mlflow.log_figure(fig, "evaluation/au_f1.png")
            plt.close(fig)
        mlflow.log_table(outcome.predictions, "evaluation/predictions.json")
        mlflow.log_text(json.dumps(outcome.to_dict(), indent=2), "evaluation/evaluation.json")
        run_id = run.info.run_id
    return dataclasses.replace(outcome, run_id=run_id)


def format_table(outcome: EvaluationOutcome) -> str:
    """The human summary ``fer evaluate`` prints."""
    lines = [f"{outcome.network} v{outcome.version} on {outcome.data_ref} ({outcome.split}, "
             f"{len(outcome.predictions)} samples) via {outcome.backend} in {outcome.seconds:.1f}s", ""]
    if outcome.au:
        return "\n".join(lines + _au_lines(outcome))
    s = outcome.score
    m = s.metrics
    lines += [f"  accuracy (WAR)  {m['accuracy']:.4f}", f"  UAR             {m['uar']:.4f}",
              f"  UF1             {m['uf1']:.4f}", f"  scored          {s.num_scored}"]
    if s.num_unscored:
        lines.append(f"  not scored      {s.num_unscored} (true class unknown to the network; predicted: "
                     + ", ".join(f"{k} {v}" for k, v in s.unscored_predictions.items()) + ")")
    absent = [c for c in s.classes if c not in s.classes_present]
    if absent:
        lines.append(f"  absent classes  {', '.join(absent)} (no recall; left out of UAR/UF1)")
    lines += ["", "  class         recall      f1  support"]
    support = s.confusion.sum(axis=1)
    for i, c in enumerate(s.classes):
        if c in s.classes_present:
            lines.append(f"  {c:12s} {m[f'recall/{c}']:7.4f} {m[f'f1/{c}']:7.4f} {int(support[i]):8d}")
    width = max(len(c) for c in s.classes)
    lines += ["", "  confusion (rows true, columns predicted)",
              "  " + " " * width + " " + " ".join(f"{c[:5]:>5s}" for c in s.classes)]
    for i, c in enumerate(s.classes):
        lines.append(f"  {c:>{width}s} " + " ".join(f"{int(v):5d}" for v in s.confusion[i]))
    if outcome.extra:
        lines += [""] + _extra_lines(outcome.extra)
    if outcome.run_id:
        lines += ["", f"  mlflow run {outcome.run_id} (experiment fer-{outcome.network})"]
    return "\n".join(lines)


def _extra_lines(extra: Mapping[str, float]) -> list[str]:
    lines = []
    for dim in ("valence", "arousal"):
        if f"ccc/{dim}" in extra:
            lines.append(f"  {dim:9s} CCC {extra[f'ccc/{dim}']:+.4f}  RMSE {extra[f'rmse/{dim}']:.4f}  "
                         f"({int(extra[f'annotated/{dim}'])} annotated)")
    if "nme" in extra:
        lines.append(f"  landmarks NME {extra['nme']:.4f} (inter-ocular; {int(extra['annotated/landmarks'])} annotated)")
    return lines


def _au_lines(outcome: EvaluationOutcome) -> list[str]:
    au, m = outcome.au, outcome.au.metrics
    lines = [f"  mean F1   {m['mean_f1']:.4f} over {len(au.au_names)} AUs", f"  scored    {au.num_samples} rows", "",
             "  AU       F1  positives"]
    lines += [f"  {a:5s} {m[f'f1/{a}']:6.4f} {int(m[f'support/{a}']):10d}" for a in au.au_names]
    if au.network_only:
        lines.append(f"  not labelled by the set: {', '.join(au.network_only)}")
    if au.data_only:
        lines.append(f"  not predicted by the network: {', '.join(au.data_only)}")
    if outcome.run_id:
        lines += ["", f"  mlflow run {outcome.run_id} (experiment fer-{outcome.network})"]
    return lines


def evaluate_many(network: str, data_refs: Sequence[str], **kwargs: Any) -> list[EvaluationOutcome]:
    """:func:`evaluate` on several dataset versions (e.g. every registered test set)."""
    return [evaluate(network, ref, **kwargs) for ref in data_refs]


def registered_test_sets(task: str | None = None, *, workspace: Workspace) -> list[str]:
    """Refs of the newest version of every dataset added as an evaluation-only test set (``-o role=test``,
    recorded in the version's options), of ``task`` when given."""
    store = DatasetStore(workspace)
    newest: dict[str, Any] = {}
    for v in store.list():
        newest[v.name] = v
    return [v.ref for v in newest.values()
            if isinstance(v.extra, Mapping) and (v.extra.get("options") or {}).get("role") == "test"
            and (task is None or v.task == task)]
