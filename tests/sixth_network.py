"""A sixth network in one file: model, factory and spec. Nothing else in the repository names it,
yet once it is imported it shows up in ``fer train --list``, the pipeline's networks and sources,
trains through its task and exports to ONNX. ``tests/test_sixth_network.py`` is its test.

Subprocesses find it through ``FER_NETWORK_MODULES=sixth_network``; a plugin package would name it in
the ``fer_core.networks`` entry points instead. It is not a ``test_*`` module, so pytest's collection
does not import it: it is registered only while its own tests run.
"""

from __future__ import annotations

import torch
from torch import nn

from fer_core.data.labels import EXPRESSIONS
from fer_core.models.catalog import FERModel, ModelMetadata, NetworkSpec, TensorSpec, register_network
from fer_core.training.recipe import Recipe

NAME = "tiny_fer6"


class TinyFER(FERModel):
    """Two convolutions and a linear head over 1x24x24 faces."""

    def __init__(self, num_classes: int = len(EXPRESSIONS), width: int = 8, img_size: int = 24,
                 label_names: tuple[str, ...] = EXPRESSIONS) -> None:
        super().__init__()
        if len(label_names) != num_classes:
            label_names = tuple(f"class_{i}" for i in range(num_classes))
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, stride=2),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)
        self.width = width
        self.metadata = ModelMetadata(
            name=NAME, task="static", inputs=(TensorSpec("image", (1, img_size, img_size)),),
            outputs=(TensorSpec("logits", (num_classes,), kind="logits", labels=tuple(label_names)),),
            mean=(0.5,), std=(0.5,), label_names=tuple(label_names), primary_output="logits")

    @property
    def num_features(self) -> int:
        return self.width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.fc(features)

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.width, num_classes)


def tiny_fer6(**kwargs) -> TinyFER:
    return TinyFER(**kwargs)


def _profiles() -> dict[str, Recipe]:
    paper = Recipe(network=NAME, profile="paper", loss_kwargs={"gamma": 2.0}, epochs=20, batch_size=64)
    return {"paper": paper, "quick": paper.with_overrides({"profile": "quick", "epochs": 2, "max_steps_per_epoch": 5})}


SPEC = register_network(NetworkSpec(
    name=NAME, factory=tiny_fer6, task="static", model_class=TinyFER, profiles=_profiles,
    data_format="fer2013", dataset="fer2013-tiny", primary_metric="accuracy", demo_size=200,
    description="a toy sixth network (test only)", default=False,
))
