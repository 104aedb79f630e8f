"""Dynamic (video) expression classification: ``c3d_ecstfl`` on DFEW-style clips.

Data: a ``dynamic`` prepared dataset (:mod:`fer_core.data.formats.dfew`), one row per clip. DFEW's
protocol is 5-fold: the adapter already wrote the chosen fold's train/test split, and keeps every
clip's ``fold`` (the fold in which it is a test clip), so ``data.fold`` = 1..5 re-splits the same
prepared dataset for another fold (test = that fold's clips, train = the rest). Validation is a
held-out part of train (``data.val_fraction``, stratified, :func:`~fer_core.training.datasets.split_rows`).

Decoding (once per clip, cached as uint8 (T, C, H, W)):

1. :func:`~fer_core.data.samples.read_clip` (frame folder, video or packed array);
2. with ``data.align_faces`` ("auto" by default: on for raw videos, i.e. a card whose
   ``provenance.clips`` is "video" (DFEW's ``Clip/original``), off for DFEW's ``clip_224x224`` frames,
   which are already face crops where re-detecting only adds jitter and Haar misses; true/false force
   it), each frame goes through
   :class:`~fer_core.data.preprocess.HaarFaceDetector` + :func:`~fer_core.data.preprocess.detect_and_align`
   and frames without a detected face are dropped; a clip in which no frame has a face keeps its raw
   frames rather than vanishing from its split;
3. :func:`~fer_core.data.preprocess.resample_clip` to the model's fixed length (``data.resample``:
   "keyframes+interpolate" is the method's combination (key frames of a longer clip, time interpolation
   of a shorter one); "interpolate", "uniform" or "keyframes" alone stay selectable);
4. :func:`~fer_core.data.preprocess.to_model_input` per frame at the model's input spec.

Augmentation: :func:`~fer_core.data.transforms.augment` on the whole (T, C, H, W) clip, which draws
one flip/rotation/crop/gamma for all frames, so the motion between frames is untouched.

Loss: ``CE + λ·EC-STFL`` on fc7 features (:class:`~fer_core.losses.ecstfl.EcStflLoss`; ``loss_kwargs``
``lambda_weight`` (default :data:`~fer_core.losses.ecstfl.DEFAULT_LAMBDA`, the one λ of the class and
the task), ``reduction``, ``label_smoothing``), logged as parts ``ce`` and ``ec_stfl`` (before λ).
Metrics: UAR (the primary one, as DFEW reports it next to WAR), WAR = accuracy, UF1, per-class
recall/F1; report: confusion matrix and per-class precision/recall/F1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_core.data.manifest import read_card, read_manifest
from fer_core.data.pipeline import InputPipeline, make_detector, prepare_pixels
from fer_core.data.preprocess import RESAMPLE_METHODS, HaarFaceDetector
from fer_core.data.samples import read_clip
from fer_core.losses.ecstfl import DEFAULT_LAMBDA, EcStflLoss
from fer_core.models import create_model
from fer_core.training.recipe import Recipe
from fer_core.training.tasks import TaskKind, register_task_kind
from fer_core.data.transforms import AugmentConfig
from fer_core.training.tasks.static import SingleLabelClassificationTask

NUM_FOLDS = 5


def resolve_align_faces(value: Any, provenance: dict[str, Any]) -> bool:
    """``data.align_faces``: True/False as given; "auto" = on exactly when the clips are raw videos."""
    if isinstance(value, bool):
        return value
    if value == "auto":
        return provenance.get("clips") == "video"
    raise ValueError(f"data.align_faces must be true, false or 'auto', got {value!r}")


def select_fold(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The manifest re-split for DFEW fold ``fold``: its test clips -> test, every other clip -> train."""
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 1 <= fold <= NUM_FOLDS:
        raise ValueError(f"data.fold must be an int in 1..{NUM_FOLDS}, got {fold!r}")
    if "fold" not in manifest.columns:
        raise ValueError("data.fold needs a manifest with a 'fold' column (DFEW's 5-fold protocol)")
    out = manifest.copy()
    out["split"] = np.where(out["fold"].to_numpy() == fold, "test", "train")
    return out


@dataclass(frozen=True)
class DynamicData:
    """``data.*`` of the dynamic kind."""

    val_fraction: float = 0.15  # held out of train when the manifest has no "val" split
    fold: int | None = None  # DFEW-style 5-fold split: train/val/test of fold N
    resample: str = "interpolate"  # how a clip is brought to the model's frame count (RESAMPLE_METHODS)
    align_faces: bool | str = False  # detect and eye-align each frame first; "auto" = when clips are raw videos


@dataclass(frozen=True)
class EcStflOptions:
    """``loss_kwargs.*`` of the dynamic kind: CE + λ·EC-STFL."""

    lambda_weight: float = DEFAULT_LAMBDA
    reduction: str = "sum"
    label_smoothing: float = 0.0


class DynamicClassificationTask(SingleLabelClassificationTask):
    """Fixed-length clips with one expression label each."""

    data_options = DynamicData

    primary_metric = "uar"

    def __init__(self, root: Path, recipe: Recipe, name: str = "c3d_ecstfl") -> None:
        self.name, self.root, self.recipe = name, Path(root), recipe
        card = read_card(root)
        self.label_names = tuple(card.classes)
        manifest = read_manifest(root)
        manifest = manifest[manifest["label"] >= 0]
        data = DynamicData(**recipe.data)
        if data.fold is not None:
            manifest = select_fold(manifest, data.fold)
        self.manifest = manifest
        self.resample = data.resample
        if self.resample not in RESAMPLE_METHODS:
            raise ValueError(f"data.resample must be one of {RESAMPLE_METHODS}, got {self.resample!r}")
        self.align_faces = resolve_align_faces(data.align_faces, card.provenance)
        self._detector: HaarFaceDetector | None = None  # built on first use (Haar cascades load slowly)
        probe = create_model(recipe.network, **{**recipe.model_kwargs, **self.model_overrides()})
        self.meta = probe.metadata
        self.num_frames = int(self.meta.input.shape[0])

    def model_overrides(self) -> dict[str, Any]:
        return {"num_classes": len(self.label_names)}

    def _decode(self, root: Path, row: pd.Series) -> np.ndarray:
        frames = read_clip(root, row["path"])
        # The package's input-pipeline spec is the one source of this decode (serving interprets it too).
        # "auto" is resolved against the dataset card here, so the pipeline sees a plain bool.
        pipeline = self.input_pipeline()
        if pipeline.face == "haar" and self._detector is None:
            self._detector = make_detector(pipeline)
        return prepare_pixels(list(frames), pipeline, self._detector).pixels  # (T, C, H, W)

    def input_pipeline(self) -> InputPipeline:
        """The input-pipeline spec this task decodes with (the model package records it)."""
        return InputPipeline.for_model(self.meta, {**self.recipe.data, "align_faces": self.align_faces})

    def build_loss(self, recipe: Recipe, model):
        criterion = EcStflLoss(**asdict(EcStflOptions(**recipe.loss_kwargs)))

        def loss(outputs, targets):
            parts = criterion.parts(outputs, targets)
            return parts["loss"], {"ce": parts["ce"].detach(), "ec_stfl": parts["ec_stfl"].detach()}

        return loss


register_task_kind(TaskKind(
    name="dynamic", data_task="dynamic", build=DynamicClassificationTask,
    data_options=DynamicData, loss_options=EcStflOptions, augment_options=AugmentConfig,
))
