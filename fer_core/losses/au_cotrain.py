"""Losses of the two-view AU co-training network (:mod:`fer_core.models.au_cotrain`).

Per view v, with clean logits ``c_v`` and noisy-head logits ``n_v``::

    L_clean_v = BBCE(c_v, y_accurate)             # clean head on accurate labels
    L_noisy_v = BBCE(c_v + n_v, y_inaccurate)     # p_noisy = sigmoid(f_clean + f_noisy)
    L_pseudo_v = BBCE(c_v, y_pseudo)              # optional, semi-supervised pseudo-labels
    L_orth = mean_j |cos([w1_j; b1_j], [w2_j; b2_j])|            # the two clean heads, per AU
    L_cons = mean_{i,j} H((p1 + p2) / 2) - (H(p1) + H(p2)) / 2    # p_v = sigmoid(c_v), binary entropy

    total = w_clean * mean_v L_clean_v + w_noisy * mean_v L_noisy_v + w_pseudo * mean_v L_pseudo_v
            + w_orth * L_orth + w_cons * L_cons

Choices where the description left room:

* Class-balanced BCE (``BBCE``): positives of AU j are weighted by ``(1 - f_j) / f_j`` and negatives
  by 1 (PyTorch's ``pos_weight`` convention), so both classes carry the same total weight. ``f_j``
  is the positive frequency of AU j: given per label set (``*_label_frequencies``, e.g. from the
  training set), or else estimated from the known labels of the batch with add-one smoothing,
  ``f_j = (n_pos_j + 1) / (n_known_j + 2)``, so an AU with no positive in the batch gets a finite
  weight. The weighted terms are averaged over the *known* entries; unknown labels (-1) are masked
  out (a batch with no known entry contributes an exact, graph-connected zero).
* Orthogonality uses the absolute cosine so that anti-parallel heads are penalised like parallel
  ones (a signed cosine would be minimised at -1, i.e. the same classifier up to sign).
* Consistency sign: ``H(mean) - mean(H)`` is the Jensen-Shannon divergence between the two views'
  Bernoulli predictions; it is >= 0 (entropy is concave) and 0 exactly when the views agree, so
  *minimising* it encourages agreement. It is computed on every row of the batch, labelled or not.
* The per-view terms are averaged (not summed) over the two views so that a weight of 1 has the
  scale of a single network's BCE. Default weights (no values were given): 1 for the label terms,
  0.1 for orthogonality and 1 for consistency.
* Targets: ``accurate``, ``inaccurate`` and optional ``pseudo`` are (B, L) label tensors with values
  {0, 1, -1}; optional boolean row masks ``has_accurate`` / ``has_inaccurate`` / ``has_pseudo`` (B,)
  mark which rows carry which labels (rows outside a mask are treated as unknown for that term).
  A missing label key means that term is zero for the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NUM_VIEWS = 2
LABEL_SETS = ("accurate", "inaccurate", "pseudo")


def _as_frequencies(
    value: Sequence[float] | torch.Tensor | None, num_labels: int | None = None
) -> torch.Tensor | None:
    if value is None:
        return None
    freq = torch.as_tensor(value, dtype=torch.float32).flatten()
    if num_labels is not None and freq.numel() != num_labels:
        raise ValueError(f"expected {num_labels} label frequencies, got {freq.numel()}")
    if not ((freq > 0) & (freq < 1)).all():
        raise ValueError(f"label frequencies must lie strictly inside (0, 1), got {freq.tolist()}")
    return freq


def balanced_bce_with_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_frequencies: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-balanced multi-label BCE of ``logits`` (B, L) against 0/1 ``labels`` (-1 = unknown).

    Positives of AU j are weighted by ``(1 - f_j) / f_j``; ``f_j`` comes from ``label_frequencies``
    or, if None, from the batch's known labels as ``(n_pos + 1) / (n_known + 2)``. Mean over known
    entries.
    """
    if logits.shape != labels.shape or logits.ndim != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must both be (B, L)")
    known = labels >= 0
    if not known.any():
        return logits.sum() * 0.0  # keeps the graph so callers can always backward()
    y = torch.where(known, labels, torch.zeros_like(labels)).to(logits.dtype)
    freq = _as_frequencies(label_frequencies, logits.shape[1])
    if freq is None:
        n_pos = (y * known).sum(0)
        freq = (n_pos + 1.0) / (known.sum(0) + 2.0)
    pos_weight = ((1.0 - freq) / freq).to(logits)
    per_entry = -(pos_weight * y * F.logsigmoid(logits) + (1.0 - y) * F.logsigmoid(-logits))
    return (per_entry * known).sum() / known.sum()


