"""C3D trained with EC-STFL for dynamic (video) FER in the wild (Jiang et al., DFEW, 2020).

Backbone: C3D (Tran et al., 2015) — eight 3x3x3 convolutions (64, 128, 256, 256, 512, 512, 512, 512
channels) with five max-pools (the first 1x2x2 so early layers keep the temporal resolution, the rest
2x2x2), then FC 4096 → 4096 → classes with ReLU and dropout 0.5. Input: a fixed-length clip of 16 RGB
frames of 112x112, given as "frames" (T, C, H, W) and permuted inside to C3D's (C, T, H, W). The loss is
CE + λ·EC-STFL on the penultimate FC features (:mod:`fer_core.losses.ecstfl`); ``forward_train``
returns ``{"logits", "features"}`` for it. Seven classes in ``labels.EXPRESSIONS`` order (loaders map
DFEW's 1-based ids into it).

Where the description was ambiguous, and what this module does:

* Pool 5: the original Caffe C3D rounds pooled sizes up (7 → 4 at 112x112), giving 512·1·4·4 = 8192
  inputs to fc6; here every pool uses ``ceil_mode=True``, which reproduces that (PyTorch ports often
  pad pool 5 by (0, 1, 1) instead; the two agree at 112x112).
* Small test inputs: a pool never shrinks an axis that is already 1 (its kernel along that axis becomes 1),
  so e.g. 8 frames x 32x32 still runs. The default 16x112x112 is untouched by this rule.
* "Penultimate FC features" are fc7's ReLU output *before* fc7's dropout (distances between randomly
  dropped features would be noise); they are what ``forward_head(pre_logits=True)`` returns, and
  ``num_features`` is their width (``fc_width``), the input width of the classifier.
* No batch norm (C3D has none). Kaiming-normal (fan_in) init for convs and fc6/fc7 — fan_out shrank
  the activations ~15x over the eight convs of a narrow net and stalled training — N(0, 0.01) for the
  classifier (C3D-style small last layer), zero biases.
* Normalisation in the metadata is mean 0.5 / std 0.5 per channel on [0, 1] frames (the Sports-1M mean
  clip of the original release is not available here).
* ``width`` scales every conv (64 in the paper) and ``fc_width`` the FCs (4096) for CPU tests.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fer_core.data.labels import EXPRESSIONS
from fer_core.models.catalog import FERModel, ModelMetadata, NetworkSpec, TensorSpec, register_model, register_network
from fer_core.losses.ecstfl import DEFAULT_LAMBDA
from fer_core.training.recipe import Recipe

# (output-channel multiplier of ``width``, convs at that width) per pooled block, as in C3D.
C3D_BLOCKS: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (4, 2), (8, 2), (8, 2))


def _pool_kernel(size: int, wanted: int) -> int:
    """The pool kernel along one axis: ``wanted`` unless the axis is already too short to shrink."""
    return wanted if size >= wanted else 1


class C3DBackbone(nn.Module):
    """Eight 3-D convs and five max-pools; returns the pool-5 map (B, C, t, h, w)."""

    def __init__(self, in_chans: int = 3, width: int = 64, num_frames: int = 16, img_size: int = 112) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_chans, [num_frames, img_size, img_size]
        for block, (multiplier, convs) in enumerate(C3D_BLOCKS):
            for _ in range(convs):
                layers += [nn.Conv3d(channels, width * multiplier, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width * multiplier
            wanted = (1, 2, 2) if block == 0 else (2, 2, 2)
            kernel = tuple(_pool_kernel(s, w) for s, w in zip(size, wanted))
            layers.append(nn.MaxPool3d(kernel, kernel, ceil_mode=True))
            size = [-(-s // k) for s, k in zip(size, kernel)]  # ceil division, as ceil_mode does
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels
        self.out_size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class C3DECSTFL(FERModel):
    """C3D classifier whose fc7 features are exposed for the EC-STFL loss."""

    def __init__(
        self,
        num_classes: int = len(EXPRESSIONS),
        in_chans: int = 3,
        num_frames: int = 16,
        img_size: int = 112,
        width: int = 64,
        fc_width: int = 4096,
        drop_rate: float = 0.5,
        name: str = "c3d_ecstfl",
    ) -> None:
        super().__init__()
        if min(num_classes, in_chans, num_frames, img_size, width, fc_width) < 1:
            raise ValueError("num_classes, in_chans, num_frames, img_size, width and fc_width must be positive")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.backbone = C3DBackbone(in_chans, width, num_frames, img_size)
        t, h, w = self.backbone.out_size
        self.fc6 = nn.Linear(self.backbone.out_channels * t * h * w, fc_width)
        self.fc7 = nn.Linear(fc_width, fc_width)
        self.fc8 = nn.Linear(fc_width, num_classes)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(drop_rate)
        self._init_weights()
        names = _label_names(num_classes)
        self.metadata = ModelMetadata(
            name=name, task="dynamic",
            inputs=(TensorSpec("frames", (num_frames, in_chans, img_size, img_size), kind="video",
                               description="fixed-length RGB clip in [0, 1], then (x - mean) / std per channel"),),
            outputs=(TensorSpec("logits", (num_classes,), kind="logits", labels=names),),
            mean=(0.5,) * in_chans, std=(0.5,) * in_chans,
            label_names=names, primary_output="logits",
            extra={"num_frames": num_frames, "feature_key": "features", "feature_dim": fc_width,
                   "loss": "cross_entropy + lambda * ec_stfl"},
        )

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                # fan_in keeps the activation scale through eight convs that have no batch norm
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(fc.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(fc.bias)
        self._init_classifier()

    def _init_classifier(self) -> None:
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    @property
    def num_features(self) -> int:
        return self.fc7.out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (B, T, C, H, W) → pool-5 map (B, C', t, h, w)."""
        return self.backbone(x.permute(0, 2, 1, 3, 4))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        hidden = self.dropout(self.act(self.fc6(features.flatten(1))))
        penultimate = self.act(self.fc7(hidden))
        return penultimate if pre_logits else self.fc8(self.dropout(penultimate))

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"logits": (B, classes), "features": (B, fc_width)}``; the features feed EC-STFL."""
        penultimate = self.forward_head(self.forward_features(x), pre_logits=True)
        return {"logits": self.fc8(self.dropout(penultimate)), "features": penultimate}

    def reset_classifier(self, num_classes: int) -> None:
        """Replace fc8 with a freshly initialised one for ``num_classes`` classes."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        old = self.fc8.weight
        self.fc8 = nn.Linear(self.num_features, num_classes).to(device=old.device, dtype=old.dtype)
        self._init_classifier()
        names = _label_names(num_classes)
        logits = dataclasses.replace(self.metadata.outputs[0], shape=(num_classes,), labels=names)
        self.metadata = dataclasses.replace(self.metadata, outputs=(logits,), label_names=names)


