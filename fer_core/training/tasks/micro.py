"""Micro-expression recognition from onset/apex pairs: the ``micro_lsh`` network, single runs and LOSO.

Data: a ``micro`` prepared dataset (CASME II, SAMM, SMIC; :mod:`fer_core.data.formats.micro`), one
row per clip. Input: the onset and apex frames of each clip stacked as ``(2, C, H, W)``
(:func:`~fer_core.data.preprocess.onset_apex_pair`, then :func:`~fer_core.data.preprocess.to_model_input`
at the model's input spec). The apex comes from the manifest; a clip whose apex is unknown (-1) gets
:func:`~fer_core.data.preprocess.estimate_apex` between its onset and offset (unknown onset = first
frame, unknown offset = last frame). Augmentation is drawn once per pair, so onset and apex get the
same flip/rotation and the motion between them is untouched. Loss: cross-entropy. Metrics: accuracy
(= WAR), UAR, UF1 and per-class recall/F1; report: confusion matrix and per-class table.

Method preprocessing (``recipe.data``):

* ``face_crop`` (default true): face registration and face-region crop of each clip before
  magnification (the input pipeline's face handling, served alike): the face is detected on the
  onset frame (the apex if none) and *one* eye-alignment transform crops both frames, so the motion
  between them is untouched; a clip without a detected face keeps its whole frames (counted in
  ``faces_missed``). The method does not name its registration; one shared transform rather than a
  per-frame one is our choice, since per-frame detection jitter would be magnified with the motion.
* ``min_class_clips``: classes with fewer clips than this (all splits together) are dropped and the
  labels re-indexed (:func:`drop_rare_classes`); the method says 10. On CASME II (255 clips:
  others 99, disgust 63, happiness 32, repression 27, surprise 25, sadness 7, fear 2) the rule drops
  exactly fear and sadness, i.e. it yields CASME II's 5 listed classes, which the adapter's
  ``other_emotions="drop"`` already produces; on SAMM it gives the 5-class set
  (``classes="samm5"`` in the adapter: anger, contempt, happiness, other, surprise).
* ``magnifier_weights``: a ``magnifier`` checkpoint (or, through ``fer train``, a registry URI such as
  ``models:/fer-magnifier@champion`` / ``models:/fer-magnifier/3``) whose weights initialise the
  learned magnifier; ``model_kwargs.freeze_magnifier`` then freezes or fine-tunes it.

Splits of a single run (``fer train micro_lsh``). Micro-expression data is evaluated subject
independently, so every hold-out is by whole subjects:

* test: the manifest's ``test`` rows when it has any (an adapter's ``test_subjects``); otherwise
  ``data.test_fraction`` of the subjects (at least one);
* val: ``data.val_fraction`` of the remaining subjects (at least one; 0 turns it off, and the
  recipe must then monitor a ``train/`` metric);
* train: the other subjects. Subjects are drawn with ``numpy.random.default_rng(recipe.seed)``.

With ``data.fold = <subject>`` (what :func:`run_loso` sets) that subject's rows are the test set,
whatever their manifest split, and val is drawn from the other subjects as above.

Leave-one-subject-out (:func:`run_loso`): one Trainer per subject of the labelled rows (all splits
pooled), the predictions of every fold's test subject are concatenated and accuracy/UAR/UF1 are
computed once over the concatenation (the composite protocol, see
:mod:`fer_core.metrics.classification`); per-fold metrics are returned too.

Profiles. ``paper`` is the method: separate W_Q/W_K (no ``shared_qk``; empty buckets are solved
inside the method by hashing standardised over the frames plus 4 independent hashings,
:mod:`fer_core.models.micro_lsh`, measured in ``bench/fidelity.py``), the pre-trained magnifier loaded
by model version (``data.magnifier_weights: models:/fer-magnifier@champion``, frozen:
``model_kwargs.freeze_magnifier``), face registration + crop and the 10-clip class rule. The model
defaults (112 px, ResNet-18 at width 64, 32 magnified frames) with Adam; the description gives no
optimiser settings, so lr 1e-4, batch 32 and 60 epochs with early stopping are our choices.
``quick`` is a CPU-sized version (32 px, width 8, 4 magnified frames, linear magnifier, whole frames).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from fer_core.data.manifest import read_card, read_manifest
from fer_core.data.pipeline import InputPipeline, make_detector, prepare_pixels
from fer_core.data.preprocess import estimate_apex, onset_apex_pair
from fer_core.data.samples import read_clip
from fer_core.losses.micro import micro_classification_loss
from fer_core.metrics.classification import classification_metrics
from fer_core.errors import UsageError
from fer_core.models import create_model
from fer_core.training.callbacks import Callback
from fer_core.training.recipe import Recipe
from fer_core.training.tasks import TaskKind, register_task_kind
from fer_core.data.transforms import AugmentConfig
from fer_core.training.tasks.static import SingleLabelClassificationTask
from fer_core.training.trainer import Trainer


def clip_key_frames(frames: np.ndarray, onset: int, apex: int, offset: int) -> tuple[int, int]:
    """(onset, apex) indices of a clip, filling unknown (-1) values.

    Unknown onset = 0, unknown offset = the last frame, unknown apex = :func:`estimate_apex` between them.
    """
    last = len(frames) - 1
    onset = 0 if onset < 0 else int(onset)
    offset = last if offset < 0 else int(offset)
    if not 0 <= onset <= offset <= last:
        raise ValueError(f"onset {onset} / offset {offset} do not fit a clip of {len(frames)} frames")
    if apex < 0:
        apex = estimate_apex(frames, onset, offset)
    return onset, int(apex)


def drop_rare_classes(
    manifest: pd.DataFrame, label_names: Sequence[str], min_clips: int
) -> tuple[pd.DataFrame, tuple[str, ...], dict[str, int]]:
    """Drop the classes with fewer than ``min_clips`` labelled clips (all splits counted together).

    Returns the remaining rows with labels re-indexed into the kept classes (in their card order),
    the kept class names and ``{dropped class: clip count}``. ``min_clips`` 0 keeps everything."""
    counts = manifest["label"].value_counts().to_dict()
    kept = [i for i in range(len(label_names)) if counts.get(i, 0) >= min_clips]
    dropped = {label_names[i]: int(counts.get(i, 0)) for i in range(len(label_names)) if i not in kept}
    if not dropped:
        return manifest, tuple(label_names), {}
    if len(kept) < 2:
        raise ValueError(f"data.min_class_clips={min_clips} leaves {len(kept)} class(es); counts: "
                         f"{ {label_names[i]: int(counts.get(i, 0)) for i in range(len(label_names))} }")
    remap = {old: new for new, old in enumerate(kept)}
    rows = manifest[manifest["label"].isin(kept)].copy()
    rows["label"] = rows["label"].map(remap).astype("int64")
    return rows.reset_index(drop=True), tuple(label_names[i] for i in kept), dropped


def load_pretrained_magnifier(model, weights: str) -> None:
    """Copy a trained ``magnifier`` network's weights (a checkpoint file) into ``model.magnifier``.

    ``weights`` must be a local checkpoint path; a ``models:/fer-magnifier/<version>`` (or ``@alias``)
    URI is resolved to one by the registry layer before training (fer_core has no MLflow)."""
    from fer_core.models.micro_lsh import load_magnifier_weights
    from fer_core.training.checkpoint import load_checkpoint

    if weights.startswith("models:/"):
        raise ValueError(f"data.magnifier_weights {weights!r} is a registry URI: train through `fer train` "
                         "(which resolves it) or give a checkpoint path")
    state = load_checkpoint(Path(weights))
    if state.get("network") != "magnifier":
        raise ValueError(f"{weights} is a {state.get('network')!r} checkpoint, not a 'magnifier' one")
    load_magnifier_weights(model, state["model_state"])


def subject_splits(
    manifest: pd.DataFrame,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    fold: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Subject-independent train/val/test rows (see the module docstring for the rules)."""
    if not 0.0 <= val_fraction < 1.0 or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"need 0 <= val_fraction < 1 and 0 < test_fraction < 1, got {val_fraction}, {test_fraction}")
    subjects = manifest["subject"].astype(str)
    if fold is not None:
        if fold not in set(subjects):
            raise ValueError(f"fold subject {fold!r} is not in the dataset; subjects: {sorted(set(subjects))}")
        test_mask = subjects == fold
    elif (manifest["split"] == "test").any():
        test_mask = manifest["split"] == "test"
    else:
        pool = sorted(set(subjects))
        if len(pool) < 2:
            raise ValueError("a subject hold-out needs at least two subjects")
        order = np.random.default_rng(seed).permutation(pool)
        n_test = min(max(1, int(round(test_fraction * len(pool)))), len(pool) - 1)
        test_mask = subjects.isin(order[:n_test].tolist())
    rest = sorted(set(subjects[~test_mask]))
    if not rest:
        raise ValueError("no training subjects remain after the test hold-out")
    val_subjects: list[str] = []
    if val_fraction > 0:
        if len(rest) < 2:
            raise ValueError(f"a validation hold-out needs two subjects outside the test set, have {rest}; "
                             "set data.val_fraction=0 and monitor a train/ metric")
        # A seed different from the test draw's, so folds do not all pick the same val subject.
        order = np.random.default_rng(seed + 1).permutation(rest)
        n_val = min(max(1, int(round(val_fraction * len(rest)))), len(rest) - 1)
        val_subjects = order[:n_val].tolist()
    val_mask = ~test_mask & subjects.isin(val_subjects)
    return {"train": manifest[~test_mask & ~val_mask], "val": manifest[val_mask], "test": manifest[test_mask]}


