"""Per-sample decoding checks: turn every manifest reference into columns the gate's suites check.

:func:`inspect_samples` opens what each ``path`` names, the way the loaders do
(:mod:`fer_core.data.samples`), and records facts rather than verdicts::

    exists          the referenced file (or packed-array row) is there
    decodes         it decodes to pixels
    decode_error    why not (for people reading the report), else <NA>
    height, width   of the image, or of a clip's frames; 0 when the array has no (H, W[, C]) shape
    channels        1 for (H, W), C for (H, W, C); 0 when malformed
    num_decoded     frames decoded (1 for images)
    finite          no NaN/inf pixel (always true for integer pixels)
    pixel_hash      :func:`fer_core.data.manifest.content_hash` of the decoded pixels

Facts of rows that do not decode are <NA>, so the size/channel/finite expectations (which skip nulls)
report a broken file once, under ``file_decodes``, instead of under every column.

Packed arrays (``arrays/<file>.npy#row``) are read once per file and checked in blocks, which keeps
a 32k-row FER2013-like dataset at a few seconds; images, frame folders and videos are decoded one
by one.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from fer_core.data.manifest import content_hash, resolve_reference
from fer_core.data.samples import read_clip, read_image

SAMPLE_COLUMNS: tuple[str, ...] = (
    "exists", "decodes", "decode_error", "height", "width", "channels", "num_decoded", "finite", "pixel_hash",
)
# Rows of a packed array checked at once: bounds memory for big clip arrays, stays vectorised.
_PACKED_BLOCK_ROWS = 4096


class _Facts:
    """Column buffers filled row by row (plain lists/arrays, one DataFrame at the end)."""

    def __init__(self, n: int) -> None:
        self.exists = np.zeros(n, dtype=bool)
        self.decodes = np.zeros(n, dtype=bool)
        self.error: list[object] = [pd.NA] * n
        self.height: list[object] = [pd.NA] * n
        self.width: list[object] = [pd.NA] * n
        self.channels: list[object] = [pd.NA] * n
        self.num_decoded: list[object] = [pd.NA] * n
        self.finite: list[object] = [pd.NA] * n
        self.pixel_hash: list[object] = [pd.NA] * n

    def fail(self, pos: int, reason: str, *, exists: bool) -> None:
        self.exists[pos] = exists
        self.error[pos] = reason

    def record(self, pos: int, pixels: np.ndarray, *, clip: bool, pixel_hash: str | None = None) -> None:
        """Facts of one decoded sample; ``clip`` means pixels are (T, H, W[, C])."""
        self.exists[pos] = True
        self.decodes[pos] = True
        frames = pixels.shape[0] if clip else 1
        height, width, channels = frame_geometry(pixels.shape[1:] if clip else pixels.shape)
        self.height[pos], self.width[pos], self.channels[pos] = height, width, channels
        self.num_decoded[pos] = frames
        self.finite[pos] = bool(np.isfinite(pixels).all()) if pixels.dtype.kind == "f" else True
        self.pixel_hash[pos] = pixel_hash if pixel_hash is not None else content_hash(pixels)

    def frame(self, index: pd.Index) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "exists": self.exists,
                "decodes": self.decodes,
                "decode_error": pd.array(self.error, dtype="string"),
                "height": pd.array(self.height, dtype="Int64"),
                "width": pd.array(self.width, dtype="Int64"),
                "channels": pd.array(self.channels, dtype="Int64"),
                "num_decoded": pd.array(self.num_decoded, dtype="Int64"),
                "finite": pd.array(self.finite, dtype="boolean"),
                "pixel_hash": pd.array(self.pixel_hash, dtype="string"),
            },
            index=index,
        )


def frame_geometry(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(height, width, channels) of one frame's shape; zeros when it is not (H, W) or (H, W, C)."""
    if len(shape) == 2:
        return int(shape[0]), int(shape[1]), 1
    if len(shape) == 3:
        return int(shape[0]), int(shape[1]), int(shape[2])
    return 0, 0, 0


