"""Decode what a manifest's ``path`` reference points to (images, packed arrays, clips)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from fer_core.data.manifest import resolve_reference

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")


def _natural_key(path: Path) -> list:
    """Sort frame files as humans number them (img2 before img10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def decode_image_file(path: Path) -> np.ndarray:
    """Decode one image file to uint8 (H, W) grey or (H, W, 3) RGB. ``ValueError`` if unreadable."""
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise ValueError(f"image file {path} does not exist")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ValueError(f"image file {path} cannot be decoded")
    if image.dtype != np.uint8:  # 16-bit PNGs and the like: scale to 8 bits
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(float(image.max()), 1.0))
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    elif image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def read_image(root: Path, ref: str) -> np.ndarray:
    """The image a reference names: a file, or ``arrays/<f>.npy#row`` of a packed array."""
    path, row = resolve_reference(root, ref)
    if row is not None:
        if not path.is_file():
            raise ValueError(f"packed array {path} does not exist")
        array = np.load(path, mmap_mode="r")
        if row >= len(array):
            raise ValueError(f"reference {ref!r}: row {row} is past the array's {len(array)} rows")
        return np.asarray(array[row])
    return decode_image_file(path)


def frame_files(folder: Path) -> list[Path]:
    """Image files of a frame folder in natural order."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)


def read_clip(root: Path, ref: str) -> np.ndarray:
    """The frames a reference names, stacked (T, H, W[, C]): a folder of frames, a video file or a
    packed ``.npy`` row of shape (T, H, W[, C])."""
    path, row = resolve_reference(root, ref)
    if row is not None:
        return read_image(root, ref)
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise ValueError(f"clip folder {path} holds no frames")
        frames = [decode_image_file(f) for f in files]
    elif path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
        capture = cv2.VideoCapture(str(path))
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        capture.release()
        if not frames:
            raise ValueError(f"video {path} cannot be decoded")
    else:
        raise ValueError(f"clip reference {ref!r} is neither a frame folder nor a video file")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"clip {ref!r} has frames of different shapes: {sorted(shapes)}")
    return np.stack(frames)