@dataclass(frozen=True)
class MicroData:
    """``data.*`` of the micro kind (subject-independent splits)."""

    val_fraction: float = 0.2
    test_fraction: float = 0.2
    fold: str | None = None  # a subject id: leave that subject out as the test split
    min_class_clips: int = 0  # classes with fewer clips are dropped (0 = keep all)
    face_crop: bool = True  # register both frames on the onset's detected face
    magnifier_weights: str | None = None  # a magnifier checkpoint (or registry URI via `fer train`)


@dataclass(frozen=True)
class NoLossOptions:
    """The micro kind's cross-entropy takes no ``loss_kwargs``."""


class MicroExpressionTask(SingleLabelClassificationTask):
    """Onset/apex pairs of micro-expression clips with one class each."""

    primary_metric = "uf1"

    def __init__(self, root: Path, recipe: Recipe, name: str = "micro_lsh") -> None:
        self.name, self.root, self.recipe = name, Path(root), recipe
        card = read_card(root)
        self.label_names = tuple(card.classes)
        manifest = read_manifest(root)
        # Rows a data gate would reject (no label, no frames) cannot be trained on.
        manifest = manifest[(manifest["label"] >= 0) & (manifest["num_frames"] > 0)].reset_index(drop=True)
        self.manifest, self.label_names, self.dropped_classes = drop_rare_classes(
            manifest, self.label_names, MicroData(**recipe.data).min_class_clips)
        if self.manifest.empty:
            raise ValueError(f"{root} holds no labelled clips with frames")
        self.face_crop = MicroData(**recipe.data).face_crop
        self._detector = None  # built on first use (Haar cascades load slowly)
        self.faces_found = self.faces_missed = 0
        probe = create_model(recipe.network, **{**recipe.model_kwargs, **self.model_overrides()})
        self.meta = probe.metadata

    def model_overrides(self) -> dict[str, Any]:
        return {"num_classes": len(self.label_names), "label_names": list(self.label_names)}

    def _decode(self, root: Path, row: pd.Series) -> np.ndarray:
        frames = read_clip(root, row["path"])
        onset, apex = clip_key_frames(frames, int(row["onset"]), int(row["apex"]), int(row["offset"]))
        pair = onset_apex_pair(frames, onset, apex)
        # (2, C, H, W) through the package's input-pipeline spec, the one source of this decode:
        # with face_crop its face handling is on, and the pipeline detects the face on the first
        # frame that has one (the onset, else the apex) and crops both with that one transform.
        pipeline = self.input_pipeline()
        if pipeline.face == "haar" and self._detector is None:
            self._detector = make_detector(pipeline)
        prepared = prepare_pixels(list(pair), pipeline, self._detector)
        if pipeline.face == "haar":
            if prepared.face_found:
                self.faces_found += 1
            else:
                self.faces_missed += 1  # no face found: the whole frames are resized
        return prepared.pixels

    def input_pipeline(self) -> InputPipeline:
        """The input-pipeline spec this task decodes with (the model package records it)."""
        return InputPipeline.for_model(self.meta, {**self.recipe.data, "align_faces": self.face_crop})

    def splits(self, recipe: Recipe) -> dict[str, pd.DataFrame]:
        """The rows of each split for ``recipe`` (``data.val_fraction``, ``data.test_fraction``, ``data.fold``)."""
        data = MicroData(**recipe.data)
        return subject_splits(self.manifest, data.val_fraction, data.test_fraction, recipe.seed, data.fold)

    def build_loss(self, recipe: Recipe, model):
        if recipe.loss_kwargs:
            raise ValueError(f"micro_lsh's cross-entropy takes no loss_kwargs, got {dict(recipe.loss_kwargs)}")
        weights = MicroData(**recipe.data).magnifier_weights
        if weights:
            load_pretrained_magnifier(model, str(weights))
        elif recipe.model_kwargs.get("freeze_magnifier") and recipe.model_kwargs.get("magnifier", "learned") == "learned":
            # A frozen magnifier that was never trained would magnify with random weights for good.
            raise UsageError("model_kwargs.freeze_magnifier freezes the learned magnifier, but no "
                             "data.magnifier_weights names a trained one (a checkpoint or models:/fer-magnifier@...)")

        def loss(outputs, targets):
            value = micro_classification_loss(outputs, targets)
            return value, {"ce": value.detach()}

        return loss


