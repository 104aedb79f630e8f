"""Magnified pairs: (onset, apex, magnified apex, α) samples for pre-training the motion magnifier.

The micro-expression method applies a *learned* magnifier ``f`` (Oh et al. 2018); ``f`` is trained on
pairs whose magnified frame is known. Layout read by :func:`adapt` (real pairs, e.g. Oh et al.'s
synthetic training set re-exported, plug in here)::

    pairs.csv                       id, subject, alpha[, label_name]
    pairs/<id>/onset.png            the onset (reference) frame
    pairs/<id>/apex.png             the apex frame
    pairs/<id>/magnified.png        the apex with its motion from the onset magnified by (1 + alpha)

Prepared dataset: task ``micro``, one row per pair, its three frames stored as a frame folder
``clips/<id>/`` in the order onset, apex, magnified (``onset`` = 0, ``apex`` = 1, ``offset`` = 2),
α in the ``magnification`` column, ``label`` the expression class when ``label_name`` is given
(else -1: a pair needs no class). ``test_subjects`` become the ``test`` split (default: none, the
training task then holds out subjects itself).

:func:`write_synthetic` renders exact pairs with :meth:`SynthFACS.magnified_pairs`: same identity,
pose, scene and noise, only the AU intensities of the magnified frame scaled by (1 + α), so the
ground truth is the magnified *expression*, not a pixel extrapolation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from fer_core.data.formats import DataFormat, register_format
from fer_core.data.manifest import DatasetCard, class_counts, content_hash, write_prepared
from fer_core.data.samples import read_clip

ROLES = ("onset", "apex", "magnified")
FORMAT_NAME = "magnified_pairs"


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    if not cv2.imwrite(str(path), bgr):
        raise ValueError(f"OpenCV could not write {path}")


def adapt(source: Path, out_dir: Path, *, name: str, test_subjects: Sequence[Any] | None = None) -> DatasetCard:
    """Read a magnified-pairs folder at ``source`` into a prepared ``micro`` dataset at ``out_dir``."""
    import cv2

    source, out_dir = Path(source), Path(out_dir)
    table_path = source / "pairs.csv"
    if not table_path.is_file():
        raise ValueError(f"{source} has no pairs.csv (expected columns id, subject, alpha[, label_name])")
    table = pd.read_csv(table_path, dtype={"id": str, "subject": str})
    missing = sorted({"id", "subject", "alpha"} - set(table.columns))
    if missing:
        raise ValueError(f"{table_path} lacks columns {missing}")
    alphas = pd.to_numeric(table["alpha"], errors="coerce")
    if alphas.isna().any() or (alphas < 0).any():
        raise ValueError(f"{table_path}: alpha must be a number >= 0 in every row")
    classes = tuple(sorted(set(table["label_name"].dropna().astype(str)))) if "label_name" in table else ()
    wanted = {str(s) for s in (test_subjects or ())}
    unknown = sorted(wanted - set(table["subject"]))
    if unknown:
        raise ValueError(f"test_subjects {unknown} are not in {table_path}")
    rows = []
    for record, alpha in zip(table.to_dict("records"), alphas):
        pair_id = str(record["id"])
        ref = f"clips/{pair_id}"
        frames = []
        for role in ROLES:
            image = cv2.imread(str(source / "pairs" / pair_id / f"{role}.png"), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"{source / 'pairs' / pair_id / f'{role}.png'} is missing or unreadable")
            frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        if len({f.shape for f in frames}) != 1:
            raise ValueError(f"pair {pair_id}: onset, apex and magnified differ in size")
        for index, frame in enumerate(frames):
            _write_png(out_dir / ref / f"{index:05d}.png", frame)
        label_name = str(record.get("label_name", "")) if classes and pd.notna(record.get("label_name")) else ""
        rows.append({
            "id": pair_id, "task": "micro", "source": f"pairs/{pair_id}",
            "split": "test" if str(record["subject"]) in wanted else "train", "path": ref,
            "label": classes.index(label_name) if label_name else -1, "subject": str(record["subject"]),
            "onset": 0, "apex": 1, "offset": 2, "num_frames": len(ROLES),
            "content_hash": content_hash(read_clip(out_dir, ref)), "label_name": label_name,
            "magnification": float(alpha),
        })
    if not rows:
        raise ValueError(f"{table_path} lists no pairs")
    df = pd.DataFrame(rows)
    card = DatasetCard(
        name=name, task="micro", source_format=FORMAT_NAME, classes=classes,
        splits=tuple(s for s in ("train", "test") if s in set(df["split"])), subject_independent=True,
        counts=class_counts(df, classes) if classes else {}, num_samples=len(df),
        provenance={"frame_roles": list(ROLES), "pairs": True},
    )
    write_prepared(out_dir, df, card)
    return card


def write_synthetic(
    out_dir: Path,
    *,
    seed: int = 0,
    size: int = 64,
    difficulty: float = 0.0,
    image_size: int = 64,
    num_subjects: int = 8,
    alpha_range: tuple[float, float] = (1.0, 13.0),
) -> Path:
    """SynthFACS exact magnified pairs in the layout :func:`adapt` reads."""
    from fer_core.data.synthfacs import SynthFACS

    pairs = SynthFACS(seed, image_size, difficulty).magnified_pairs(size, alpha_range, num_subjects=num_subjects)
    root = Path(out_dir)
    records = []
    for i in range(size):
        pair_id = f"pair{i:05d}"
        for role in ROLES:
            _write_png(root / "pairs" / pair_id / f"{role}.png", getattr(pairs, role)[i])
        records.append({"id": pair_id, "subject": f"s{int(pairs.subjects[i]):02d}", "alpha": float(pairs.alpha[i]),
                        "label_name": pairs.label_names[int(pairs.labels[i])]})
    pd.DataFrame(records).to_csv(root / "pairs.csv", index=False)
    return root


register_format(
    DataFormat(
        name=FORMAT_NAME,
        task="micro",
        description="magnified pairs: pairs.csv + pairs/<id>/{onset,apex,magnified}.png (magnifier pre-training)",
        adapt=adapt,
        write_synthetic=write_synthetic,
    )
)
