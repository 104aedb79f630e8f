"""A toy network and task for testing the generic trainer (imported by tests and the DDP script)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fer_core.models import FERModel, ModelMetadata, TensorSpec, register_model
from fer_core.training.recipe import Recipe
from fer_core.training.task import epoch_generator


class ToyNet(FERModel):
    """Two linear layers, no BatchNorm, so DDP must match single-process training closely."""

    def __init__(self, hidden: int = 16, num_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh())
        self.fc = nn.Linear(hidden, num_classes)
        self.metadata = ModelMetadata(
            name="toy_net", task="static", inputs=(TensorSpec("image", (1, 8, 8)),),
            outputs=(TensorSpec("logits", (num_classes,), kind="logits"),), mean=(0.0,), std=(1.0,),
            primary_output="logits",
        )

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, features, pre_logits=False):
        return features if pre_logits else self.fc(features)

    @property
    def num_features(self):
        return self.fc.in_features

    def reset_classifier(self, num_classes):
        self.fc = nn.Linear(self.num_features, num_classes)


@register_model
def toy_net(**kwargs) -> ToyNet:
    return ToyNet(**kwargs)


class BlobDataset(Dataset):
    """Three Gaussian blobs in 64-D, with per-epoch noise augmentation."""

    def __init__(self, n: int, seed: int, augment_seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        centres = torch.randn(3, 64, generator=torch.Generator().manual_seed(123)) * 1.5
        self.x = (centres[self.labels] + torch.randn(n, 64, generator=g)).view(n, 1, 8, 8)
        self.augment_seed, self.epoch = augment_seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        noise = torch.randn(self.x[i].shape, generator=epoch_generator(self.augment_seed, self.epoch, i)) * 0.1
        return self.x[i] + noise, {"label": self.labels[i]}


class ToyTask:
    name = "toy"
    primary_metric = "accuracy"

    def __init__(self, n_train: int = 96, n_val: int = 48) -> None:
        self.n_train, self.n_val = n_train, n_val

    def build_datasets(self, recipe: Recipe) -> Mapping[str, Dataset]:
        return {"train": BlobDataset(self.n_train, 1, recipe.seed), "val": BlobDataset(self.n_val, 2, recipe.seed),
                "test": BlobDataset(self.n_val, 3, recipe.seed)}

    def build_loss(self, recipe, model):
        def loss(outputs, targets):
            ce = F.cross_entropy(outputs["logits"], targets["label"])
            return ce, {"ce": ce.detach()}
        return loss

    def compute_metrics(self, outputs, targets):
        return {"accuracy": float((outputs["logits"].argmax(1) == targets["label"]).float().mean())}


def toy_recipe(**overrides) -> Recipe:
    base = Recipe(network="toy_net", epochs=4, batch_size=16, lr=0.05, optimizer="sgd", scheduler="cosine",
                  monitor="val/accuracy", monitor_mode="max", device="cpu")
    return base.with_overrides(overrides) if overrides else base
