"""Static (single-image) expression classification: ``ca_resnet`` and the ResNet baselines.

Data: any ``static`` prepared dataset (FER2013 CSV, FER+ majority labels, class-per-folder trees).
Loss: focal loss. ``ca_resnet`` uses the method's two-sided form
(:func:`~fer_core.losses.focal.method_focal_loss`, ``loss_kwargs`` ``gamma``, ``alpha``,
``label_smoothing``, ``reduction``); the ResNet baselines the target-class form (γ = 0 and α off is
cross-entropy). ``loss_kwargs.form`` ("method" | "target") overrides either. Metrics: accuracy (= WAR), UAR,
UF1, per-class recall/F1; report: confusion matrix and per-class precision/recall/F1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from fer_core.data.manifest import read_card, read_manifest
from fer_core.data.pipeline import InputPipeline, prepare_pixels
from fer_core.data.samples import read_image
from fer_core.data.transforms import AugmentConfig
from fer_core.losses.focal import FocalLoss
from fer_core.metrics.classification import classification_metrics, confusion_matrix, per_class_report
from fer_core.models import create_model
from fer_core.training.datasets import ManifestDataset, split_rows
from fer_core.training.recipe import Recipe
from fer_core.training.tasks import TaskKind, register_task_kind


@dataclass(frozen=True)
class SplitOptions:
    """``data.*`` of the static and multitask kinds."""

    val_fraction: float = 0.15  # held out of train when the manifest has no "val" split


@dataclass(frozen=True)
class FocalOptions:
    """``loss_kwargs.*`` of the static kind: :class:`~fer_core.losses.focal.FocalLoss` (γ = 0, α off = CE)."""

    gamma: float = 0.0
    alpha: float | Sequence[float] | None = None
    label_smoothing: float = 0.0
    form: str | None = None  # "method" | "target"; None = the network's own (method for ca_resnet)
    reduction: str | None = None  # None = the form's default (method: sum, target: mean)


class SingleLabelClassificationTask:
    """Shared parts of the one-label-per-sample tasks (static, dynamic, micro).

    Subclasses set ``root``, ``manifest``, ``meta`` (the model metadata) and ``label_names`` and
    implement ``_decode``; they may override :meth:`splits`. Metrics: accuracy (= WAR), UAR, UF1,
    per-class recall/F1 over ``outputs["logits"]``; report: confusion matrix and per-class table.
    """

    label_names: tuple[str, ...]
    data_options: type = SplitOptions  # the kind's ``data.*`` dataclass (it has ``val_fraction``)

    @staticmethod
    def _targets(row: pd.Series) -> dict[str, Any]:
        return {"label": int(row["label"])}

    def splits(self, recipe: Recipe) -> dict[str, pd.DataFrame]:
        """Rows by split; a manifest without "val" holds out ``data.val_fraction`` of train."""
        return split_rows(self.manifest, self.data_options(**recipe.data).val_fraction, recipe.seed)

    def build_datasets(self, recipe: Recipe) -> dict[str, ManifestDataset]:
        aug = AugmentConfig.from_mapping(recipe.augment) if recipe.augment else None  # {} = off
        return {
            split: ManifestDataset(self.root, rows, self._decode, self._targets, self.meta.mean, self.meta.std,
                                   augment_cfg=aug if split == "train" else None, seed=recipe.seed)
            for split, rows in self.splits(recipe).items()
        }

    def compute_metrics(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, float]:
        pred = outputs["logits"].argmax(1).numpy()
        return classification_metrics(targets["label"].numpy(), pred, len(self.label_names), self.label_names)

    def report(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        cm = confusion_matrix(targets["label"].numpy(), outputs["logits"].argmax(1).numpy(), len(self.label_names))
        rep = per_class_report(cm)
        return {
            "labels": list(self.label_names), "confusion_matrix": cm.tolist(),
            "per_class": {name: {k: float(rep[k][i]) for k in ("precision", "recall", "f1", "support")}
                          for i, name in enumerate(self.label_names)},
        }


class StaticClassificationTask(SingleLabelClassificationTask):
    """Images with one expression label each."""

    primary_metric = "accuracy"

    def __init__(self, root: Path, recipe: Recipe, name: str) -> None:
        self.name, self.root, self.recipe = name, Path(root), recipe
        card = read_card(root)
        self.label_names = tuple(card.classes)
        manifest = read_manifest(root)
        self.manifest = manifest[manifest["label"] >= 0]
        # The model's input spec decides size, channels and normalisation (serving uses the same).
        probe = create_model(recipe.network, **{**recipe.model_kwargs, **self.model_overrides()})
        self.meta = probe.metadata

    def model_overrides(self) -> dict[str, Any]:
        return {"num_classes": len(self.label_names)}

    def _decode(self, root: Path, row: pd.Series) -> np.ndarray:
        image = read_image(root, row["path"])
        # The package's input-pipeline spec is the one source of this decode (serving interprets it too).
        return prepare_pixels([image], self.input_pipeline()).pixels

    def input_pipeline(self) -> InputPipeline:
        """The input-pipeline spec this task decodes with (the model package records it)."""
        return InputPipeline.for_model(self.meta, self.recipe.data)

    def build_loss(self, recipe: Recipe, model):
        options = FocalOptions(**recipe.loss_kwargs)
        # ca_resnet's method specifies its own focal form; the ResNet baselines keep the target-class form.
        form = options.form or ("method" if self.name == "ca_resnet" else "target")
        focal = FocalLoss(**{**asdict(options), "form": form})

        def loss(outputs, targets):
            value = focal.to(outputs["logits"].device)(outputs, targets)
            return value, {"focal": value.detach()}

        return loss


register_task_kind(TaskKind(
    name="static", data_task="static", build=StaticClassificationTask,
    data_options=SplitOptions, loss_options=FocalOptions, augment_options=AugmentConfig,
))
