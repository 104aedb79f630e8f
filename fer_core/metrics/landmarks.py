"""Facial landmarks: Gaussian heatmap targets, heatmap decoding and the NME metric.

Coordinate convention (used by the generator, the heatmap targets and the decoder alike): a landmark
is ``(x, y)`` in input pixels with pixel *centres* at integer coordinates (OpenCV's convention).
A heatmap computed at ``stride`` s covers s x s input pixels per cell, so heatmap cell centre ``u``
sits at input coordinate ``(u + 0.5) * s - 0.5``; :func:`to_heatmap_coords` and
:func:`to_pixel_coords` are the two directions of that map.
"""

from __future__ import annotations

from typing import Sequence

import torch

# iBUG 68-point scheme: outer corners of the subject's right (36) and left (45) eye; their distance
# is the "inter-ocular" normaliser of the 300-W NME.
IBUG_OUTER_EYE_CORNERS: tuple[int, int] = (36, 45)


def to_heatmap_coords(points: torch.Tensor, stride: float) -> torch.Tensor:
    """Input-pixel coordinates -> heatmap-cell coordinates (any shape, last axis (x, y))."""
    return (points + 0.5) / stride - 0.5


def to_pixel_coords(points: torch.Tensor, stride: float) -> torch.Tensor:
    """Heatmap-cell coordinates -> input-pixel coordinates (inverse of :func:`to_heatmap_coords`)."""
    return (points + 0.5) * stride - 0.5


def render_heatmaps(
    landmarks: torch.Tensor, heatmap_size: Sequence[int], stride: float = 1.0, sigma: float = 1.0
) -> torch.Tensor:
    """Heatmap targets R(u, v) = exp(-((u - x)^2 + (v - y)^2) / (2 sigma^2)), one map per landmark.

    ``landmarks`` (B, K, 2) are input-pixel (x, y); ``sigma`` is in heatmap cells. The Gaussian is not
    truncated, so a landmark between cells or just outside the map still gives a smooth target.
    Returns (B, K, h, w) with peak value 1 at the landmark's cell.
    """
    if landmarks.ndim != 3 or landmarks.shape[-1] != 2:
        raise ValueError(f"landmarks must be (B, K, 2), got {tuple(landmarks.shape)}")
    if sigma <= 0 or stride <= 0:
        raise ValueError(f"sigma and stride must be positive, got sigma={sigma}, stride={stride}")
    h, w = (int(s) for s in heatmap_size)
    centres = to_heatmap_coords(landmarks.float(), stride)
    xs = torch.arange(w, dtype=torch.float32, device=landmarks.device)
    ys = torch.arange(h, dtype=torch.float32, device=landmarks.device)
    dx2 = (xs.view(1, 1, 1, w) - centres[..., 0, None, None]) ** 2
    dy2 = (ys.view(1, 1, h, 1) - centres[..., 1, None, None]) ** 2
    return torch.exp(-(dx2 + dy2) / (2.0 * sigma**2))


def decode_heatmaps(heatmaps: torch.Tensor, stride: float = 1.0, radius: int = 2) -> torch.Tensor:
    """Landmark (x, y) in input pixels from heatmaps (B, K, h, w): argmax + sub-pixel refinement.

    The refinement is the centroid of the non-negative heatmap in a (2r+1)^2 window around the arg-max
    cell: exact for a symmetric peak, and unlike a global soft-argmax it is not pulled toward the map's
    centre by low background activity. Everything is ArgMax / arithmetic, so it exports to ONNX.
    """
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must be (B, K, h, w), got {tuple(heatmaps.shape)}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    h, w = heatmaps.shape[-2:]
    peak = heatmaps.flatten(2).argmax(dim=-1)  # (B, K)
    peak_y = torch.div(peak, w, rounding_mode="floor")
    peak_x = peak - peak_y * w
    xs = torch.arange(w, dtype=heatmaps.dtype, device=heatmaps.device).view(1, 1, 1, w)
    ys = torch.arange(h, dtype=heatmaps.dtype, device=heatmaps.device).view(1, 1, h, 1)
    in_x = (xs - peak_x[..., None, None].to(heatmaps.dtype)).abs() <= radius
    in_y = (ys - peak_y[..., None, None].to(heatmaps.dtype)).abs() <= radius
    window = (in_x & in_y).to(heatmaps.dtype)
    # The tiny floor keeps an all-negative window well defined (it then decodes to the window centre).
    weights = window * (heatmaps.clamp_min(0.0) + 1e-6)
    total = weights.sum(dim=(2, 3))
    x = (weights * xs).sum(dim=(2, 3)) / total
    y = (weights * ys).sum(dim=(2, 3)) / total
    return to_pixel_coords(torch.stack([x, y], dim=-1), stride)


def interocular_distance(landmarks: torch.Tensor, eye_corners: tuple[int, int] = IBUG_OUTER_EYE_CORNERS) -> torch.Tensor:
    """Distance between the two outer eye corners, per face: (B, K, 2) -> (B,)."""
    left, right = eye_corners
    return (landmarks[:, left] - landmarks[:, right]).norm(dim=-1)


def nme(
    pred: torch.Tensor, target: torch.Tensor, eye_corners: tuple[int, int] = IBUG_OUTER_EYE_CORNERS
) -> torch.Tensor:
    """Normalised mean error per face: mean over landmarks of ||pred - target|| / inter-ocular distance.

    ``pred`` and ``target`` are (B, K, 2) in the same units; returns (B,). Average it for the dataset
    NME (300-W "inter-ocular" normalisation when ``eye_corners`` are the outer corners 36 and 45).
    """
    pred, target = torch.as_tensor(pred, dtype=torch.float32), torch.as_tensor(target, dtype=torch.float32)
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred and target must both be (B, K, 2), got {tuple(pred.shape)} and {tuple(target.shape)}")
    if max(eye_corners) >= target.shape[1]:
        raise ValueError(f"eye corners {eye_corners} are not among the {target.shape[1]} landmarks")
    norm = interocular_distance(target, eye_corners)
    if (norm <= 0).any():
        raise ValueError("a target face has zero inter-ocular distance; NME is undefined")
    return (pred - target).norm(dim=-1).mean(dim=-1) / norm