# ---------------------------------------------------------------------------------------------
# Leave-one-subject-out
# ---------------------------------------------------------------------------------------------


@dataclass
class LosoFold:
    """One held-out subject: its test labels, predictions and metrics."""

    subject: str
    y_true: np.ndarray
    y_pred: np.ndarray
    metrics: dict[str, float]
    run_dir: Path
    best_epoch: int


@dataclass
class LosoResult:
    """Per-fold results and the metrics of all folds' predictions pooled."""

    folds: list[LosoFold]
    pooled: dict[str, float]
    label_names: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_fold(self) -> dict[str, dict[str, float]]:
        return {f.subject: f.metrics for f in self.folds}


CallbacksFactory = Callable[[str, Path], Iterable[Callback]]


def _folder_name(subject: str) -> str:
    return "fold-" + re.sub(r"[^A-Za-z0-9_.-]", "_", subject)


def run_loso(
    recipe: Recipe,
    root: Path,
    run_dir: Path,
    callbacks_factory: CallbacksFactory | None = None,
    subjects: Sequence[str] | None = None,
) -> LosoResult:
    """Leave-one-subject-out training of ``recipe.network`` on the micro dataset at ``root``.

    One :class:`~fer_core.training.trainer.Trainer` per held-out subject (``recipe.data.fold``), in
    ``run_dir/fold-<subject>``; ``callbacks_factory(subject, fold_dir)`` gives each fold's callbacks
    (e.g. an MLflow child run). ``subjects`` restricts the folds run (default: every subject).
    Returns each fold's test predictions/metrics and accuracy/UAR/UF1 over all folds pooled.
    """
    root, run_dir = Path(root), Path(run_dir)
    base = MicroExpressionTask(root, recipe, recipe.network)
    all_subjects = sorted(set(base.manifest["subject"].astype(str)))
    if len(all_subjects) < 2:
        raise ValueError("leave-one-subject-out needs at least two subjects")
    chosen = all_subjects if subjects is None else [str(s) for s in subjects]
    unknown = sorted(set(chosen) - set(all_subjects))
    if unknown:
        raise ValueError(f"subjects {unknown} are not in the dataset; subjects: {all_subjects}")
    folds: list[LosoFold] = []
    for subject in chosen:
        fold_recipe = recipe.with_overrides({"data.fold": subject})
        task = MicroExpressionTask(root, fold_recipe, recipe.network)
        fold_dir = run_dir / _folder_name(subject)
        callbacks = list(callbacks_factory(subject, fold_dir)) if callbacks_factory else []
        trainer = Trainer(fold_recipe, task, fold_dir, callbacks=callbacks)
        result = trainer.fit()  # leaves the best weights loaded
        outputs, targets, _ = trainer.predict("test")
        y_true = targets["label"].numpy()
        y_pred = outputs["logits"].argmax(1).numpy()
        metrics = classification_metrics(y_true, y_pred, len(base.label_names), base.label_names)
        folds.append(LosoFold(subject, y_true, y_pred, metrics, fold_dir, result.best_epoch))
    y_true = np.concatenate([f.y_true for f in folds])
    y_pred = np.concatenate([f.y_pred for f in folds])
    pooled = classification_metrics(y_true, y_pred, len(base.label_names), base.label_names)
    return LosoResult(folds=folds, pooled=pooled, label_names=base.label_names,
                      extra={"num_folds": len(folds), "num_test_clips": int(len(y_true))})


register_task_kind(TaskKind(
    name="micro", data_task="micro", build=MicroExpressionTask,
    data_options=MicroData, loss_options=NoLossOptions, augment_options=AugmentConfig,
))
