"""Affect metrics: categorical expression accuracy and the concordance correlation coefficient (CCC)
used for dimensional affect (valence / arousal; AffectNet, Aff-Wild2).

CCC (Lin, 1989) = 2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2), with population (1/N)
moments. Unlike Pearson's r it also penalises shifts and scale errors: a perfect prediction scores 1,
its negation -1. :func:`concordance_correlation` is differentiable, so the CCC loss reuses it.
"""

from __future__ import annotations

import torch


def concordance_correlation(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CCC over the first axis: (N,) -> scalar, (N, D) -> (D,) (one value per affect dimension)."""
    pred, target = torch.as_tensor(pred, dtype=torch.float32), torch.as_tensor(target, dtype=torch.float32)
    if pred.shape != target.shape or pred.ndim not in (1, 2):
        raise ValueError(f"pred and target must share a (N,) or (N, D) shape, got {tuple(pred.shape)}, {tuple(target.shape)}")
    if pred.shape[0] < 2:
        raise ValueError("CCC needs at least two samples")
    pred_mean, target_mean = pred.mean(dim=0), target.mean(dim=0)
    pred_var = ((pred - pred_mean) ** 2).mean(dim=0)
    target_var = ((target - target_mean) ** 2).mean(dim=0)
    covariance = ((pred - pred_mean) * (target - target_mean)).mean(dim=0)
    return 2.0 * covariance / (pred_var + target_var + (pred_mean - target_mean) ** 2 + eps)


def expression_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1) -> float:
    """Top-1 accuracy of (N, C) logits against (N,) class ids, skipping ``ignore_index`` labels."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected (N, C) logits and (N,) labels, got {tuple(logits.shape)}, {tuple(labels.shape)}")
    keep = labels != ignore_index
    if not keep.any():
        raise ValueError("no labelled samples to score")
    return float((logits[keep].argmax(dim=1) == labels[keep]).float().mean())
