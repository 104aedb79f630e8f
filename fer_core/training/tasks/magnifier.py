"""Pre-training of the learned motion magnifier on magnified pairs: the ``magnifier`` network.

Data: a ``micro`` prepared dataset of magnified pairs (:mod:`fer_core.data.formats.magnified_pairs`;
SynthFACS renders exact ones, real pairs go through the same adapter): each row a 3-frame clip
(onset, apex, magnified) with α in the ``magnification`` column. Input: onset and apex at the
model's input spec plus the factor plane ``1 + α`` (:func:`~fer_core.models.micro_lsh.magnifier_input`);
target: the magnified frame, normalised like the input. Augmentation (``recipe.augment``) is drawn
once per pair for all three frames, so the motion between them is untouched.

Loss: :func:`~fer_core.losses.micro.magnification_loss` (``loss_kwargs.kind``: "mse" default, "l1"
as Oh et al.). Splits: by subject (:func:`~fer_core.training.tasks.micro.subject_splits`), so the
reported error is on *held-out* pairs of unseen faces.

Metrics (normalised space, i.e. pixels in [-1, 1]): ``mse`` of the magnifier, and the two
references on the same pairs: ``mse_identity`` (output = apex frame) and ``mse_linear`` (``onset +
(1 + α)(apex − onset)``); ``gain_vs_linear`` = 1 − mse / mse_linear is the primary metric (higher
is better; > 0 means the learned magnifier beats the linear one).

Profiles. No source gives a schedule for the magnifier (Oh et al. train 12 epochs of Adam, lr 1e-4,
on 100k pairs); ``paper`` follows them at the classifier's 112 px; ``quick`` is CPU-sized (32 px).
The micro network's profile then loads the registered weights (``data.magnifier_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from fer_core.data.manifest import read_card, read_manifest
from fer_core.data.preprocess import to_model_input
from fer_core.data.samples import read_clip
from fer_core.data.transforms import AugmentConfig
from fer_core.losses.micro import magnification_loss
from fer_core.models import create_model
from fer_core.training.datasets import ManifestDataset
from fer_core.training.recipe import Recipe
from fer_core.training.tasks import TaskKind, register_task_kind
from fer_core.training.tasks.micro import subject_splits


@dataclass(frozen=True)
class MagnifierData:
    """``data.*`` of the magnifier kind (subject-independent splits)."""

    val_fraction: float = 0.2
    test_fraction: float = 0.2


@dataclass(frozen=True)
class MagnificationLossOptions:
    """``loss_kwargs.*`` of the magnifier kind."""

    kind: str = "mse"  # "mse" | "l1"


class MagnifiedPairsDataset(Dataset):
    """(3, C, H, W) normalised onset/apex/magnified stacks -> (magnifier input, {"magnified", ...})."""

    def __init__(self, frames: ManifestDataset, factors: np.ndarray) -> None:
        self.frames, self.factors = frames, torch.as_tensor(factors, dtype=torch.float32)

    def set_epoch(self, epoch: int) -> None:
        self.frames.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int):
        stack, _ = self.frames[i]
        onset, apex, magnified = stack[0], stack[1], stack[2]
        factor = self.factors[i]
        x = torch.stack([onset, apex, torch.full_like(onset, float(factor))])
        return x, {"magnified": magnified, "onset": onset, "apex": apex, "factor": factor}


class MagnifierTask:
    """Magnified pairs -> the learned magnifier; metrics against identity and linear magnification."""

    primary_metric = "gain_vs_linear"

    def __init__(self, root: Path, recipe: Recipe, name: str = "magnifier") -> None:
        self.name, self.root, self.recipe = name, Path(root), recipe
        card = read_card(root)
        manifest = read_manifest(root)
        if "magnification" not in manifest.columns or card.source_format != "magnified_pairs":
            raise ValueError(f"{root} is not a magnified-pairs dataset (format magnified_pairs, "
                             f"got {card.source_format!r}); the magnifier trains on (onset, apex, magnified) pairs")
        self.manifest = manifest[manifest["num_frames"] == 3].reset_index(drop=True)
        if self.manifest.empty:
            raise ValueError(f"{root} holds no readable magnified pairs")
        self.meta = create_model(recipe.network, **recipe.model_kwargs).metadata

    def _decode(self, root: Path, row: pd.Series) -> np.ndarray:
        frames = read_clip(root, row["path"])
        x = to_model_input(frames, self.meta.input_size, self.meta.in_chans, 0.0, 1.0)
        return np.round(x * 255.0).astype(np.uint8)  # (3, C, H, W): onset, apex, magnified

    def splits(self, recipe: Recipe) -> dict[str, pd.DataFrame]:
        data = MagnifierData(**recipe.data)
        return subject_splits(self.manifest, data.val_fraction, data.test_fraction, recipe.seed)

    def build_datasets(self, recipe: Recipe) -> dict[str, Dataset]:
        aug = AugmentConfig.from_mapping(recipe.augment) if recipe.augment else None
        out: dict[str, Dataset] = {}
        for split, rows in self.splits(recipe).items():
            frames = ManifestDataset(self.root, rows, self._decode, lambda row: {}, self.meta.mean, self.meta.std,
                                     augment_cfg=aug if split == "train" else None, seed=recipe.seed)
            out[split] = MagnifiedPairsDataset(frames, 1.0 + rows["magnification"].to_numpy(np.float32))
        return out

    def build_loss(self, recipe: Recipe, model):
        kind = MagnificationLossOptions(**recipe.loss_kwargs).kind

        def loss(outputs, targets):
            value = magnification_loss(outputs, targets, kind)
            return value, {kind: value.detach()}

        return loss

    def compute_metrics(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return reconstruction_errors(outputs["magnified"], targets)

    def report(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {"reconstruction": reconstruction_errors(outputs["magnified"], targets)}


def reconstruction_errors(predicted: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """MSE of ``predicted`` vs the magnified frames, and of the identity and linear references."""
    target = targets["magnified"].float()
    onset, apex = targets["onset"].float(), targets["apex"].float()
    factor = targets["factor"].float().view(-1, 1, 1, 1)
    linear = onset + factor * (apex - onset)
    mse = float(torch.mean((predicted.float() - target) ** 2))
    mse_identity = float(torch.mean((apex - target) ** 2))
    mse_linear = float(torch.mean((linear - target) ** 2))
    return {"mse": mse, "mse_identity": mse_identity, "mse_linear": mse_linear,
            "gain_vs_linear": 1.0 - mse / mse_linear if mse_linear > 0 else 0.0,
            "gain_vs_identity": 1.0 - mse / mse_identity if mse_identity > 0 else 0.0}


register_task_kind(TaskKind(
    name="magnifier", data_task="micro", build=MagnifierTask,
    data_options=MagnifierData, loss_options=MagnificationLossOptions, augment_options=AugmentConfig,
))
