"""ResNet-18/34 (He et al., 2016), written from scratch (no torchvision).

Used as a backbone by ``micro_lsh`` (ResNet-18 per frame) and ``au_cotrain`` (two ResNet-34 views),
and registered on its own as plain static-FER baselines ``resnet18`` / ``resnet34``.

Choices: ``stem="imagenet"`` is the 7x7/2 conv + 3x3/2 max-pool of the paper; ``stem="small"`` is a
3x3/1 conv without pooling, the usual adaptation for 48x48 or 64x64 faces. ``width`` scales every
stage (64 in the paper) so CPU tests can use narrow networks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fer_core.data.labels import EXPRESSIONS
from fer_core.models.catalog import FERModel, ModelMetadata, NetworkSpec, TensorSpec, register_model, register_network
from fer_core.training.recipe import Recipe


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.downsample(x))


class ResNetTrunk(nn.Module):
    """Stem + four stages of basic blocks; returns the last feature map (B, C, h, w)."""

    def __init__(
        self, layers: Sequence[int], in_chans: int = 3, width: int = 64, stem: str = "imagenet"
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {list(layers)}")
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
            )
        elif stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        stages, in_planes = [], width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stage = [BasicBlock(in_planes, planes, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.num_features = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last inputs (a numpy HWC batch permuted to NCHW) make the backward pass of the
        # strided 1x1 shortcut conv segfault on CPU in torch 2.13; a contiguous copy avoids it.
        return self.stages(self.stem(x.contiguous()))


class ResNet(FERModel):
    """A ResNet classifier over expression classes."""

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = len(EXPRESSIONS),
        in_chans: int = 1,
        img_size: int = 48,
        width: int = 64,
        stem: str = "small",
        label_names: Sequence[str] = EXPRESSIONS,
        name: str = "resnet",
    ) -> None:
        super().__init__()
        if len(label_names) != num_classes:
            label_names = tuple(f"class_{i}" for i in range(num_classes))
        self.trunk = ResNetTrunk(layers, in_chans, width, stem)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.trunk.num_features, num_classes)
        self.metadata = ModelMetadata(
            name=name, task="static",
            inputs=(TensorSpec("image", (in_chans, img_size, img_size), kind="image"),),
            outputs=(TensorSpec("logits", (num_classes,), kind="logits", labels=tuple(label_names)),),
            mean=(0.5,) * in_chans, std=(0.5,) * in_chans,
            label_names=tuple(label_names), primary_output="logits",
        )

    @property
    def num_features(self) -> int:
        return self.trunk.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.pool(features).flatten(1)
        return pooled if pre_logits else self.fc(pooled)

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 static-FER baseline (1x48x48 input by default)."""
    return ResNet([2, 2, 2, 2], name="resnet18", **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34 static-FER baseline (1x48x48 input by default)."""
    return ResNet([3, 4, 6, 3], name="resnet34", **kwargs)


# ---------------------------------------------------------------------------------------------
# Network specs: the baselines train with CA-ResNet's static profiles (same data, loss, schedule)
# ---------------------------------------------------------------------------------------------


def _baseline(name: str, factory) -> NetworkSpec:
    from fer_core.models.ca_resnet import static_profiles

    return NetworkSpec(
        name=name, factory=factory, task="static", model_class=ResNet, fixed_kwargs=("layers", "name"),
        profiles=lambda: static_profiles(name, {}, {"width": 16}),
        data_format="fer2013", dataset="fer2013", primary_metric="accuracy", demo_size=1400,
        description=f"plain {name.upper()} static-FER baseline", reference="He et al. 2016", default=False,
    )


register_network(_baseline("resnet18", resnet18))
register_network(_baseline("resnet34", resnet34))