def orthogonality_loss(weights_1: torch.Tensor, weights_2: torch.Tensor) -> torch.Tensor:
    """Mean over AUs of |cos| between the two clean heads' per-AU vectors ([w; b], shape (L, D+1))."""
    if weights_1.shape != weights_2.shape or weights_1.ndim != 2:
        raise ValueError(f"head weights {tuple(weights_1.shape)} / {tuple(weights_2.shape)} must match, (L, D+1)")
    return F.cosine_similarity(weights_1, weights_2, dim=1, eps=1e-8).abs().mean()


def binary_entropy(p: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise entropy (nats) of Bernoulli(p)."""
    p = p.clamp(eps, 1.0 - eps)
    return -(p * p.log() + (1.0 - p) * (1.0 - p).log())


def consistency_loss(logits_1: torch.Tensor, logits_2: torch.Tensor) -> torch.Tensor:
    """``H((p1 + p2) / 2) - (H(p1) + H(p2)) / 2`` averaged over rows and AUs (>= 0, 0 iff agreement)."""
    if logits_1.shape != logits_2.shape:
        raise ValueError(f"view logits differ in shape: {tuple(logits_1.shape)} vs {tuple(logits_2.shape)}")
    p1, p2 = torch.sigmoid(logits_1), torch.sigmoid(logits_2)
    js = binary_entropy((p1 + p2) / 2) - (binary_entropy(p1) + binary_entropy(p2)) / 2
    return js.mean()


def _masked_labels(targets: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    labels = targets.get(key)
    if labels is None:
        return None
    mask = targets.get(f"has_{key}")
    if mask is None:
        return labels
    if mask.shape != labels.shape[:1]:
        raise ValueError(f"has_{key} must be a (B,) row mask, got {tuple(mask.shape)}")
    return torch.where(mask.bool()[:, None], labels, torch.full_like(labels, -1))


class AUCoTrainLoss(nn.Module):
    """Weighted sum of the co-training losses (see the module docstring for the formula)."""

    def __init__(
        self,
        clean_weight: float = 1.0,
        noisy_weight: float = 1.0,
        pseudo_weight: float = 1.0,
        orthogonality_weight: float = 0.1,
        consistency_weight: float = 1.0,
        accurate_label_frequencies: Sequence[float] | torch.Tensor | None = None,
        inaccurate_label_frequencies: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        weights = dict(clean=clean_weight, noisy=noisy_weight, pseudo=pseudo_weight,
                       orthogonality=orthogonality_weight, consistency=consistency_weight)
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"loss weights must be non-negative, got {weights}")
        self.weights = weights
        # Frequencies are validated now but sized lazily (the number of AUs is the model's).
        for name, value in (("accurate", accurate_label_frequencies), ("inaccurate", inaccurate_label_frequencies)):
            self.register_buffer(f"{name}_label_frequencies", _as_frequencies(value))

    def loss_parts(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted terms: ``clean``, ``noisy``, ``pseudo``, ``orthogonality``, ``consistency``."""
        views = range(1, NUM_VIEWS + 1)
        clean = [outputs[f"clean_logits_{v}"] for v in views]
        noisy = [outputs[f"noisy_logits_{v}"] for v in views]
        zero = sum(c.sum() for c in clean) * 0.0

        def per_view(logits: list[torch.Tensor], key: str, freq: torch.Tensor | None) -> torch.Tensor:
            labels = _masked_labels(targets, key)
            if labels is None:
                return zero
            return sum(balanced_bce_with_logits(z, labels, freq) for z in logits) / NUM_VIEWS

        return {
            "clean": per_view(clean, "accurate", self.accurate_label_frequencies),
            "noisy": per_view(noisy, "inaccurate", self.inaccurate_label_frequencies),
            "pseudo": per_view(clean, "pseudo", self.accurate_label_frequencies),
            "orthogonality": orthogonality_loss(outputs["clean_head_weights_1"], outputs["clean_head_weights_2"]),
            "consistency": consistency_loss(clean[0], clean[1]),
        }

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = self.loss_parts(outputs, targets)
        return sum(self.weights[name] * value for name, value in parts.items())