def _label_names(num_classes: int) -> tuple[str, ...]:
    return EXPRESSIONS if num_classes == len(EXPRESSIONS) else tuple(f"class_{i}" for i in range(num_classes))


@register_model
def c3d_ecstfl(**kwargs) -> C3DECSTFL:
    """C3D for 16x112x112 RGB clips, trained with CE + λ·EC-STFL (:class:`fer_core.losses.ecstfl.EcStflLoss`)."""
    return C3DECSTFL(**kwargs)


# ---------------------------------------------------------------------------------------------
# Network spec: task, profiles, default data
# ---------------------------------------------------------------------------------------------


def _profiles() -> dict[str, Recipe]:
    paper = Recipe(
        network="c3d_ecstfl", profile="paper",
        model_kwargs={},  # C3D as published: 16 x 112 x 112 RGB, widths 64..512, fc 4096, dropout 0.5
        loss_kwargs={"lambda_weight": DEFAULT_LAMBDA, "reduction": "sum"},
        # Raw videos are face-aligned, DFEW's clip crops stay as they are ("auto"); fixed length by key
        # frames of longer clips plus time interpolation of shorter ones, as the method says.
        data={"val_fraction": 0.1, "align_faces": "auto", "resample": "keyframes+interpolate"},
        # C3D's recipe (Tran et al. 2015): SGD, lr 0.003 divided by 10 every 4 epochs, 16 epochs,
        # mini-batches of ~30 clips; random crops (C3D: 112 of 128x171, ~57 % of the area) and flips.
        optimizer="sgd", lr=0.003, momentum=0.9, weight_decay=5e-4, scheduler="step", step_size=4, gamma=0.1,
        epochs=16, batch_size=32, eval_batch_size=32, early_stopping_patience=0, monitor="val/loss",
        monitor_mode="min", num_workers=4,
        augment={"hflip": True, "rotation_deg": 0.0, "crop_area": [0.6, 1.0], "gamma_max": 1.0,
                 "noise_var": 0.0, "erase_prob": 0.0},
    )
    quick = paper.with_overrides({
        "profile": "quick",
        # Narrow C3D on 8 frames of 32x32; dropout off because a 128-wide FC has little to spare.
        "model_kwargs": {"num_frames": 8, "img_size": 32, "width": 8, "fc_width": 128, "drop_rate": 0.0},
        "data": {"val_fraction": 0.15, "align_faces": "auto", "resample": "keyframes+interpolate"},
        "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "scheduler": "cosine",
        # C3D sits on a plateau for ~100 steps before it starts to learn: enough epochs, patient stopping.
        "epochs": 15, "batch_size": 28, "eval_batch_size": 64, "early_stopping_patience": 6, "num_workers": 0,
        "max_steps_per_epoch": 40,
        "augment": {"hflip": True, "rotation_deg": 0.0, "crop_area": [0.85, 1.0], "gamma_max": 1.2,
                    "noise_var": 0.0, "erase_prob": 0.0},
    })
    return {"paper": paper, "quick": quick}


register_network(NetworkSpec(
    name="c3d_ecstfl", factory=c3d_ecstfl, task="dynamic", model_class=C3DECSTFL,
    profiles=_profiles, data_format="dfew", dataset="dfew", primary_metric="uar", demo_size=560,
    description="C3D on 16-frame clips with the expression-clustered spatio-temporal feature loss",
    reference="DFEW baseline: C3D + EC-STFL (Jiang et al. 2020)",
))
