"""Losses of the two-view AU co-training network (:mod:`fer_core.models.au_cotrain`).

Per view v, with clean logits ``c_v`` and noisy-head logits ``n_v``::

    L_clean_v = WBCE(c_v, y_accurate)             # clean head on accurate labels
    L_noisy_v = WBCE(c_v + n_v, y_inaccurate)     # p_noisy = sigmoid(f_clean + f_noisy)
    L_pseudo_v = WBCE(c_v, y_pseudo)              # optional, semi-supervised pseudo-labels
    L_orth = mean_j cos([w1_j; b1_j], [w2_j; b2_j])              # the two clean heads, per AU (signed)
    L_cons = mean_{i,j} H((p1 + p2) / 2) - (H(p1) + H(p2)) / 2    # p_v = sigmoid(c_v), binary entropy

    total = w_clean * mean_v L_clean_v + w_noisy * mean_v L_noisy_v + w_pseudo * mean_v L_pseudo_v
            + w_orth * L_orth + w_cons * L_cons

Choices where the description left room:

* Weighted BCE (``WBCE``, the method's, ``bce="au_weighted"``, default): the per-AU weight α^k
  multiplies the *whole* BCE term of AU k,
  ``−α^k [y ln σ(z) + (1 − y) ln(1 − σ(z))]``, with ``α^k = L · (1/f_k) / Σ_j (1/f_j)`` (rarer AUs
  weigh more; the weights average to 1 over the L AUs, so a balanced set gives plain BCE). The
  method names α^k as the per-AU weight without its formula; the inverse-frequency form normalised
  to mean 1 is the common one (JAA-Net's) and our choice. ``bce="pos_weight"`` keeps the earlier
  class-balanced form (positives of AU j weighted by ``(1 − f_j) / f_j``, negatives by 1).
  ``f_j`` is the positive frequency of AU j: given per label set (``*_label_frequencies``, e.g. from
  the training set), or else estimated from the known labels of the batch with add-one smoothing,
  ``f_j = (n_pos_j + 1) / (n_known_j + 2)``, so an AU with no positive in the batch gets a finite
  weight. The weighted terms are averaged over the *known* entries; unknown labels (-1) are masked
  out (a batch with no known entry contributes an exact, graph-connected zero).
* Orthogonality is the *signed* cosine mean, as the method writes it (``orthogonality="signed"``).
  Minimising it drives the heads towards anti-parallel (cos −1), which on its own would be the same
  classifier up to sign; the two clean-label terms and the consistency term forbid that (an
  anti-parallel pair predicts p₂ = 1 − p₁), so in the full loss the signed term acts as a push apart.
  ``orthogonality="abs"`` (|cos|, zero only for orthogonal heads) stays selectable.
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


def au_weighted_bce_with_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_frequencies: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The method's per-AU weighted BCE of ``logits`` (B, L) against 0/1 ``labels`` (-1 = unknown).

    ``α^k = L · (1/f_k) / Σ_j (1/f_j)`` weighs the whole BCE term of AU k; ``f_k`` as in
    :func:`balanced_bce_with_logits`. Mean over known entries.
    """
    if logits.shape != labels.shape or logits.ndim != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must both be (B, L)")
    known = labels >= 0
    if not known.any():
        return logits.sum() * 0.0
    y = torch.where(known, labels, torch.zeros_like(labels)).to(logits.dtype)
    freq = _as_frequencies(label_frequencies, logits.shape[1])
    if freq is None:
        freq = ((y * known).sum(0) + 1.0) / (known.sum(0) + 2.0)
    inverse = 1.0 / freq.to(logits)
    alpha = logits.shape[1] * inverse / inverse.sum()
    per_entry = -alpha * (y * F.logsigmoid(logits) + (1.0 - y) * F.logsigmoid(-logits))
    return (per_entry * known).sum() / known.sum()


BCE_FORMS = {"au_weighted": au_weighted_bce_with_logits, "pos_weight": balanced_bce_with_logits}
ORTHOGONALITY_FORMS = ("signed", "abs")


def orthogonality_loss(weights_1: torch.Tensor, weights_2: torch.Tensor, form: str = "signed") -> torch.Tensor:
    """Mean over AUs of cos (``form="signed"``, the method) or |cos| (``"abs"``) between the two
    clean heads' per-AU vectors ([w; b], shape (L, D+1))."""
    if weights_1.shape != weights_2.shape or weights_1.ndim != 2:
        raise ValueError(f"head weights {tuple(weights_1.shape)} / {tuple(weights_2.shape)} must match, (L, D+1)")
    if form not in ORTHOGONALITY_FORMS:
        raise ValueError(f"orthogonality must be one of {ORTHOGONALITY_FORMS}, got {form!r}")
    cos = F.cosine_similarity(weights_1, weights_2, dim=1, eps=1e-8)
    return (cos if form == "signed" else cos.abs()).mean()


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
        bce: str = "au_weighted",
        orthogonality: str = "signed",
    ) -> None:
        super().__init__()
        if bce not in BCE_FORMS:
            raise ValueError(f"bce must be one of {sorted(BCE_FORMS)}, got {bce!r}")
        if orthogonality not in ORTHOGONALITY_FORMS:
            raise ValueError(f"orthogonality must be one of {ORTHOGONALITY_FORMS}, got {orthogonality!r}")
        self.bce, self.orthogonality = bce, orthogonality
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
            bce = BCE_FORMS[self.bce]
            return sum(bce(z, labels, freq) for z in logits) / NUM_VIEWS

        return {
            "clean": per_view(clean, "accurate", self.accurate_label_frequencies),
            "noisy": per_view(noisy, "inaccurate", self.inaccurate_label_frequencies),
            "pseudo": per_view(clean, "pseudo", self.accurate_label_frequencies),
            "orthogonality": orthogonality_loss(outputs["clean_head_weights_1"], outputs["clean_head_weights_2"],
                                                self.orthogonality),
            "consistency": consistency_loss(clean[0], clean[1]),
        }

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = self.loss_parts(outputs, targets)
        return sum(self.weights[name] * value for name, value in parts.items())
