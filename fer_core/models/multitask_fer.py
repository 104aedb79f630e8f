"""Multi-task FER: facial landmarks, expression class and valence/arousal from one network.

Description followed (no single paper; the platform's design brief):

* Feature extractor: stacked hourglass networks of order 4 built from FAN's ``ConvBlock``
  (Bulat & Tzimiropoulos, "How far are we from solving the 2D & 3D face alignment problem?", 2017):
  three BN-ReLU-conv3x3 branches of C/2, C/4, C/4 channels, chained and concatenated, plus a residual.
  Each stack predicts one heatmap per landmark (68, iBUG scheme); heatmap targets are Gaussians of
  radius sigma around each landmark, and every stack is supervised (FAN's intermediate supervision).
  The heatmaps are the keypoint feature.
* A 3-level feature pyramid (FPN) on the heatmap keypoint features: a bottom-up path of
  down-samplings, and on each level's *lateral link* into the top-down path one transformer encoder
  (pre-norm: LayerNorm -> multi-head self-attention with Q/K/V projections and scaled dot-product ->
  residual -> LayerNorm -> MLP -> residual; tokens are spatial positions with learned positional
  embeddings); the top-down path up-samples and fuses the encoded levels; the three levels feed an
  MLP head for the expression.
* Outputs (``metadata.outputs`` order): expression ``logits`` (7), ``valence_arousal`` in [-1, 1]
  (tanh), ``heatmaps`` (68, h, w) of the last stack, and decoded ``landmarks`` (68, 2) in input
  pixels (arg-max + windowed-centroid sub-pixel refinement, ONNX-exportable) so serving can return them.
  **Valence/arousal is an extra head outside the method** (the method has landmarks and expression):
  one linear layer ``va_fc`` beside the expression classifier on the same hidden vector, named
  ``valence_arousal`` everywhere and weighted by its own loss term; it does not change the method's
  two branches' structure.

Where the description is ambiguous, the choices made here:

* Input: ``image`` (3, 64, 64) RGB scaled to [0, 1], normalised with mean = std = 0.5. RGB because
  the datasets labelled for all three tasks (AffectNet: expression, valence/arousal, 68 landmarks)
  are colour; ``in_chans=1`` gives a grey variant.
* Stem and heatmap resolution: FAN's stem (conv7x7/2, ConvBlock, avg-pool/2, two ConvBlocks), so
  heatmaps are at stride 4 (16 x 16 for a 64 x 64 face). ``heatmap_stride`` 2 drops the pooling,
  1 also the stride of the first conv. The stem widths scale as width/4, width/2, width (FAN: 256).
* Stacks: FAN's 4 stacks of width 256 by default; ``num_stacks``/``width``/``hourglass_depth``
  shrink it. ``hourglass_depth`` is the order (4 = four down-samplings; heatmap side must divide
  by 2^order). Hourglass down-sampling is average pooling and up-sampling nearest, as FAN.
* What enters the pyramid (``pyramid_input``): "heatmaps" (default, the method's keypoint features:
  the last stack's heatmaps), or "heatmaps+features" (also the last stack's appearance features,
  concatenated; the earlier default, kept as an option -- ``bench/fidelity.py`` measures whether it
  helps), projected by a 1x1 conv to ``pyramid_dim``. Bottom-up: C1 at heatmap resolution, C2, C3
  stride-2 conv3x3 down-samplings of the previous C (strides 1, 2, 4 relative to the heatmaps).
* Encoders (``encoder_placement``): "lateral" (default, the method): T_l = encoder_l(C_l) on the
  lateral link, P3 = T3, P_l = conv3x3-BN-ReLU(T_l + nearest-up(P_{l+1})). "bottom_up" (the earlier
  layout, kept for the before/after bench): the encoders in series on the bottom-up path
  (C_{l+1} = down(T_l)), same top-down fusion.
* MLP head: the global average of each of P1..P3, concatenated (``num_features`` = 3 x
  pyramid_dim) -> Linear -> GELU -> dropout -> two linear outputs (expression, valence/arousal).
  The transformer has ``encoder_depth`` blocks per level (default 1), ``num_heads`` 4, MLP ratio 4,
  and a final LayerNorm (ViT's pre-norm convention).
* Heatmap sigma: 1 heatmap cell (FAN draws its Gaussians with sigma 1 on its 64 x 64 heatmaps).
* ``forward_features(x)`` returns the pooled pyramid descriptor (B, num_features) and
  ``forward_head`` maps it to (logits, valence_arousal) or, with ``pre_logits``, the MLP's hidden
  vector; ``forward`` runs the landmark branch as well and returns all four outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fer_core.data.labels import EXPRESSIONS
from fer_core.metrics.landmarks import IBUG_OUTER_EYE_CORNERS, decode_heatmaps
from fer_core.models.catalog import FERModel, ModelMetadata, NetworkSpec, TensorSpec, register_model, register_network
from fer_core.training.recipe import Recipe

NUM_LANDMARKS = 68
AFFECT_DIMENSIONS = ("valence", "arousal")


class ConvBlock(nn.Module):
    """FAN's hierarchical, parallel, multi-scale block: three chained BN-ReLU-conv3x3 branches of
    C/2, C/4 and C/4 channels, concatenated, plus an identity (or BN-ReLU-conv1x1) residual."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        if out_planes % 4:
            raise ValueError(f"ConvBlock needs out_planes divisible by 4, got {out_planes}")
        half, quarter = out_planes // 2, out_planes // 4
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, half, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, quarter, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = nn.Conv2d(quarter, quarter, 3, 1, 1, bias=False)
        self.downsample: nn.Module = nn.Identity()
        if in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_planes), nn.ReLU(), nn.Conv2d(in_planes, out_planes, 1, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        return torch.cat([out1, out2, out3], dim=1) + self.downsample(x)


class Hourglass(nn.Module):
    """Recursive hourglass of the given order: a full-resolution ConvBlock branch plus an
    avg-pool -> ConvBlock -> (hourglass of order - 1) -> ConvBlock -> nearest-upsample branch."""

    def __init__(self, order: int, planes: int) -> None:
        super().__init__()
        if order < 1:
            raise ValueError(f"hourglass order must be >= 1, got {order}")
        self.up = ConvBlock(planes, planes)
        self.low1 = ConvBlock(planes, planes)
        self.low2: nn.Module = Hourglass(order - 1, planes) if order > 1 else ConvBlock(planes, planes)
        self.low3 = ConvBlock(planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low3(self.low2(self.low1(F.avg_pool2d(x, 2, stride=2))))
        return self.up(x) + F.interpolate(low, scale_factor=2.0, mode="nearest")


class Attention(nn.Module):
    """Multi-head self-attention: Q/K/V projections, softmax(Q K^T / sqrt(d)) V, output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)  # rows ordered q, k, v (as nn.MultiheadAttention's in_proj)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, dim = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, head_dim)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, tokens, dim)
        return self.proj(out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SpatialTransformer(nn.Module):
    """Transformer encoder over the positions of a (B, C, h, w) map, with learned positional
    embeddings for a fixed h x w grid; returns a map of the same shape."""

    def __init__(self, dim: int, grid: tuple[int, int], depth: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, h, w = x.shape[1:]
        if not torch.jit.is_tracing() and (h, w) != self.grid:  # traced shapes are tensors
            raise ValueError(f"transformer built for a {self.grid} grid got {(h, w)}")
        tokens = x.flatten(2).transpose(1, 2) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return tokens.transpose(1, 2).reshape(-1, channels, h, w)


def conv_bn_relu(in_planes: int, out_planes: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_planes), nn.ReLU(),
    )


ENCODER_PLACEMENTS = ("lateral", "bottom_up")
PYRAMID_INPUTS = ("heatmaps", "heatmaps+features")


class TransformerPyramid(nn.Module):
    """FPN over levels of stride 1, 2, 4, ... with one transformer encoder per level, fused top-down.

    ``placement="lateral"``: the encoders sit on the lateral links (bottom-up path plain convs);
    ``"bottom_up"``: in series on the bottom-up path. Returns the fused maps finest first: [P1, P2, P3].
    """

    def __init__(
        self, in_planes: int, dim: int, grid: tuple[int, int], num_levels: int = 3,
        depth: int = 1, num_heads: int = 4, mlp_ratio: float = 4.0, placement: str = "lateral",
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if placement not in ENCODER_PLACEMENTS:
            raise ValueError(f"encoder_placement must be one of {ENCODER_PLACEMENTS}, got {placement!r}")
        self.placement = placement
        scale = 2 ** (num_levels - 1)
        if grid[0] % scale or grid[1] % scale:
            raise ValueError(f"a {num_levels}-level pyramid needs a heatmap grid divisible by {scale}, got {grid}")
        self.input_proj = conv_bn_relu(in_planes, dim, 1)
        self.downs = nn.ModuleList([conv_bn_relu(dim, dim, 3, stride=2) for _ in range(num_levels - 1)])
        self.encoders = nn.ModuleList(
            SpatialTransformer(dim, (grid[0] // 2**i, grid[1] // 2**i), depth, num_heads, mlp_ratio)
            for i in range(num_levels)
        )
        self.smooth = nn.ModuleList([conv_bn_relu(dim, dim, 3) for _ in range(num_levels - 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.placement == "lateral":
            bottom_up = [self.input_proj(x)]
            for down in self.downs:
                bottom_up.append(down(bottom_up[-1]))
            levels = [encoder(c) for encoder, c in zip(self.encoders, bottom_up)]
        else:
            levels = [self.encoders[0](self.input_proj(x))]
            for down, encoder in zip(self.downs, self.encoders[1:]):
                levels.append(encoder(down(levels[-1])))
        fused = [levels[-1]]
        for level, smooth in zip(reversed(levels[:-1]), reversed(self.smooth)):
            fused.insert(0, smooth(level + F.interpolate(fused[0], scale_factor=2.0, mode="nearest")))
        return fused


class MultitaskFER(FERModel):
    """Stacked-hourglass landmarks + transformer feature pyramid for expression and valence/arousal."""

    def __init__(
        self,
        num_classes: int = len(EXPRESSIONS),
        in_chans: int = 3,
        img_size: int = 64,
        width: int = 256,
        num_stacks: int = 4,
        hourglass_depth: int = 4,
        heatmap_stride: int = 4,
        heatmap_sigma: float = 1.0,
        num_landmarks: int = NUM_LANDMARKS,
        pyramid_dim: int = 128,
        pyramid_levels: int = 3,
        encoder_depth: int = 1,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        head_hidden: int = 256,
        drop_rate: float = 0.0,
        decode_radius: int = 2,
        label_names: Sequence[str] = EXPRESSIONS,
        pyramid_input: str = "heatmaps",
        encoder_placement: str = "lateral",
        name: str = "multitask_fer",
    ) -> None:
        super().__init__()
        if pyramid_input not in PYRAMID_INPUTS:
            raise ValueError(f"pyramid_input must be one of {PYRAMID_INPUTS}, got {pyramid_input!r}")
        self.pyramid_input = pyramid_input
        if heatmap_stride not in (1, 2, 4):
            raise ValueError(f"heatmap_stride must be 1, 2 or 4, got {heatmap_stride}")
        if width % 8:
            raise ValueError(f"width must be divisible by 8, got {width}")
        if num_stacks < 1:
            raise ValueError(f"num_stacks must be >= 1, got {num_stacks}")
        if img_size % heatmap_stride or (img_size // heatmap_stride) % 2**hourglass_depth:
            raise ValueError(
                f"img_size {img_size} / heatmap_stride {heatmap_stride} must be divisible by 2^hourglass_depth "
                f"= {2**hourglass_depth}"
            )
        if num_landmarks <= max(IBUG_OUTER_EYE_CORNERS):
            raise ValueError(f"num_landmarks must cover the iBUG eye corners {IBUG_OUTER_EYE_CORNERS}")
        heatmap_side = img_size // heatmap_stride
        self.num_stacks = num_stacks
        self.heatmap_stride = heatmap_stride
        self.decode_radius = decode_radius

        # FAN stem: conv7x7/2 -> ConvBlock -> avg-pool/2 -> ConvBlock -> ConvBlock (stride 4 in all).
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width // 4, 7, 2 if heatmap_stride >= 2 else 1, 3, bias=False),
            nn.BatchNorm2d(width // 4), nn.ReLU(),
            ConvBlock(width // 4, width // 2),
            nn.AvgPool2d(2, 2) if heatmap_stride == 4 else nn.Identity(),
            ConvBlock(width // 2, width // 2),
            ConvBlock(width // 2, width),
        )
        self.hourglasses = nn.ModuleList(Hourglass(hourglass_depth, width) for _ in range(num_stacks))
        self.stack_convs = nn.ModuleList(
            nn.Sequential(ConvBlock(width, width), conv_bn_relu(width, width, 1)) for _ in range(num_stacks)
        )
        self.heatmap_heads = nn.ModuleList(nn.Conv2d(width, num_landmarks, 1) for _ in range(num_stacks))
        # Re-injection of features and heatmaps into the next stack; the last stack has none.
        self.feature_remaps = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(num_stacks - 1))
        self.heatmap_remaps = nn.ModuleList(nn.Conv2d(num_landmarks, width, 1) for _ in range(num_stacks - 1))

        pyramid_in = num_landmarks + (width if pyramid_input == "heatmaps+features" else 0)
        self.pyramid = TransformerPyramid(
            pyramid_in, pyramid_dim, (heatmap_side, heatmap_side), pyramid_levels,
            encoder_depth, num_heads, mlp_ratio, encoder_placement,
        )
        self._num_features = pyramid_levels * pyramid_dim
        self.head_mlp = nn.Sequential(nn.Linear(self._num_features, head_hidden), nn.GELU(), nn.Dropout(drop_rate))
        self.fc = nn.Linear(head_hidden, num_classes)
        self.va_fc = nn.Linear(head_hidden, len(AFFECT_DIMENSIONS))
        self._init_weights()

        if len(label_names) != num_classes:
            label_names = tuple(f"class_{i}" for i in range(num_classes))
        self.metadata = ModelMetadata(
            name=name, task="multitask",
            inputs=(TensorSpec("image", (in_chans, img_size, img_size), kind="image",
                               description="RGB face in [0, 1], normalised with mean/std"),),
            outputs=(
                TensorSpec("logits", (num_classes,), kind="logits", labels=tuple(label_names)),
                TensorSpec("valence_arousal", (2,), kind="regression", labels=AFFECT_DIMENSIONS,
                           description="tanh, in [-1, 1]"),
                TensorSpec("heatmaps", (num_landmarks, heatmap_side, heatmap_side), kind="heatmaps",
                           description=f"one Gaussian-target heatmap per landmark at stride {heatmap_stride}"),
                TensorSpec("landmarks", (num_landmarks, 2), kind="regression", labels=("x", "y"),
                           description="(x, y) in input pixels, pixel centres at integers"),
            ),
            mean=(0.5,) * in_chans, std=(0.5,) * in_chans,
            label_names=tuple(label_names), primary_output="logits",
            extra={
                "heatmap_stride": heatmap_stride, "heatmap_sigma": heatmap_sigma,
                "num_landmarks": num_landmarks, "landmark_scheme": "ibug68" if num_landmarks == 68 else "custom",
                "nme_normaliser": list(IBUG_OUTER_EYE_CORNERS), "decode_radius": decode_radius,
                "affect_dimensions": list(AFFECT_DIMENSIONS), "valence_arousal_range": [-1.0, 1.0],
                "valence_arousal_head": "extra head outside the method",
                "pyramid_input": pyramid_input, "encoder_placement": encoder_placement,
            },
        )

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Heatmap heads start near zero: the target is ~0 almost everywhere.
        for head in self.heatmap_heads:
            nn.init.normal_(head.weight, std=0.001)

    @property
    def num_features(self) -> int:
        return self._num_features

    def forward_landmarks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the hourglass stacks: (last stack's features, every stack's heatmaps)."""
        x = self.stem(x)
        stack_heatmaps = []
        for i in range(self.num_stacks):
            features = self.stack_convs[i](self.hourglasses[i](x))
            heatmaps = self.heatmap_heads[i](features)
            stack_heatmaps.append(heatmaps)
            if i < self.num_stacks - 1:
                x = x + self.feature_remaps[i](features) + self.heatmap_remaps[i](heatmaps)
        return features, stack_heatmaps

    def _pyramid_descriptor(self, features: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
        keypoints = heatmaps if self.pyramid_input == "heatmaps" else torch.cat([features, heatmaps], dim=1)
        levels = self.pyramid(keypoints)
        return torch.cat([level.mean(dim=(2, 3)) for level in levels], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled pyramid descriptor (B, num_features) that the expression/affect head reads."""
        features, stack_heatmaps = self.forward_landmarks(x)
        return self._pyramid_descriptor(features, stack_heatmaps[-1])

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False):
        """(logits, valence_arousal) from the pyramid descriptor, or the MLP's hidden vector."""
        hidden = self.head_mlp(features)
        if pre_logits:
            return hidden
        return self.fc(hidden), torch.tanh(self.va_fc(hidden))

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.fc.in_features, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        labels = tuple(f"class_{i}" for i in range(num_classes))
        outputs = list(self.metadata.outputs)
        outputs[0] = dataclasses.replace(outputs[0], shape=(num_classes,), labels=labels)
        self.metadata = dataclasses.replace(self.metadata, outputs=tuple(outputs), label_names=labels)

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named outputs plus ``stack_heatmaps`` (B, stacks, K, h, w) for intermediate supervision."""
        features, stack_heatmaps = self.forward_landmarks(x)
        heatmaps = stack_heatmaps[-1]
        logits, valence_arousal = self.forward_head(self._pyramid_descriptor(features, heatmaps))
        return {
            "logits": logits,
            "valence_arousal": valence_arousal,
            "heatmaps": heatmaps,
            "landmarks": decode_heatmaps(heatmaps.detach(), self.heatmap_stride, self.decode_radius),
            "stack_heatmaps": torch.stack(stack_heatmaps, dim=1),
        }

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features, stack_heatmaps = self.forward_landmarks(x)
        heatmaps = stack_heatmaps[-1]
        logits, valence_arousal = self.forward_head(self._pyramid_descriptor(features, heatmaps))
        landmarks = decode_heatmaps(heatmaps, self.heatmap_stride, self.decode_radius)
        return logits, valence_arousal, heatmaps, landmarks


@register_model
def multitask_fer(**kwargs) -> MultitaskFER:
    """Joint landmarks / expression / valence-arousal network (FAN-style 4 x 256 hourglasses,
    3-level transformer pyramid; input (3, 64, 64))."""
    return MultitaskFER(name="multitask_fer", **kwargs)


# ---------------------------------------------------------------------------------------------
# Network spec: task, profiles, default data
# ---------------------------------------------------------------------------------------------


def _profiles() -> dict[str, Recipe]:
    paper = Recipe(
        network="multitask_fer", profile="paper",
        # The model's defaults are the design: FAN's 4 stacks x 256, order-4 hourglasses, 3-level
        # transformer pyramid of width 128, RGB 64x64.
        # The method's pyramid: heatmap keypoint features in, one encoder per level on the lateral link.
        model_kwargs={"pyramid_input": "heatmaps", "encoder_placement": "lateral"},
        loss_kwargs={"expression_weight": 1.0, "va_weight": 1.0, "heatmap_weight": 1.0, "va_loss": "ccc"},
        # Validation outputs are kept whole for the metrics (every stack's heatmaps: ~0.35 MB a face),
        # so the held-out part of AffectNet's 287k training faces is kept small (~5.7k faces).
        data={"val_fraction": 0.02},
        optimizer="adam", lr=2.5e-4, weight_decay=0.0, scheduler="cosine", warmup_epochs=1, epochs=40,
        batch_size=64, eval_batch_size=128, early_stopping_patience=8, monitor="val/loss", monitor_mode="min",
        grad_clip=5.0, num_workers=4,
        augment={"hflip": True, "rotation_deg": 0.0, "crop_area": [1.0, 1.0], "gamma_max": 1.5,
                 "noise_var": 0.001, "erase_prob": 0.25},
    )
    quick = paper.with_overrides({
        "profile": "quick",
        "model_kwargs": {"width": 16, "num_stacks": 1, "hourglass_depth": 2, "pyramid_dim": 16, "num_heads": 2,
                         "head_hidden": 32},
        "data": {"val_fraction": 0.15}, "lr": 2e-3, "warmup_epochs": 0, "epochs": 15, "batch_size": 32,
        "eval_batch_size": 64, "early_stopping_patience": 3, "num_workers": 0, "max_steps_per_epoch": 30,
        "augment": {"hflip": True, "rotation_deg": 0.0, "crop_area": [1.0, 1.0], "gamma_max": 1.3,
                    "noise_var": 0.0005, "erase_prob": 0.0},
    })
    return {"paper": paper, "quick": quick}


register_network(NetworkSpec(
    name="multitask_fer", factory=multitask_fer, task="multitask", model_class=MultitaskFER, fixed_kwargs=("name",),
    profiles=_profiles, data_format="affectnet", dataset="affectnet", primary_metric="accuracy", demo_size=1400,
    description="joint 68-landmark heatmaps, expression and valence/arousal (hourglasses + transformer pyramid)",
    reference="multi-task FER with landmark heatmaps (FAN-style hourglass, AffectNet)",
))
