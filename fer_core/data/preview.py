"""Contact sheets: a PNG grid of faces with optional labels and landmarks (``fer data preview``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

# Landmark colours by iBUG region (RGB): jaw, brows, nose, eyes, mouth.
_REGIONS = (
    (0, 17, (255, 210, 0)), (17, 27, (255, 90, 40)), (27, 36, (60, 220, 255)), (36, 48, (60, 255, 90)),
    (48, 68, (255, 60, 200)),
)


def save_contact_sheet(
    images: np.ndarray,
    path: str | Path,
    labels: Sequence[object] | None = None,
    landmarks: np.ndarray | None = None,
    cols: int = 10,
    *,
    tile_size: int | None = None,
) -> Path:
    """Write images (N, H, W[, 3]) uint8 as a PNG grid and return its path.

    Small images are upscaled to ``tile_size`` (default: at least 96 px) so labels and landmark dots
    stay legible; ``labels`` are drawn in each tile's corner, ``landmarks`` (N, 68, 2) pixel (x, y)
    as dots coloured by face region (NaN rows are skipped).
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0 or images.dtype != np.uint8:
        raise ValueError(f"images must be a non-empty uint8 array (N, H, W[, 3]), got {images.dtype} {images.shape}")
    n, h, w = images.shape[:3]
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    if landmarks is not None and (np.shape(landmarks)[0] != n or np.shape(landmarks)[-1] != 2):
        raise ValueError(f"landmarks must be (N, K, 2) with N = {n}, got {np.shape(landmarks)}")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    tile = tile_size or max(h, 96)
    scale = tile / max(h, w)
    tw, th = int(round(w * scale)), int(round(h * scale))
    cols = min(cols, n)
    rows = -(-n // cols)
    gap = 2
    sheet = np.full((rows * (th + gap) + gap, cols * (tw + gap) + gap, 3), 32, np.uint8)
    for i in range(n):
        cell = cv2.resize(images[i], (tw, th), interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
        if landmarks is not None:
            pts = np.asarray(landmarks[i], dtype=np.float64)
            for start, stop, colour in _REGIONS:
                for x, y in pts[start:stop]:
                    if np.isfinite(x) and np.isfinite(y):
                        # Pixel centres are at integer coordinates: scale about the centre of pixel 0.
                        centre = (int(round((x + 0.5) * scale - 0.5)), int(round((y + 0.5) * scale - 0.5)))
                        cv2.circle(cell, centre, 1, colour, -1)
        if labels is not None:
            text = str(labels[i])
            font_scale = max(tile / 256, 0.3)
            origin = (3, int(14 * font_scale / 0.375))
            for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):  # outlined: legible anywhere
                cv2.putText(cell, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, thickness, cv2.LINE_AA)
        r, c = divmod(i, cols)
        y0, x0 = gap + r * (th + gap), gap + c * (tw + gap)
        sheet[y0: y0 + th, x0: x0 + tw] = cell
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"could not write a PNG to {path}")
    return path


def _display_frame(root: Path, row) -> np.ndarray:
    """The image of a row, or the apex (else middle) frame of a clip."""
    from fer_core.data.samples import read_clip, read_image

    if int(row["num_frames"]) <= 1:
        return read_image(root, row["path"])
    frames = read_clip(root, row["path"])
    apex = int(row["apex"])
    return frames[apex if 0 <= apex < len(frames) else len(frames) // 2]


def dataset_contact_sheet(root: str | Path, path: str | Path, count: int = 40, seed: int = 0) -> Path:
    """Contact sheet of ``count`` samples of a prepared dataset, spread over its classes.

    Tiles show the class name (or the active AUs for AU data) and the split; clips show their apex frame.
    """
    from fer_core.data.manifest import read_card, read_manifest

    root = Path(root)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    card, manifest = read_card(root), read_manifest(root)
    if manifest.empty:
        raise ValueError(f"{root} holds no samples")
    # Round-robin over labels so every class shows up, in a seeded order.
    shuffled = manifest.sample(frac=1.0, random_state=seed)
    order = shuffled.groupby("label", sort=True).cumcount()
    picked = shuffled.assign(_rank=order.to_numpy()).sort_values(["_rank", "label"]).head(count)
    tiles, captions = [], []
    size = None
    for _, row in picked.iterrows():
        image = _display_frame(root, row)
        image = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
        size = size or image.shape[:2]
        tiles.append(cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA) if image.shape[:2] != size else image)
        label = int(row["label"])
        if 0 <= label < len(card.classes):
            caption = card.classes[label]
        elif "aus" in row and row["aus"] is not None and card.au_names:
            active = [n for n, v in zip(card.au_names, row["aus"]) if v == 1]
            caption = "+".join(a.removeprefix("AU") for a in active) or "no AU"
        else:
            caption = "unlabelled"
        captions.append(f"{caption} ({row['split']})")
    return save_contact_sheet(np.stack(tiles), path, labels=captions, cols=min(10, len(tiles)))
