"""Training augmentation on float tensors, driven by an explicit ``torch.Generator``.

All ops take ``(..., C, H, W)`` in [0, 1] (before normalisation) and draw their parameters once per
call, so a clip ``(T, C, H, W)`` gets the same flip/rotation/crop on every frame. Every random draw
comes from the generator passed in (see :func:`fer_core.training.task.epoch_generator`), which is
what makes resumed and distributed runs replay the same augmentation.

The CA-ResNet method lists: flip and mirror, gamma γ = 2, random erasing, noise (0, 0.001),
rotation 30°–90°, crop 50–100 %. Readings of that list (the method gives no probabilities):

* "mirror" is the horizontal flip (``hflip``) and "flip" the vertical one (``vflip``), each with
  probability 1/2;
* "gamma γ = 2": with probability ``gamma_prob`` (1/2) the image becomes ``x ** γ`` with the fixed
  ``gamma = 2`` (``gamma_max`` keeps the older log-uniform draw from [1/g, g] for other recipes);
* "rotation 30°–90°": with probability ``rotation_prob`` the angle's magnitude is drawn from
  ``rotation_range`` = (30, 90) degrees and its sign at random (``rotation_deg`` keeps the older
  symmetric draw from [−d, d]);
* noise: Gaussian, mean 0, variance ``noise_var`` = 0.001; crop: ``crop_area`` (0.5, 1.0) of the area,
  resized back; random erasing with ``erase_prob``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to apply and how strongly (0 / False disables one)."""

    hflip: bool = True
    vflip: bool = False
    rotation_deg: float = 10.0
    rotation_range: tuple[float, float] = (0.0, 0.0)  # |angle| range in degrees (used when its end > 0)
    rotation_prob: float = 1.0
    crop_area: tuple[float, float] = (0.5, 1.0)  # fraction of the image area kept by the random crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range of the crop ((1, 1): square)
    gamma_max: float = 2.0  # gamma drawn log-uniformly from [1/gamma_max, gamma_max]
    gamma: float = 0.0  # a fixed gamma applied with gamma_prob (0 = off)
    gamma_prob: float = 0.5
    noise_var: float = 0.001
    erase_prob: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.15)
    greyscale_prob: float = 0.0  # RGB only: replace the image by its luminance in all channels

    @classmethod
    def from_mapping(cls, raw) -> "AugmentConfig":
        raw = dict(raw or {})
        for key in ("crop_area", "crop_ratio", "erase_area", "rotation_range"):
            if key in raw:
                raw[key] = tuple(raw[key])
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown augmentation options {sorted(unknown)}")
        return cls(**raw)

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(hflip=False, rotation_deg=0.0, crop_area=(1.0, 1.0), gamma_max=1.0, noise_var=0.0, erase_prob=0.0)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply one 2x3 affine (normalised coordinates) to every image in ``x`` (..., C, H, W)."""
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape(-1, c, h, w)
    grid = F.affine_grid(theta.expand(flat.shape[0], 2, 3), list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(*lead, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """One random augmentation of ``x`` (..., C, H, W) in [0, 1]."""
    if cfg.hflip and float(torch.rand((), generator=g)) < 0.5:
        x = x.flip(-1)
    if cfg.vflip and float(torch.rand((), generator=g)) < 0.5:
        x = x.flip(-2)
    # Rotation and the random crop are one affine warp: the crop keeps `area` of the image (with
    # a random aspect ratio in ``crop_ratio``) and is resized back to the full size.
    if cfg.rotation_range[1] > 0:
        angle = 0.0
        if float(torch.rand((), generator=g)) < cfg.rotation_prob:
            sign = 1.0 if float(torch.rand((), generator=g)) < 0.5 else -1.0
            angle = sign * math.radians(_uniform(g, *cfg.rotation_range))
    else:
        angle = math.radians(_uniform(g, -cfg.rotation_deg, cfg.rotation_deg)) if cfg.rotation_deg else 0.0
    area = _uniform(g, *cfg.crop_area)
    if angle or area < 1.0:
        ratio = math.exp(_uniform(g, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
        sx, sy = min(math.sqrt(area * ratio), 1.0), min(math.sqrt(area / ratio), 1.0)
        tx, ty = _uniform(g, -(1 - sx), 1 - sx), _uniform(g, -(1 - sy), 1 - sy)
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[sx * cos, -sy * sin, tx], [sx * sin, sy * cos, ty]], dtype=x.dtype)
        x = _affine(x, theta)
    if cfg.greyscale_prob > 0 and x.shape[-3] == 3 and float(torch.rand((), generator=g)) < cfg.greyscale_prob:
        # ITU-R BT.601 luma, as PIL's "L" conversion and torchvision's RandomGrayscale use.
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
        x = (x * weights).sum(dim=-3, keepdim=True).expand_as(x).contiguous()
    if cfg.gamma > 0:
        if float(torch.rand((), generator=g)) < cfg.gamma_prob:
            x = x.clamp(0, 1) ** cfg.gamma
    elif cfg.gamma_max > 1.0:
        gamma = math.exp(_uniform(g, -math.log(cfg.gamma_max), math.log(cfg.gamma_max)))
        x = x.clamp(0, 1) ** gamma
    if cfg.noise_var > 0:
        x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * math.sqrt(cfg.noise_var)
    if cfg.erase_prob > 0 and float(torch.rand((), generator=g)) < cfg.erase_prob:
        h, w = x.shape[-2:]
        frac = _uniform(g, *cfg.erase_area)
        eh, ew = max(1, int(round(h * math.sqrt(frac)))), max(1, int(round(w * math.sqrt(frac))))
        top, left = int(torch.randint(0, h - eh + 1, (), generator=g)), int(torch.randint(0, w - ew + 1, (), generator=g))
        x = x.clone()
        x[..., top : top + eh, left : left + ew] = torch.rand((), generator=g, dtype=x.dtype)
    return x.clamp(0, 1)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel for (..., C, H, W)."""
    mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std
