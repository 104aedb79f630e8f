"""Multi-class focal loss (Lin et al., 2017) with optional per-class α and label smoothing.

For logits ``z`` over K classes, ``p = softmax(z)`` and a target distribution ``q`` (one-hot, or
label-smoothed ``q = (1 - ε)·onehot(y) + ε/K``)::

    FL = Σ_k q_k · α_k · (1 - p_k)^γ · (-log p_k)

With one-hot ``q`` this is the familiar ``-α_y (1 - p_y)^γ log p_y``. Choices where the description
left room:

* α may be ``None`` (off), a scalar (multiplies every term, the binary paper's α has no multi-class
  meaning beyond a scale), or one weight per class. With smoothing, each class term uses its own α_k.
* The batch reduction is the plain mean over samples, not ``F.cross_entropy(weight=...)``'s
  weight-normalised mean: with γ = 0 and α off the two agree exactly, with α on they differ by the
  constant ``Σ α_y / N``.
* The sum is split as ``(1 - ε)·term_y + (ε/K)·Σ_k term_k``, the decomposition PyTorch's
  cross-entropy uses, so γ = 0 without α reproduces ``F.cross_entropy(label_smoothing=ε)`` up to
  float rounding (PyTorch reduces the two parts before mixing them; we mix per sample, then reduce).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("mean", "sum", "none")


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal loss of ``logits`` (N, K) against integer class ``target`` (N,)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be (N,) = {tuple(logits.shape[:1])}, got {tuple(target.shape)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    num_classes = logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    per_class = -log_p  # (N, K): -log p_k
    if gamma != 0:
        # clamp: exp(log_softmax) can exceed 1 by an ulp, and a negative base breaks pow's gradient
        per_class = per_class * (1.0 - log_p.exp()).clamp_min(0.0).pow(gamma)
    if alpha is not None:
        alpha_t = torch.as_tensor(alpha, dtype=logits.dtype, device=logits.device)
        if alpha_t.ndim == 1 and alpha_t.numel() != num_classes:
            raise ValueError(f"alpha has {alpha_t.numel()} weights for {num_classes} classes")
        if alpha_t.ndim > 1:
            raise ValueError("alpha must be a scalar or one weight per class")
        per_class = per_class * alpha_t
    loss = per_class.gather(1, target.long().unsqueeze(1)).squeeze(1)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss + (label_smoothing / num_classes) * per_class.sum(dim=1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class FocalLoss(nn.Module):
    """Focal loss over a model's ``forward_train`` dict: ``outputs[logits_key]`` vs ``targets[target_key]``."""

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        logits_key: str = "logits",
        target_key: str = "label",
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.logits_key = logits_key
        self.target_key = target_key
        # a buffer, so .to(device) moves the class weights with the module
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs[self.logits_key]
        alpha = None if self.alpha is None else self.alpha.to(logits.dtype)
        return focal_loss(logits, targets[self.target_key], self.gamma, alpha, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}, alpha={self.alpha is not None}"
