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

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_core.data.manifest import read_card, read_manifest
from fer_core.data.preprocess import RESAMPLE_METHODS, HaarFaceDetector, detect_and_align, resample_clip, to_model_input
from fer_core.data.samples import read_clip
from fer_core.losses.ecstfl import DEFAULT_LAMBDA, EcStflLoss
from fer_core.models import create_model
from fer_core.training.recipe import Recipe
from fer_core.training.tasks import TaskSpec, register_task
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


class DynamicClassificationTask(SingleLabelClassificationTask):
    """Fixed-length clips with one expression label each."""

    primary_metric = "uar"

    def __init__(self, root: Path, recipe: Recipe, name: str = "c3d_ecstfl") -> None:
        self.name, self.root, self.recipe = name, Path(root), recipe
        card = read_card(root)
        self.label_names = tuple(card.classes)
        manifest = read_manifest(root)
        manifest = manifest[manifest["label"] >= 0]
        if recipe.data.get("fold") is not None:
            manifest = select_fold(manifest, recipe.data["fold"])
        self.manifest = manifest
        self.resample = recipe.data.get("resample", "interpolate")
        if self.resample not in RESAMPLE_METHODS:
            raise ValueError(f"data.resample must be one of {RESAMPLE_METHODS}, got {self.resample!r}")
        self.align_faces = resolve_align_faces(recipe.data.get("align_faces", "auto"), card.provenance)
        self._detector: HaarFaceDetector | None = None  # built on first use (Haar cascades load slowly)
        probe = create_model(recipe.network, **{**recipe.model_kwargs, **self.model_overrides()})
        self.meta = probe.metadata
        self.num_frames = int(self.meta.input.shape[0])

    def model_overrides(self) -> dict[str, Any]:
        return {"num_classes": len(self.label_names)}

    def _aligned(self, frames: np.ndarray) -> np.ndarray:
        """Frames with a detected face, each aligned on the eyes at the model's size (raw if none has one)."""
        if self._detector is None:
            self._detector = HaarFaceDetector()
        aligned = [detect_and_align(frame, self._detector, self.meta.input_size) for frame in frames]
        kept = [face for face in aligned if face is not None]
        return np.stack(kept) if kept else frames

    def _decode(self, root: Path, row: pd.Series) -> np.ndarray:
        frames = read_clip(root, row["path"])
        if self.align_faces:
            frames = self._aligned(frames)
        frames = resample_clip(frames, self.num_frames, self.resample)
        x = to_model_input(frames, self.meta.input_size, self.meta.in_chans, 0.0, 1.0)
        return np.round(x * 255.0).astype(np.uint8)  # (T, C, H, W)

    def build_loss(self, recipe: Recipe, model):
        kwargs = dict(recipe.loss_kwargs)
        criterion = EcStflLoss(lambda_weight=kwargs.get("lambda_weight", DEFAULT_LAMBDA),
                               reduction=kwargs.get("reduction", "sum"),
                               label_smoothing=kwargs.get("label_smoothing", 0.0))

        def loss(outputs, targets):
            parts = criterion.parts(outputs, targets)
            return parts["loss"], {"ce": parts["ce"].detach(), "ec_stfl": parts["ec_stfl"].detach()}

        return loss


def _profiles() -> dict[str, Recipe]:
    paper = Recipe(
        network="c3d_ecstfl", profile="paper",
        model_kwargs={},  # C3D as published: 16 x 112 x 112 RGB, widths 64..512, fc 4096, dropout 0.5
        loss_kwargs={"lambda_weight": 0.1, "reduction": "sum"},
        data={"val_fraction": 0.1, "align_faces": False, "resample": "interpolate"},
        # C3D's recipe (Tran et al. 2015): SGD, lr 0.003 divided by 10 every 4 epochs, 16 epochs,
        # mini-batches of ~30 clips; random crops (C3D: 112 of 128x171, ~57 % of the area) and flips.
        optimizer="sgd", lr=0.003, momentum=0.9, weight_decay=5e-4, scheduler="step", step_size=4, gamma=0.1,
        epochs=16, batch_size=32, eval_batch_size=32, early_stopping_patience=0, monitor="val/loss",
        monitor_mode="min", num_workers=4,
        augment={"hflip": True, "rotation_deg": 0.0, "crop_area": [0.6, 1.0], "gamma_max": 1.0,
                 "noise_var": 0.0, "erase_prob": 0.0},
    )
    quick = paper.with_overrides({
        "profile": "quick",
        # Narrow C3D on 8 frames of 32x32; dropout off because a 128-wide FC has little to spare.
        "model_kwargs": {"num_frames": 8, "img_size": 32, "width": 8, "fc_width": 128, "drop_rate": 0.0},
        "data": {"val_fraction": 0.15, "align_faces": False, "resample": "interpolate"},
        "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "scheduler": "cosine",
        # C3D sits on a plateau for ~100 steps before it starts to learn: enough epochs, patient stopping.
        "epochs": 15, "batch_size": 28, "eval_batch_size": 64, "early_stopping_patience": 6, "num_workers": 0,
        "max_steps_per_epoch": 40,
        "augment": {"hflip": True, "rotation_deg": 0.0, "crop_area": [0.85, 1.0], "gamma_max": 1.2,
                    "noise_var": 0.0, "erase_prob": 0.0},
    })
    return {"paper": paper, "quick": quick}


register_task(TaskSpec(
    network="c3d_ecstfl", data_task="dynamic",
    build=lambda root, recipe: DynamicClassificationTask(root, recipe, "c3d_ecstfl"),
    profiles=_profiles(),
))
