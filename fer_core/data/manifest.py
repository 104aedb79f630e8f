"""The canonical manifest and dataset card every adapter produces.

A *prepared dataset* is a self-contained folder::

    <root>/manifest.parquet   one row per sample (image) or clip
    <root>/card.json          classes, counts, provenance (:class:`DatasetCard`)
    <root>/...                the files the manifest's ``path`` column references

``path`` references are relative to the root and never leave it:
``arrays/<file>.npy#<row>`` (a row of a packed uint8 array, e.g. FER2013 pixels),
``<file>.png|jpg|bmp`` (an image), a folder of frames, or a video file (clips).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

MANIFEST_FILE = "manifest.parquet"
CARD_FILE = "card.json"
SPLITS = ("train", "val", "test")
TASKS = ("static", "micro", "dynamic", "au")
LABEL_SETS = ("clean", "noisy", "unlabelled")

# Required columns and their pandas dtypes. -1 / "" mean "not applicable".
MANIFEST_COLUMNS: Mapping[str, str] = {
    "id": "string",
    "task": "string",
    "source": "string",
    "split": "string",
    "path": "string",
    "label": "int64",
    "subject": "string",
    "onset": "int64",
    "apex": "int64",
    "offset": "int64",
    "num_frames": "int64",
    "content_hash": "string",
}
# Optional columns an adapter may add (lists are stored as Parquet lists).
OPTIONAL_COLUMNS: Mapping[str, str] = {
    "label_name": "string",
    "soft_label": "object",  # list[float]: FER+ vote distribution over the card's classes
    "aus": "object",  # list[int]: 1 active, 0 inactive, -1 unknown, in card.au_names order
    "true_aus": "object",  # list[int]: generator's clean truth for noisy sets (evaluation only)
    "label_set": "string",  # clean | noisy | unlabelled (AU co-training)
    "valence": "float64",
    "arousal": "float64",
    "landmarks": "object",  # list[float]: 68 (x, y) pairs, flattened, pixel coordinates
    "fold": "int64",  # cross-validation fold in which the sample is a test sample (DFEW)
    "magnification": "float64",  # α of a magnified pair (magnified_pairs format)
}


@dataclass(frozen=True)
class DatasetCard:
    """JSON sidecar of a prepared dataset."""

    name: str
    task: str
    source_format: str
    classes: tuple[str, ...] = ()
    au_names: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train", "test")
    subject_independent: bool = False  # protocol: no subject in both train and test
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # split -> class -> n
    num_samples: int = 0
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DatasetCard":
        raw = json.loads(text)
        for key in ("classes", "au_names", "splits"):
            raw[key] = tuple(raw.get(key, ()))
        return cls(**raw)


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MANIFEST_COLUMNS.items()})


def check_schema(df: pd.DataFrame) -> pd.DataFrame:
    """Structural check (columns present, castable types); content is the data gate's job.

    Returns the frame with canonical dtypes. Raises ``ValueError`` naming what is missing.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks required columns: {missing}")
    unknown = [c for c in df.columns if c not in MANIFEST_COLUMNS and c not in OPTIONAL_COLUMNS]
    if unknown:
        raise ValueError(f"manifest has unknown columns: {unknown}")
    out = df.copy()
    for col, dtype in {**MANIFEST_COLUMNS, **OPTIONAL_COLUMNS}.items():
        if col in out.columns and dtype != "object":
            try:
                out[col] = out[col].astype(dtype)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"manifest column {col!r} is not {dtype}: {exc}") from exc
    return out


def class_counts(df: pd.DataFrame, classes: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """split -> class name -> count (labelled rows only)."""
    counts: dict[str, dict[str, int]] = {}
    for split, group in df[df["label"] >= 0].groupby("split"):
        vc = group["label"].value_counts()
        counts[str(split)] = {
            (classes[i] if 0 <= i < len(classes) else str(i)): int(vc.get(i, 0))
            for i in range(max(len(classes), int(vc.index.max()) + 1 if len(vc) else 0))
        }
    return counts


def write_prepared(root: Path, df: pd.DataFrame, card: DatasetCard) -> None:
    """Write ``manifest.parquet`` and ``card.json`` into ``root`` (files already in place)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    df = check_schema(df).reset_index(drop=True)
    df.to_parquet(root / MANIFEST_FILE, index=False)
    (root / CARD_FILE).write_text(card.to_json() + "\n")


def read_manifest(root: Path) -> pd.DataFrame:
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{root} is not a prepared dataset: {MANIFEST_FILE} is missing")
    return pd.read_parquet(path)


def read_card(root: Path) -> DatasetCard:
    path = Path(root) / CARD_FILE
    if not path.is_file():
        raise ValueError(f"{root} is not a prepared dataset: {CARD_FILE} is missing")
    return DatasetCard.from_json(path.read_text())


def is_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks and ``..`` resolved) is ``root`` or lies below it.

    Adapters use it on every file a source's CSV or sheet names, so a listed ``../../etc/passwd``,
    an absolute path or a symlink out of the source is never read.
    """
    root, target = Path(root).resolve(), Path(path).resolve()
    return target == root or root in target.parents


def resolve_reference(root: Path, ref: str) -> tuple[Path, int | None]:
    """Split ``file#row`` and resolve the file inside ``root``.

    Raises ``ValueError`` for absolute paths or paths that escape the root (``..``, symlinks).
    """
    file_part, _, row = str(ref).partition("#")
    if not file_part or Path(file_part).is_absolute():
        raise ValueError(f"reference {ref!r} must be a relative path inside the dataset")
    root = Path(root).resolve()
    target = (root / file_part).resolve()
    if not is_inside(root, target):
        raise ValueError(f"reference {ref!r} points outside the dataset root {root}")
    if row and not row.isdigit():
        raise ValueError(f"reference {ref!r} has a non-numeric row index")
    return target, (int(row) if row else None)


def content_hash(pixels: np.ndarray) -> str:
    """SHA-256 of decoded pixels (shape and dtype included), so re-encodes of one image match."""
    arr = np.ascontiguousarray(pixels)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()
