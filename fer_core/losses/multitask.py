"""Loss of the joint landmarks / expression / valence-arousal network (``multitask_fer``).

total = w_expr * CE(logits, expression)
      + w_va   * (1 - mean CCC(valence_arousal))   (``va_loss="ccc"``, default)  or  MSE (``"mse"``)
      + w_hm   * heatmap MSE, averaged over every hourglass stack (intermediate supervision, as FAN)

The heatmap term sums the squared error over each map's cells and averages over faces, landmarks
and stacks, so its scale does not depend on the heatmap resolution (an all-zero prediction scores
about pi * sigma^2). Targets are a dict; any task whose key is missing is skipped, expression
labels of -1 are ignored, and faces whose valence/arousal or landmarks hold NaN are left out of
that term (datasets rarely label all three tasks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fer_core.metrics.affect import concordance_correlation
from fer_core.metrics.landmarks import render_heatmaps

VA_LOSSES = ("ccc", "mse")


class MultitaskLoss(nn.Module):
    """Weighted sum of the expression, valence/arousal and heatmap terms.

    Target keys: ``expression`` (B,) int64, ``valence_arousal`` (B, 2) float, and either
    ``landmarks`` (B, K, 2) input pixels (rendered to Gaussian heatmaps here) or ``heatmaps``.
    """

    def __init__(
        self,
        expression_weight: float = 1.0,
        va_weight: float = 1.0,
        heatmap_weight: float = 1.0,
        va_loss: str = "ccc",
        heatmap_stride: float = 4.0,
        heatmap_sigma: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if va_loss not in VA_LOSSES:
            raise ValueError(f"va_loss must be one of {VA_LOSSES}, got {va_loss!r}")
        if min(expression_weight, va_weight, heatmap_weight) < 0:
            raise ValueError("loss weights must be non-negative")
        self.weights = {"expression": expression_weight, "valence_arousal": va_weight, "heatmaps": heatmap_weight}
        self.va_loss = va_loss
        self.heatmap_stride = heatmap_stride
        self.heatmap_sigma = heatmap_sigma
        self.label_smoothing = label_smoothing

    @classmethod
    def for_model(cls, model: Any, **kwargs: Any) -> "MultitaskLoss":
        """A loss whose heatmap geometry (stride, sigma) matches ``model.metadata.extra``."""
        extra = model.metadata.extra
        kwargs.setdefault("heatmap_stride", extra["heatmap_stride"])
        kwargs.setdefault("heatmap_sigma", extra["heatmap_sigma"])
        return cls(**kwargs)

    def parts(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unweighted terms present in ``targets`` (keys as in ``self.weights``)."""
        parts: dict[str, torch.Tensor] = {}
        if "expression" in targets:
            parts["expression"] = F.cross_entropy(
                outputs["logits"], targets["expression"].long(), ignore_index=-1,
                label_smoothing=self.label_smoothing,
            )
        if "valence_arousal" in targets:
            parts["valence_arousal"] = self._va_term(outputs["valence_arousal"], targets["valence_arousal"])
        if "heatmaps" in targets or "landmarks" in targets:
            parts["heatmaps"] = self._heatmap_term(outputs, targets)
        if not parts:
            raise ValueError(f"targets hold none of expression / valence_arousal / landmarks / heatmaps: {sorted(targets)}")
        return parts

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = self.parts(outputs, targets)
        return sum(self.weights[name] * value for name, value in parts.items())

    def _va_term(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = torch.isfinite(target).all(dim=1)
        pred, target = pred[valid], target[valid].to(pred.dtype)
        if self.va_loss == "mse":
            return F.mse_loss(pred, target) if len(target) else pred.sum() * 0.0
        # CCC is a batch statistic; with fewer than two labelled faces it is undefined, contribute 0.
        if len(target) < 2:
            return pred.sum() * 0.0
        return 1.0 - concordance_correlation(pred, target).mean()

    def _heatmap_term(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        # (B, S, K, h, w): every stack is supervised; a model without stacks gives (B, K, h, w).
        pred = outputs["stack_heatmaps"] if "stack_heatmaps" in outputs else outputs["heatmaps"].unsqueeze(1)
        if "heatmaps" in targets:
            target = targets["heatmaps"].to(pred.dtype)
            valid = torch.isfinite(target).flatten(1).all(dim=1)
        else:
            landmarks = targets["landmarks"]
            valid = torch.isfinite(landmarks).flatten(1).all(dim=1)
            target = render_heatmaps(
                torch.nan_to_num(landmarks), pred.shape[-2:], self.heatmap_stride, self.heatmap_sigma
            ).to(pred.dtype)
        if target.shape != pred.shape[:1] + pred.shape[2:]:
            raise ValueError(f"heatmap target {tuple(target.shape)} does not match prediction {tuple(pred.shape)}")
        if not valid.any():
            return pred.sum() * 0.0
        squared = (pred[valid] - target[valid].unsqueeze(1)) ** 2
        return squared.sum(dim=(-2, -1)).mean()
