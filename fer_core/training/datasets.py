"""Datasets over prepared datasets' manifests, shared by the per-network tasks.

:class:`ManifestDataset` decodes each row once (cached as uint8 at the model's input size, so an
epoch costs no disk I/O or resizing), then applies per-epoch augmentation from
:func:`~fer_core.training.task.epoch_generator` and the model's normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from fer_core.data.transforms import AugmentConfig, augment, normalize
from fer_core.training.task import epoch_generator

Decoder = Callable[[Path, pd.Series], np.ndarray]  # -> uint8 (..., C, H, W) at model size
TargetFn = Callable[[pd.Series], Mapping[str, Any]]


class ManifestDataset(Dataset):
    """Rows of a manifest → ``(normalised float input, targets)``."""

    def __init__(
        self,
        root: Path,
        rows: pd.DataFrame,
        decode: Decoder,
        targets: TargetFn,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment_cfg: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.root, self.rows = Path(root), rows.reset_index(drop=True)
        self.decode, self.targets_fn = decode, targets
        self.mean, self.std = mean, std
        self.augment_cfg, self.seed, self.epoch = augment_cfg, seed, 0
        self._cache: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def pixels(self, i: int) -> np.ndarray:
        """Decoded uint8 input of row ``i`` (cached)."""
        if i not in self._cache:
            self._cache[i] = self.decode(self.root, self.rows.iloc[i])
        return self._cache[i]

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.ascontiguousarray(self.pixels(i))).float() / 255.0
        if self.augment_cfg is not None:
            x = augment(x, epoch_generator(self.seed, self.epoch, i), self.augment_cfg)
        targets = {k: torch.as_tensor(v) for k, v in self.targets_fn(self.rows.iloc[i]).items()}
        return normalize(x, self.mean, self.std), targets


def split_rows(manifest: pd.DataFrame, val_fraction: float = 0.15, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Rows by split; when a manifest has no "val" split, hold out ``val_fraction`` of "train"
    (stratified by label where there is one) so early stopping has something to watch."""
    out = {s: manifest[manifest["split"] == s] for s in ("train", "val", "test")}
    if len(out["val"]) == 0 and len(out["train"]) > 1 and val_fraction > 0:
        rng = np.random.default_rng(seed)
        train = out["train"]
        val_idx = []
        for _, group in train.groupby("label"):
            k = int(round(len(group) * val_fraction))
            if k and len(group) > 1:
                val_idx.extend(rng.choice(group.index.to_numpy(), size=min(k, len(group) - 1), replace=False))
        out["val"] = train.loc[sorted(val_idx)]
        out["train"] = train.drop(index=val_idx)
    return out