def inspect_samples(root: Path, manifest: pd.DataFrame, *, clips: bool) -> pd.DataFrame:
    """Decode every row's ``path`` below ``root``; one row of :data:`SAMPLE_COLUMNS` per manifest row.

    ``clips`` reads references as clips (micro/dynamic tasks), otherwise as single images. Never
    raises for bad references or files: that is what the returned columns report.
    """
    root = Path(root)
    n = len(manifest)
    facts = _Facts(n)
    refs = manifest["path"] if "path" in manifest.columns else pd.Series([pd.NA] * n, index=manifest.index)
    # Resolving a path costs syscalls: once per file, not once per row of a 32k-row packed array.
    resolved: dict[str, Path | ValueError] = {}
    packed: dict[Path, list[tuple[int, int]]] = {}
    for pos, ref in enumerate(refs.astype("string")):
        if pd.isna(ref) or not str(ref).strip():
            facts.fail(pos, "no path", exists=False)
            continue
        ref = str(ref)
        file_part, _, row_text = ref.partition("#")
        if file_part not in resolved:
            try:
                resolved[file_part] = resolve_reference(root, file_part)[0]
            except ValueError as exc:
                resolved[file_part] = exc
        target = resolved[file_part]
        if isinstance(target, ValueError):
            facts.fail(pos, str(target), exists=False)
            continue
        if row_text:
            if not row_text.isdigit():
                facts.fail(pos, f"reference {ref!r} has a non-numeric row index", exists=False)
            else:
                packed.setdefault(target, []).append((pos, int(row_text)))
            continue
        if not target.exists():
            facts.fail(pos, f"{file_part} does not exist", exists=False)
            continue
        try:
            pixels = read_clip(root, ref) if clips else read_image(root, ref)
        except (ValueError, OSError, cv2.error) as exc:
            facts.fail(pos, str(exc), exists=True)
            continue
        facts.record(pos, pixels, clip=clips)

    for target, items in packed.items():
        _inspect_packed(target, items, facts, clips=clips)
    return facts.frame(manifest.index)


def _inspect_packed(target: Path, items: list[tuple[int, int]], facts: _Facts, *, clips: bool) -> None:
    """Check the rows of one packed ``.npy`` array: one load, shape facts broadcast, blocks of rows."""
    positions = np.array([p for p, _ in items], dtype=np.int64)
    rows = np.array([r for _, r in items], dtype=np.int64)
    if not target.is_file():
        for pos in positions:
            facts.fail(int(pos), f"packed array {target.name} does not exist", exists=False)
        return
    try:
        array = np.load(target, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        for pos in positions:
            facts.fail(int(pos), f"packed array {target.name} cannot be read: {exc}", exists=True)
        return

    in_range = rows < len(array)
    for pos, row in zip(positions[~in_range], rows[~in_range]):
        facts.fail(int(pos), f"row {row} is past {target.name}'s {len(array)} rows", exists=False)

    positions, rows = positions[in_range], rows[in_range]
    sample_shape = array.shape[1:]
    frames = (sample_shape[0] if sample_shape else 0) if clips else 1
    height, width, channels = frame_geometry(sample_shape[1:] if clips else sample_shape)
    float_pixels = array.dtype.kind == "f"
    for start in range(0, len(rows), _PACKED_BLOCK_ROWS):
        block_rows = rows[start : start + _PACKED_BLOCK_ROWS]
        block = np.asarray(array[block_rows])
        if float_pixels:
            finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        else:
            finite = np.ones(len(block), dtype=bool)
        for offset, pos in enumerate(positions[start : start + _PACKED_BLOCK_ROWS]):
            pos = int(pos)
            facts.exists[pos] = True
            facts.decodes[pos] = True
            facts.height[pos], facts.width[pos], facts.channels[pos] = height, width, channels
            facts.num_decoded[pos] = frames
            facts.finite[pos] = bool(finite[offset])
            facts.pixel_hash[pos] = content_hash(block[offset])
