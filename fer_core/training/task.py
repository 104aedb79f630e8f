"""The task interface: what the trainer needs to know about one network's problem.

A task turns a prepared dataset (manifest + files) into datasets, builds the network's loss and
computes its metrics. The trainer is generic over tasks; each network has one task
(``fer_core.training.tasks``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import torch
from torch.utils.data import Dataset

from fer_core.models import FERModel
from fer_core.training.recipe import Recipe

Outputs = dict[str, torch.Tensor]
Targets = dict[str, torch.Tensor]
LossFn = Callable[[Outputs, Targets], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Task(Protocol):
    """One network's data, loss and metrics."""

    name: str
    primary_metric: str  # e.g. "accuracy", "uar", "mean_f1" (higher is better)

    def build_datasets(self, recipe: Recipe) -> Mapping[str, Dataset]:
        """Datasets by split ("train", "val", optional "test"); items are ``(input, targets)``."""

    def build_loss(self, recipe: Recipe, model: FERModel) -> LossFn:
        """Loss over a batch: returns the total and its named parts (detached or not)."""

    def compute_metrics(self, outputs: Outputs, targets: Targets) -> dict[str, float]:
        """Metrics over a whole split from concatenated ``forward_train`` outputs and targets."""

    # Optional: ``model_overrides() -> dict`` of model kwargs the data decides (e.g. num_classes);
    # the trainer folds them into the effective recipe.
    # Optional: ``report(outputs, targets) -> dict`` with JSON-safe detail for artifacts, e.g.
    # {"confusion_matrix": [[...]], "labels": [...], "per_class": {...}}; the trainer calls it on the
    # final split when the task defines it.


def epoch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The RNG for one sample's augmentation in one epoch.

    Seeding per (seed, epoch, index) makes augmentation independent of worker count, DDP rank and
    of where a resumed run restarts, so a resumed run replays exactly what the original would have.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)
