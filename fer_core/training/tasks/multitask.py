"""Joint landmarks / expression / valence-arousal training: the ``multitask_fer`` network.

Data: a ``static`` prepared dataset whose manifest carries ``landmarks`` (68 pixel (x, y) pairs of
the stored image) and ``valence``/``arousal`` -- AffectNet (:mod:`fer_core.data.formats.affectnet`).
A row whose valence/arousal or landmarks are missing (NaN / None, or the columns absent altogether)
gets NaN targets, which :class:`~fer_core.losses.multitask.MultitaskLoss` leaves out of that term;
unlabelled rows (label -1) only train the other two terms. Expression metrics ignore them too.

Inputs: :func:`~fer_core.data.preprocess.to_model_input` at the model's input spec (RGB 64x64 by
default). It resizes the whole stored image, so the landmarks are mapped the same way: OpenCV's
resize puts source pixel centre ``x`` at ``(x + 0.5) * W_out / W_in - 0.5``.

Augmentation keeps the landmarks consistent: a horizontal flip mirrors the points (``x -> W - 1 - x``)
and swaps left/right indices with :data:`~fer_core.data.synthfacs.MIRROR_68` so point 36 stays the
outer corner of the eye on the image's left; gamma, noise and random erasing are photometric (an
erased landmark keeps its target: the network has to infer occluded points, as on real occlusions).
Rotation and random crops would move the points without the trainer knowing, so a recipe asking for
them is a ``ValueError``.

Metrics: accuracy (= WAR), UAR, UF1 and per-class recall/F1 of the expression; CCC and RMSE of
valence and arousal; landmark NME with the inter-ocular (outer eye corners) normaliser. Report:
confusion matrix, per-class table and the mean normalised error of each landmark.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from fer_core.data.manifest import read_card, read_manifest
from fer_core.data.preprocess import to_model_input
from fer_core.data.samples import read_image
from fer_core.data.synthfacs import MIRROR_68
from fer_core.data.transforms import AugmentConfig, augment, normalize
from fer_core.losses.multitask import MultitaskLoss
from fer_core.metrics.affect import concordance_correlation
from fer_core.metrics.classification import classification_metrics, confusion_matrix, per_class_report
from fer_core.metrics.landmarks import interocular_distance
from fer_core.models import ModelMetadata, create_model
from fer_core.training.datasets import split_rows
from fer_core.training.recipe import Recipe
from fer_core.training.task import epoch_generator
from fer_core.training.tasks import TaskKind, register_task_kind
from fer_core.training.tasks.static import SplitOptions

NUM_LANDMARKS = 68
AFFECT_DIMENSIONS = ("valence", "arousal")
_MIRROR_INDEX = torch.from_numpy(np.array(MIRROR_68, dtype=np.int64))  # a writable copy for torch


def scale_landmarks(points: np.ndarray, source_hw: tuple[int, int], target_hw: tuple[int, int]) -> np.ndarray:
    """Map (K, 2) pixel (x, y) of a ``source_hw`` image into the same image resized to ``target_hw``
    (pixel centres at integers, as OpenCV's resize and the landmark metrics assume)."""
    scale = np.array([target_hw[1] / source_hw[1], target_hw[0] / source_hw[0]], dtype=np.float64)
    return ((np.asarray(points, np.float64) + 0.5) * scale - 0.5).astype(np.float32)


def mirror_landmarks(points: torch.Tensor, width: int) -> torch.Tensor:
    """Landmarks (K, 2) of a horizontally flipped image of ``width`` pixels, in iBUG order again."""
    flipped = points.clone()
    flipped[:, 0] = (width - 1) - flipped[:, 0]
    return flipped[_MIRROR_INDEX]


def _check_augment(cfg: AugmentConfig) -> AugmentConfig:
    if cfg.rotation_deg or tuple(cfg.crop_area) != (1.0, 1.0):
        raise ValueError("multitask augmentation must keep landmarks where they are: use hflip and photometric "
                         f"options only (rotation_deg=0, crop_area=[1, 1]); got rotation_deg={cfg.rotation_deg}, "
                         f"crop_area={list(cfg.crop_area)}")
    return cfg


class LandmarkFaceDataset(Dataset):
    """Manifest rows -> ``(normalised image, {"expression", "valence_arousal", "landmarks"})``.

    Like :class:`~fer_core.training.datasets.ManifestDataset` (decode once, cache uint8 pixels at the
    model's size, per-(seed, epoch, index) augmentation), but the cache also holds the landmarks
    mapped into the model input's pixel frame and the flip is applied to image and points together.
    """

    def __init__(self, root: Path, rows: pd.DataFrame, meta: ModelMetadata,
                 augment_cfg: AugmentConfig | None = None, seed: int = 0) -> None:
        self.root, self.rows, self.meta = Path(root), rows.reset_index(drop=True), meta
        self.augment_cfg = _check_augment(augment_cfg) if augment_cfg is not None else None
        self.seed, self.epoch = seed, 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def decoded(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Cached (uint8 (C, H, W) at model size, float32 (68, 2) landmarks in that frame or NaN)."""
        if i not in self._cache:
            row = self.rows.iloc[i]
            image = read_image(self.root, row["path"])
            pixels = to_model_input(image, self.meta.input_size, self.meta.in_chans, 0.0, 1.0)
            landmarks = np.full((NUM_LANDMARKS, 2), np.nan, np.float32)
            raw = row.get("landmarks")
            if raw is not None and not (isinstance(raw, float) and math.isnan(raw)):
                points = np.asarray(raw, np.float64).reshape(-1, 2)
                if points.shape != (NUM_LANDMARKS, 2):
                    raise ValueError(f"row {row['id']}: landmarks hold {points.size} values, expected {2 * NUM_LANDMARKS}")
                landmarks = scale_landmarks(points, image.shape[:2], self.meta.input_size)
            self._cache[i] = (np.round(pixels * 255.0).astype(np.uint8), landmarks)
        return self._cache[i]

    def _affect(self, row: pd.Series) -> torch.Tensor:
        values = [row.get(name, math.nan) for name in AFFECT_DIMENSIONS]
        return torch.tensor([math.nan if v is None or pd.isna(v) else float(v) for v in values], dtype=torch.float32)

    def __getitem__(self, i: int):
        pixels, landmarks = self.decoded(i)
        x = torch.from_numpy(pixels).float() / 255.0
        points = torch.from_numpy(landmarks)
        if self.augment_cfg is not None:
            g = epoch_generator(self.seed, self.epoch, i)
            if self.augment_cfg.hflip and float(torch.rand((), generator=g)) < 0.5:
                x, points = x.flip(-1), mirror_landmarks(points, x.shape[-1])
            x = augment(x, g, dataclasses.replace(self.augment_cfg, hflip=False))
        row = self.rows.iloc[i]
        targets = {
            "expression": torch.tensor(int(row["label"]), dtype=torch.int64),
            "valence_arousal": self._affect(row),
            "landmarks": points,
        }
        return normalize(x, self.meta.mean, self.meta.std), targets


class MultitaskTask:
    """Expression, valence/arousal and 68 landmarks from one face image."""

    primary_metric = "accuracy"

    def __init__(self, root: Path, recipe: Recipe, name: str = "multitask_fer") -> None:
        self.name, self.root, self.recipe = name, Path(root), recipe
        card = read_card(root)
        self.label_names = tuple(card.classes)
        manifest = read_manifest(root)
        # Unlabelled faces (-1) still train the landmark and affect terms; others (e.g. -2) are corrupt.
        self.manifest = manifest[manifest["label"] >= -1]
        probe = create_model(recipe.network, **{**recipe.model_kwargs, **self.model_overrides()})
        self.meta = probe.metadata
        if self.meta.extra.get("num_landmarks") != NUM_LANDMARKS:
            raise ValueError(f"{recipe.network} predicts {self.meta.extra.get('num_landmarks')} landmarks; the data has 68")

    def input_pipeline(self) -> "InputPipeline":
        """The input-pipeline spec of this task's decode (whole image resized, no face handling:
        :func:`to_model_input` is that pipeline's resize; the model package test checks they agree)."""
        from fer_core.data.pipeline import InputPipeline

        return InputPipeline.for_model(self.meta, self.recipe.data)

    def model_overrides(self) -> dict[str, Any]:
        return {"num_classes": len(self.label_names), "label_names": list(self.label_names)}

    def build_datasets(self, recipe: Recipe) -> dict[str, LandmarkFaceDataset]:
        splits = split_rows(self.manifest, SplitOptions(**recipe.data).val_fraction, recipe.seed)
        aug = AugmentConfig.from_mapping(recipe.augment) if recipe.augment else None  # {} = off
        return {
            split: LandmarkFaceDataset(self.root, rows, self.meta, aug if split == "train" else None, recipe.seed)
            for split, rows in splits.items()
        }

    def build_loss(self, recipe: Recipe, model):
        criterion = MultitaskLoss.for_model(model, **dict(recipe.loss_kwargs))

        def loss(outputs, targets):
            parts = criterion.parts(outputs, targets)
            total = sum(criterion.weights[name] * value for name, value in parts.items())
            return total, {name: value.detach() for name, value in parts.items()}

        return loss

    def compute_metrics(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        labels = targets["expression"].numpy()
        labelled = labels >= 0
        if labelled.any():
            pred = outputs["logits"].argmax(1).numpy()
            metrics.update(classification_metrics(labels[labelled], pred[labelled], len(self.label_names), self.label_names))
        va_target = targets["valence_arousal"].float()
        va_valid = torch.isfinite(va_target).all(dim=1)
        if int(va_valid.sum()) >= 2:  # CCC is undefined on fewer than two faces
            pred, target = outputs["valence_arousal"].float()[va_valid], va_target[va_valid]
            ccc = concordance_correlation(pred, target)
            rmse = ((pred - target) ** 2).mean(dim=0).sqrt()
            for d, name in enumerate(AFFECT_DIMENSIONS):
                metrics[f"ccc_{name}"] = float(ccc[d])
                metrics[f"rmse_{name}"] = float(rmse[d])
        errors = self._landmark_errors(outputs, targets)
        if errors is not None:
            metrics["nme"] = float(errors.mean())
        return metrics

    @staticmethod
    def _landmark_errors(outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """(faces, 68) point errors / inter-ocular distance over faces with usable landmark targets."""
        target = targets["landmarks"].float()
        valid = torch.isfinite(target).flatten(1).all(dim=1)
        valid &= interocular_distance(torch.nan_to_num(target)) > 0  # NME is undefined without eye spacing
        if not valid.any():
            return None
        pred, target = outputs["landmarks"].float()[valid], target[valid]
        return (pred - target).norm(dim=-1) / interocular_distance(target).unsqueeze(1)

    def report(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        labels = targets["expression"].numpy()
        labelled = labels >= 0
        cm = confusion_matrix(labels[labelled], outputs["logits"].argmax(1).numpy()[labelled], len(self.label_names))
        rep = per_class_report(cm)
        errors = self._landmark_errors(outputs, targets)
        return {
            "labels": list(self.label_names), "confusion_matrix": cm.tolist(),
            "per_class": {name: {k: float(rep[k][i]) for k in ("precision", "recall", "f1", "support")}
                          for i, name in enumerate(self.label_names)},
            "landmark_nme": [float(v) for v in errors.mean(dim=0)] if errors is not None else [],
        }


register_task_kind(TaskKind(
    # Faces with landmarks, expression and valence/arousal: trains on "static" data (AffectNet-style).
    # Its loss options are MultitaskLoss's keyword arguments (one source for their defaults).
    name="multitask", data_task="static", build=MultitaskTask,
    data_options=SplitOptions, loss_options=MultitaskLoss, augment_options=AugmentConfig,
))
