"""Losses of the micro-expression models: cross-entropy for the classifier and an image loss for
training a motion magnifier on (onset, apex, magnified) pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def micro_classification_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of ``outputs["logits"]`` (B, K) against ``targets["label"]`` int64 (B,)."""
    return F.cross_entropy(outputs["logits"], targets["label"])


def magnification_loss(
    outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], kind: str = "mse"
) -> torch.Tensor:
    """Pixel loss between ``outputs["magnified"]`` and ``targets["magnified"]``.

    Oh et al. (2018) use L1 (``kind="l1"``). MSE is the default here because the motion changes only a
    few pixels: in short runs L1, whose optimum is the per-pixel median, settles on copying the apex
    frame, while MSE learns the change.
    """
    pred, target = outputs["magnified"], targets["magnified"]
    if pred.shape != target.shape:
        raise ValueError(f"magnified shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    raise ValueError(f"kind must be 'l1' or 'mse', got {kind!r}")
