"""Static (single-image) expression classification: ``ca_resnet`` and the ResNet baselines.

Data: any ``static`` prepared dataset (FER2013 CSV, FER+ majority labels, class-per-folder trees).
Loss: focal loss. ``ca_resnet`` uses the method's two-sided form
(:func:`~fer_core.losses.focal.method_focal_loss`, ``loss_kwargs`` ``gamma``, ``alpha``,
``label_smoothing``, ``reduction``); the ResNet baselines the target-class form (γ = 0 and α off is
cross-entropy). ``loss_kwargs.form`` ("method" | "target") overrides either. Metrics: accuracy (= WAR), UAR,
UF1, per-class recall/F1; report: confusion matrix and per-class precision/recall/F1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from fer_core.data.manifest import read_card, read_manifest
from fer_core.data.preprocess import to_model_input
from fer_core.data.samples import read_image
from fer_core.data.transforms import AugmentConfig
from fer_core.losses.focal import FocalLoss
from fer_core.metrics.classification import classification_metrics, confusion_matrix, per_class_report
from fer_core.models import create_model
from fer_core.training.datasets import ManifestDataset, split_rows
from fer_core.training.recipe import Recipe
from fer_core.training.tasks import TaskSpec, register_task


class SingleLabelClassificationTask:
    """Shared parts of the one-label-per-sample tasks (static, dynamic, micro).

    Subclasses set ``root``, ``manifest``, ``meta`` (the model metadata) and ``label_names`` and
    implement ``_decode``; they may override :meth:`splits`. Metrics: accuracy (= WAR), UAR, UF1,
    per-class recall/F1 over ``outputs["logits"]``; report: confusion matrix and per-class table.
    """

    label_names: tuple[str, ...]

    @staticmethod
    def _targets(row: pd.Series) -> dict[str, Any]:
        return {"label": int(row["label"])}

    def splits(self, recipe: Recipe) -> dict[str, pd.DataFrame]:
        """Rows by split; a manifest without "val" holds out ``data.val_fraction`` of train."""
        return split_rows(self.manifest, recipe.data.get("val_fraction", 0.15), recipe.seed)

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
        x = to_model_input(image, self.meta.input_size, self.meta.in_chans, 0.0, 1.0)
        return np.round(x * 255.0).astype(np.uint8)

    def build_loss(self, recipe: Recipe, model):
        kwargs = dict(recipe.loss_kwargs)
        # ca_resnet's method specifies its own focal form; the ResNet baselines keep the target-class form.
        form = kwargs.get("form", "method" if self.name == "ca_resnet" else "target")
        focal = FocalLoss(gamma=kwargs.get("gamma", 0.0), alpha=kwargs.get("alpha"),
                          label_smoothing=kwargs.get("label_smoothing", 0.0), form=form,
                          reduction=kwargs.get("reduction"))

        def loss(outputs, targets):
            value = focal.to(outputs["logits"].device)(outputs, targets)
            return value, {"focal": value.detach()}

        return loss


def _static_profiles(network: str, paper_kwargs: Mapping[str, Any], quick_kwargs: Mapping[str, Any]) -> dict[str, Recipe]:
    paper = Recipe(
        network=network, profile="paper", model_kwargs=dict(paper_kwargs),
        loss_kwargs={"gamma": 2.0, "label_smoothing": 0.0}, optimizer="adam", lr=1e-3, weight_decay=5e-4,
        scheduler="cosine", epochs=100, batch_size=128, eval_batch_size=256, early_stopping_patience=10,
        monitor="val/loss", monitor_mode="min", num_workers=4,
        augment={"hflip": True, "rotation_deg": 10.0, "crop_area": [0.5, 1.0], "gamma_max": 2.0,
                 "noise_var": 0.001, "erase_prob": 0.5},
    )
    quick = paper.with_overrides({
        "profile": "quick", "model_kwargs": dict(quick_kwargs), "epochs": 12, "batch_size": 64,
        "early_stopping_patience": 4, "num_workers": 0, "max_steps_per_epoch": 40,
        "augment": {"hflip": True, "rotation_deg": 8.0, "crop_area": [0.8, 1.0], "gamma_max": 1.5,
                    "noise_var": 0.001, "erase_prob": 0.25},
    })
    return {"paper": paper, "quick": quick}


for _network, _paper, _quick in (
    ("ca_resnet", {"layers": [2, 2, 2, 2]}, {"layers": [1, 1, 1, 1], "width": 16}),
    ("resnet18", {}, {"width": 16}),
    ("resnet34", {}, {"width": 16}),
):
    register_task(TaskSpec(
        network=_network, data_task="static",
        build=lambda root, recipe, _n=_network: StaticClassificationTask(root, recipe, _n),
        profiles=_static_profiles(_network, _paper, _quick),
    ))
