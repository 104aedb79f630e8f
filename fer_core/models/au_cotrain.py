"""Co-trained two-view AU detector learning from accurate, inaccurate and unlabelled labels.

Description followed: two parallel ResNet-34 backbones ("views") see the same face. Each view has a
*clean* head and a *noisy* head, both fully connected layers from the view's pooled features to the
L action units (L = 14, ``labels.AU_NAMES``). The clean head is trained on accurately labelled
images; the noisy head models the label noise of inaccurately labelled images, whose prediction is
``p_noisy = sigmoid(f_clean + f_noisy)`` (element-wise sum of the two heads' logits). The clean heads
of the two views are pushed to be different (orthogonality of their per-AU weight vectors) yet to
agree on every image, labelled or not (an entropy-based consistency term); unlabelled images can
also receive confident pseudo-labels from the clean heads. Between retraining rounds, inaccurate
labels are refined with the noisy predictions of both views. Inference averages the two clean logits.
The losses live in :mod:`fer_core.losses.au_cotrain`.

Ambiguities and the choices made here:

* Views: the two backbones have the same architecture but separate, independently initialised
  weights and see the *same* input image (no per-view augmentation inside the model; a trainer may
  add it). Their diversity comes from the initialisation and from the orthogonality loss.
* Backbone: ``ResNetTrunk([3, 4, 6, 3])`` with the ImageNet stem and 3x224x224 RGB input by default
  (the usual ResNet-34 setting); ``layers``, ``width``, ``stem``, ``img_size``, ``in_chans`` are
  configurable so CPU tests can use tiny networks. Trained from scratch (no weights are downloaded),
  so the normalisation is mean = std = 0.5 like the rest of the zoo rather than ImageNet statistics.
* Heads: one ``nn.Linear`` each on global-average-pooled features (no hidden layer, no dropout).
* Noisy prediction: gradients of the inaccurate-label loss flow into *both* the noisy and the clean
  head (the noisy head is a learned noise-adaptation term on top of the clean logits, as in the
  formula); the clean head is therefore not detached.
* Inference output: ``au_logits`` = mean of the two views' clean logits, ``au_probabilities`` =
  its sigmoid. An AU is active when its probability is >= ``threshold`` (default 0.5, stored in
  ``metadata.extra["threshold"]``); the noisy heads are training-only and not exported.
* ``forward_features`` returns both views' feature maps stacked as (B, 2, C, h, w);
  ``num_features`` is the per-view width C and ``forward_head(..., pre_logits=True)`` returns the
  pooled (B, 2, C) features.
* Pseudo-labels (:func:`pseudo_labels`): from the mean of the two clean probabilities (the same
  prediction as inference); an AU becomes 1 if p >= threshold, 0 if p <= 1 - threshold, and stays
  unknown (-1, masked out of the loss) otherwise, per AU and per image.
* Label refinement (:func:`refine_labels`): ``y~ = gamma * y + (1 - gamma) * (p1 + p2) / 2`` and the
  hard label is ``y~ >= 0.5`` (a tie counts as active, like inference); unknown (-1) labels stay
  unknown.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from fer_core.data.labels import AU_NAMES
from fer_core.models.catalog import FERModel, ModelMetadata, NetworkSpec, TensorSpec, register_model, register_network
from fer_core.training.recipe import Recipe
from fer_core.models.resnet import ResNetTrunk

NUM_VIEWS = 2


class AUCoTrainNet(FERModel):
    """Two ResNet views, each with a clean and a noisy multi-label AU head."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_aus: int = len(AU_NAMES),
        in_chans: int = 3,
        img_size: int = 224,
        width: int = 64,
        stem: str = "imagenet",
        threshold: float = 0.5,
        au_names: Sequence[str] | None = None,
        name: str = "au_cotrain",
    ) -> None:
        super().__init__()
        if num_aus < 1:
            raise ValueError(f"num_aus must be positive, got {num_aus}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        if au_names is None:
            au_names = AU_NAMES if num_aus == len(AU_NAMES) else tuple(f"au_{i}" for i in range(num_aus))
        if len(au_names) != num_aus:
            raise ValueError(f"got {len(au_names)} au_names for num_aus={num_aus}")
        self.trunks = nn.ModuleList(ResNetTrunk(layers, in_chans, width, stem) for _ in range(NUM_VIEWS))
        feat = self.trunks[0].num_features
        self.clean_heads = nn.ModuleList(nn.Linear(feat, num_aus) for _ in range(NUM_VIEWS))
        self.noisy_heads = nn.ModuleList(nn.Linear(feat, num_aus) for _ in range(NUM_VIEWS))
        self.metadata = ModelMetadata(
            name=name, task="au",
            inputs=(TensorSpec("image", (in_chans, img_size, img_size), kind="image"),),
            outputs=self._output_specs(tuple(au_names)),
            mean=(0.5,) * in_chans, std=(0.5,) * in_chans,
            label_names=tuple(au_names), primary_output="au_probabilities",
            extra={"au_names": tuple(au_names), "threshold": float(threshold), "multi_label": True,
                   "num_views": NUM_VIEWS},
        )

    @staticmethod
    def _output_specs(au_names: tuple[str, ...]) -> tuple[TensorSpec, ...]:
        n = len(au_names)
        return (
            TensorSpec("au_logits", (n,), kind="multilabel_logits", labels=au_names,
                       description="mean of the two views' clean-head logits"),
            TensorSpec("au_probabilities", (n,), kind="probabilities", labels=au_names,
                       description="sigmoid(au_logits); an AU is active if >= metadata.extra['threshold']"),
        )

    @property
    def num_features(self) -> int:
        return self.trunks[0].num_features

    @property
    def threshold(self) -> float:
        return float(self.metadata.extra["threshold"])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Both views' last feature maps, stacked as (B, 2, C, h, w)."""
        # Images converted from HWC arrays arrive channels-last; on CPU, torch 2.13's backward of the
        # strided 1x1 shortcut conv segfaults on channels-last tensors, so run in the default layout.
        x = x.contiguous()
        return torch.stack([trunk(x) for trunk in self.trunks], dim=1)

    def _pool(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=(-2, -1))  # (B, 2, C)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False):
        """(au_logits, au_probabilities) from the clean heads, or pooled (B, 2, C) if ``pre_logits``."""
        pooled = self._pool(features)
        if pre_logits:
            return pooled
        logits = torch.stack([head(pooled[:, v]) for v, head in enumerate(self.clean_heads)], 0).mean(0)
        return logits, torch.sigmoid(logits)

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything :class:`fer_core.losses.au_cotrain.AUCoTrainLoss` needs.

        Per view v in {1, 2}: ``clean_logits_v`` and ``noise_logits_v`` (the two heads' raw
        outputs), ``noisy_logits_v`` = clean + noise (pre-sigmoid of p_noisy), ``features_v`` (pooled)
        and ``clean_head_weights_v`` = [w; b] per AU, shape (L, C + 1), for the orthogonality loss.
        Also the inference outputs ``au_logits`` and ``au_probabilities``.
        """
        pooled = self._pool(self.forward_features(x))
        out: dict[str, torch.Tensor] = {}
        clean_all = []
        for v in range(NUM_VIEWS):
            feats = pooled[:, v]
            clean = self.clean_heads[v](feats)
            noise = self.noisy_heads[v](feats)
            head = self.clean_heads[v]
            out[f"features_{v + 1}"] = feats
            out[f"clean_logits_{v + 1}"] = clean
            out[f"noise_logits_{v + 1}"] = noise
            out[f"noisy_logits_{v + 1}"] = clean + noise
            out[f"clean_head_weights_{v + 1}"] = torch.cat([head.weight, head.bias[:, None]], dim=1)
            clean_all.append(clean)
        out["au_logits"] = torch.stack(clean_all, 0).mean(0)
        out["au_probabilities"] = torch.sigmoid(out["au_logits"])
        return out

    def reset_classifier(self, num_classes: int, au_names: Sequence[str] | None = None) -> None:
        """New clean and noisy heads for ``num_classes`` AUs (all four heads are re-initialised)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if au_names is None:
            old = self.metadata.label_names
            au_names = old if len(old) == num_classes else tuple(f"au_{i}" for i in range(num_classes))
        if len(au_names) != num_classes:
            raise ValueError(f"got {len(au_names)} au_names for {num_classes} classes")
        au_names = tuple(au_names)
        feat = self.num_features
        self.clean_heads = nn.ModuleList(nn.Linear(feat, num_classes) for _ in range(NUM_VIEWS))
        self.noisy_heads = nn.ModuleList(nn.Linear(feat, num_classes) for _ in range(NUM_VIEWS))
        self.metadata = dataclasses.replace(
            self.metadata, outputs=self._output_specs(au_names), label_names=au_names,
            extra={**self.metadata.extra, "au_names": au_names},
        )


@torch.no_grad()
def _clean_and_noisy_probabilities(
    model: AUCoTrainNet, images: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eval-mode (mean clean p, view-1 noisy p, view-2 noisy p) over ``images`` in chunks."""
    if images.ndim != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()  # BatchNorm running statistics, not the statistics of this chunk
    try:
        parts = [model.forward_train(chunk) for chunk in images.split(batch_size)]
    finally:
        model.train(was_training)
    clean = torch.cat([p["au_probabilities"] for p in parts])
    noisy = [torch.cat([torch.sigmoid(p[f"noisy_logits_{v}"]) for p in parts]) for v in (1, 2)]
    return clean, noisy[0], noisy[1]


def pseudo_labels(
    model: AUCoTrainNet, images: torch.Tensor, threshold: float = 0.9, batch_size: int = 256
) -> torch.Tensor:
    """Confident AU pseudo-labels for unlabelled ``images`` (N, C, H, W) from the clean heads.

    Per image and AU, with p the mean of the two views' clean probabilities: 1 if p >= threshold,
    0 if p <= 1 - threshold, else -1 (unknown, masked out of the loss). Returns int64 (N, L).
    """
    if not 0.5 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0.5, 1], got {threshold}")
    p, _, _ = _clean_and_noisy_probabilities(model, images, batch_size)
    labels = torch.full(p.shape, -1, dtype=torch.int64)
    labels[p <= 1.0 - threshold] = 0
    labels[p >= threshold] = 1  # last, so that at threshold 0.5 a tie counts as active, like inference
    return labels


def noisy_probabilities(
    model: AUCoTrainNet, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view's p_noisy = sigmoid(f_clean + f_noisy) for ``images`` (the input of :func:`refine_labels`)."""
    _, p1, p2 = _clean_and_noisy_probabilities(model, images, batch_size)
    return p1, p2


def refine_labels(
    y_noisy: torch.Tensor, p1_noisy: torch.Tensor, p2_noisy: torch.Tensor, gamma: float = 0.5
) -> torch.Tensor:
    """Refined hard labels ``[gamma * y + (1 - gamma) * (p1 + p2) / 2 >= 0.5]`` for the next round.

    ``y_noisy`` holds 0/1 inaccurate labels (-1 = unknown, kept unknown); ``p1_noisy``/``p2_noisy``
    are the two views' noisy-head probabilities. Returns labels with ``y_noisy``'s dtype and shape.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if not (y_noisy.shape == p1_noisy.shape == p2_noisy.shape):
        raise ValueError(
            f"shapes differ: y {tuple(y_noisy.shape)}, p1 {tuple(p1_noisy.shape)}, p2 {tuple(p2_noisy.shape)}"
        )
    known = y_noisy >= 0
    soft = gamma * y_noisy.float() + (1.0 - gamma) * (p1_noisy.float() + p2_noisy.float()) / 2
    hard = (soft >= 0.5).to(y_noisy.dtype)
    return torch.where(known, hard, y_noisy)


@register_model
def au_cotrain(**kwargs) -> AUCoTrainNet:
    """Two-view ResNet-34 AU co-training network (3x224x224 input, 14 AUs by default)."""
    return AUCoTrainNet(**kwargs)


# ---------------------------------------------------------------------------------------------
# Network spec: task, profiles, default data
# ---------------------------------------------------------------------------------------------


def _profiles() -> dict[str, Recipe]:
    # The method: faces cropped on landmarks (here: Haar + eye alignment, ``data.align_faces``; the
    # method's 5-point crop needs a landmark detector the platform does not ship), random 224 crop of
    # the 256 crop (a square crop keeping (224/256)^2 of the area, resized to the input), horizontal
    # flip, random greyscale (p = 0.1, torchvision's RandomGrayscale default: the method gives none);
    # per-AU alpha^k on the whole BCE term and the signed-cosine orthogonality (the loss defaults).
    paper = Recipe(
        network="au_cotrain", profile="paper",
        model_kwargs={},  # the model defaults: two ResNet-34 views, 3x224x224, 14 AUs
        loss_kwargs={"semi_supervised": True, "pseudo_threshold": 0.9, "label_frequencies": "train",
                     "bce": "au_weighted", "orthogonality": "signed"},
        data={"val_fraction": 0.1, "align_faces": True},
        optimizer="adam", lr=1e-4, weight_decay=1e-4, scheduler="cosine", epochs=30, batch_size=64,
        eval_batch_size=128, early_stopping_patience=5, monitor="val/mean_f1", monitor_mode="max", num_workers=4,
        augment={"hflip": True, "rotation_deg": 0.0, "crop_area": [(224 / 256) ** 2, (224 / 256) ** 2],
                 "crop_ratio": [1.0, 1.0], "gamma_max": 1.0, "noise_var": 0.0, "erase_prob": 0.0,
                 "greyscale_prob": 0.1},
    )
    # quick: generated 40 px faces, CPU minutes. The class-balanced pos_weight BCE and |cos|: on short
    # runs the method's alpha^k form re-weights AUs against each other but not positives against
    # negatives within an AU, and rare AUs drift to "absent" (bench/fidelity.py: val mean F1 0.298
    # pos_weight + |cos| vs 0.100 the method's form, 3 epochs). Both forms stay selectable.
    quick = paper.with_overrides({
        "profile": "quick",
        "model_kwargs": {"layers": [1, 1, 1, 1], "width": 8, "img_size": 40, "stem": "small"},
        "loss_kwargs": {"semi_supervised": True, "pseudo_threshold": 0.9, "label_frequencies": "train",
                        "bce": "pos_weight", "orthogonality": "abs"},
        "data": {"val_fraction": 0.15, "align_faces": False}, "lr": 3e-3, "weight_decay": 0.0, "epochs": 15, "batch_size": 32,
        "eval_batch_size": 64, "early_stopping_patience": 4, "num_workers": 0, "max_steps_per_epoch": 30,
        "augment": {"hflip": True, "rotation_deg": 0.0, "crop_area": [0.9, 1.0], "gamma_max": 1.2,
                    "noise_var": 0.0, "erase_prob": 0.0},
    })
    return {"paper": paper, "quick": quick}


register_network(NetworkSpec(
    name="au_cotrain", factory=au_cotrain, task="au", model_class=AUCoTrainNet,
    profiles=_profiles, data_format="au_table", dataset="au-cotrain", primary_metric="mean_f1", demo_size=800,
    description="two-view ResNet co-training for 14 facial action units from clean + noisy labels",
    reference="AU recognition by co-training on inaccurate labels",
))
