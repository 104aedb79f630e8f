"""Focal losses for the static classifier: the CA-ResNet method's form and the target-class form.

**Method form** (:func:`method_focal_loss`, the default of :class:`FocalLoss`; the CA-ResNet method)::

    FL = −Σ_i Σ_c [ α (1 − p_ic)^γ y_ic ln p_ic + (1 − α) p_ic^γ (1 − y_ic) ln(1 − p_ic) ]

with ``p = softmax(z)``, α ∈ [0, 1] (one scalar), γ ∈ [0, 5], summed over classes *and* samples.
Choices where the method left room:

* ``y`` is the one-hot target, or the label-smoothed ``(1 − ε)·onehot + ε/K`` when smoothing is on
  (the method's recipe turns label smoothing on; the formula is linear in ``y``, so this is the
  natural reading).
* ``ln(1 − p_c)`` is computed as ``logsumexp(z_{j≠c}) − logsumexp(z)``, exact and finite in float32
  where ``log1p(−p)`` would give −inf for a confident class.
* The method gives no α value; the default α = 0.25 with γ = 2 is Lin et al.'s. ``reduction="sum"`` is
  the method's Σ_i; ``"mean"`` (Σ_c, then mean over samples) stays selectable, because a summed loss
  scales SGD's step with the batch size (Adam, the recipe's optimiser, is insensitive to it).

**Target-class form** (:func:`focal_loss`, ``FocalLoss(form="target")``), kept for the ResNet baselines'
per-class α and because γ = 0 there is exactly cross-entropy. For logits ``z`` over K classes, ``p = softmax(z)`` and a target distribution ``q`` (one-hot, or
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
FORMS = ("method", "target")
MAX_GAMMA = 5.0  # the method's range for γ


def _log_one_minus_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``ln(1 − softmax(z)_c)`` for every class, as ``logsumexp(z_{j≠c}) − logsumexp(z)``."""
    num_classes = logits.shape[1]
    eye = torch.eye(num_classes, dtype=torch.bool, device=logits.device)
    others = logits.unsqueeze(1).expand(-1, num_classes, -1).masked_fill(eye, float("-inf"))  # (N, K, K)
    return torch.logsumexp(others, dim=2) - torch.logsumexp(logits, dim=1, keepdim=True)


def method_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float = 0.25,
    label_smoothing: float = 0.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """The CA-ResNet method's focal loss of ``logits`` (N, K ≥ 2) against class ``target`` (N,).

    ``−Σ_c [α (1−p_c)^γ y_c ln p_c + (1−α) p_c^γ (1−y_c) ln(1−p_c)]`` per sample, then ``reduction``.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, K) with K >= 2, got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be (N,) = {tuple(logits.shape[:1])}, got {tuple(target.shape)}")
    if not 0.0 <= gamma <= MAX_GAMMA:
        raise ValueError(f"gamma must be in [0, {MAX_GAMMA}], got {gamma}")
    alpha = float(torch.as_tensor(alpha).item()) if isinstance(alpha, torch.Tensor) else alpha
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be one number in [0, 1] for the method's focal loss, got {alpha!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    num_classes = logits.shape[1]
    y = F.one_hot(target.long(), num_classes).to(logits.dtype)
    if label_smoothing > 0:
        y = (1.0 - label_smoothing) * y + label_smoothing / num_classes
    log_p = F.log_softmax(logits, dim=1)
    log_not_p = _log_one_minus_softmax(logits)
    p = log_p.exp()
    positive = alpha * (1.0 - p).clamp_min(0.0).pow(gamma) * y * log_p
    negative = (1.0 - alpha) * p.pow(gamma) * (1.0 - y) * log_not_p
    loss = -(positive + negative).sum(dim=1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


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
    """Focal loss over a model's ``forward_train`` dict: ``outputs[logits_key]`` vs ``targets[target_key]``.

    ``form="method"`` (default) is :func:`method_focal_loss` (α a scalar in [0, 1], default 0.25;
    ``reduction`` default "sum"); ``form="target"`` is :func:`focal_loss` (α None, scalar or per class;
    ``reduction`` default "mean").
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        logits_key: str = "logits",
        target_key: str = "label",
        form: str = "method",
        reduction: str | None = None,
    ) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if gamma < 0 or (form == "method" and gamma > MAX_GAMMA):
            raise ValueError(f"gamma must be in [0, {MAX_GAMMA}] (method form) or >= 0 (target form), got {gamma}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if form == "method":
            alpha = 0.25 if alpha is None else alpha
            if isinstance(alpha, (list, tuple)) or not 0.0 <= float(alpha) <= 1.0:
                raise ValueError(f"the method's focal loss takes one alpha in [0, 1], got {alpha!r}")
        reduction = reduction or ("sum" if form == "method" else "mean")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.form, self.reduction = form, reduction
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.logits_key = logits_key
        self.target_key = target_key
        # a buffer, so .to(device) moves the class weights with the module
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs[self.logits_key]
        if self.form == "method":
            return method_focal_loss(logits, targets[self.target_key], self.gamma, float(self.alpha),
                                     self.label_smoothing, self.reduction)
        alpha = None if self.alpha is None else self.alpha.to(logits.dtype)
        return focal_loss(logits, targets[self.target_key], self.gamma, alpha, self.label_smoothing, self.reduction)

    def extra_repr(self) -> str:
        return (f"form={self.form!r}, gamma={self.gamma}, label_smoothing={self.label_smoothing}, "
                f"alpha={self.alpha is not None}, reduction={self.reduction!r}")
