"""DFEW (Dynamic Facial Expressions in the Wild): one manifest row per video clip.

Real layout (``source`` is the folder holding both)::

    Clip/clip_224x224/00001/00001.jpg ...       aligned frame folders, or
    Clip/original/00001.mp4                     the original videos
    EmoLabel_DataSplit/train(single-labeled)/set_1.csv ... set_5.csv
    EmoLabel_DataSplit/test(single-labeled)/set_1.csv ... set_5.csv
                                                columns video_name,label; label 1..7 in
                                                labels.DFEW_CLASSES order

The five folds are the official 5-fold protocol: every single-labelled clip is a test clip in exactly
one ``test(single-labeled)/set_k.csv``, which becomes its ``fold`` column (-1 if it only appears in
train lists). Option ``fold`` (1..5, default 1) selects the split: ``test`` where ``fold == k``,
else ``train``. Clips in no list (DFEW's multi-labelled clips) are not included.

Labels are mapped from DFEW's 1-based ids to :data:`labels.EXPRESSIONS` indices (the card's
classes); ``label_name`` keeps DFEW's name. A label outside 1..7 or a clip listed with two different
labels raises ``ValueError``; a listed clip without frames/video still becomes a row whose path
does not exist, for the data gate to report. DFEW has no subject ids (``subject`` = "") and no
onset/apex/offset (-1). Frame folders are copied to ``clips/<video>`` and videos to
``clips/<video>.mp4``; ``content_hash`` hashes the stacked decoded frames.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_core.data.formats import DataFormat, register_format
from fer_core.data.formats.micro import clip_hash_and_frames, copy_clip
from fer_core.data.labels import DFEW_CLASSES, EXPRESSIONS
from fer_core.data.manifest import DatasetCard, class_counts, write_prepared
from fer_core.data.samples import VIDEO_SUFFIXES

NUM_FOLDS = 5
LABEL_DIR = "EmoLabel_DataSplit"
TRAIN_DIR = "train(single-labeled)"
TEST_DIR = "test(single-labeled)"
FRAMES_DIR = Path("Clip") / "clip_224x224"
VIDEOS_DIR = Path("Clip") / "original"
CLIP_SOURCES = ("auto", "frames", "video")


def _video_name(value: object, csv: Path) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"\d+(?:\.0+)?", text):
        raise ValueError(f"{csv}: video_name {value!r} is not a DFEW clip number")
    return f"{int(float(text)):05d}"


def read_split_csv(csv: Path) -> dict[str, int]:
    """video name ("00001") -> DFEW label id (1..7) from one ``set_k.csv``."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable list
        raise ValueError(f"cannot read DFEW split file {csv}: {exc}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("video_name", "label") if c not in table.columns]
    if missing:
        raise ValueError(f"DFEW split file {csv} lacks columns {missing}; found {list(table.columns)}")
    labels: dict[str, int] = {}
    for video, label in zip(table["video_name"], table["label"]):
        text = str(label).strip()
        if not re.fullmatch(r"\d+(?:\.0+)?", text) or not 1 <= int(float(text)) <= len(DFEW_CLASSES):
            raise ValueError(f"{csv}: label {label!r} of clip {video} is not a DFEW label 1..{len(DFEW_CLASSES)}")
        labels[_video_name(video, csv)] = int(float(text))
    return labels


def read_dfew_lists(source: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(video -> DFEW label id, video -> fold in which it is a test clip) from all split CSVs."""
    label_dir = source / LABEL_DIR
    if not label_dir.is_dir():
        raise ValueError(f"no {LABEL_DIR}/ in {source}")
    labels: dict[str, int] = {}
    folds: dict[str, int] = {}
    found = 0
    for kind in (TEST_DIR, TRAIN_DIR):
        for k in range(1, NUM_FOLDS + 1):
            csv = label_dir / kind / f"set_{k}.csv"
            if not csv.is_file():
                continue
            found += 1
            for video, label in read_split_csv(csv).items():
                if labels.setdefault(video, label) != label:
                    raise ValueError(f"clip {video} has labels {labels[video]} and {label} in {LABEL_DIR}")
                if kind == TEST_DIR:
                    folds[video] = k
    if not found:
        raise ValueError(f"no set_k.csv in {label_dir}/{TRAIN_DIR} or {label_dir}/{TEST_DIR}")
    return labels, folds


def adapt(
    source: Path,
    out_dir: Path,
    *,
    name: str,
    fold: int = 1,
    clips: str = "auto",
) -> DatasetCard:
    """Read DFEW at ``source`` into a prepared dataset (see module docstring).

    ``fold``: 1..5, the official fold whose test list becomes ``test``; ``clips``: "frames"
    (``Clip/clip_224x224``), "video" (``Clip/original``) or "auto" (frames if present).
    """
    source, out_dir = Path(source), Path(out_dir)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 1 <= fold <= NUM_FOLDS:
        raise ValueError(f"fold must be an int in 1..{NUM_FOLDS}, got {fold!r}")
    if clips not in CLIP_SOURCES:
        raise ValueError(f"clips must be one of {CLIP_SOURCES}, got {clips!r}")
    labels, folds = read_dfew_lists(source)
    use_video = clips == "video" or (clips == "auto" and not (source / FRAMES_DIR).is_dir())

    rows: list[dict[str, Any]] = []
    for video in sorted(labels):
        if use_video:
            candidates = [source / VIDEOS_DIR / f"{video}{s}" for s in VIDEO_SUFFIXES]
            original = next((c for c in candidates if c.is_file()), candidates[0])
            ref = f"clips/{original.name}"
            if original.is_file():
                (out_dir / "clips").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(original, out_dir / ref)
        else:
            original = source / FRAMES_DIR / video
            ref = f"clips/{video}"
            if original.is_dir():
                copy_clip(original, out_dir / ref)
        digest, frames = clip_hash_and_frames(out_dir, ref)
        dfew_name = DFEW_CLASSES[labels[video] - 1]
        clip_fold = folds.get(video, -1)
        rows.append(
            {
                "id": video,
                "task": "dynamic",
                "source": original.relative_to(source).as_posix(),
                "split": "test" if clip_fold == fold else "train",
                "path": ref,
                "label": EXPRESSIONS.index(dfew_name),
                "subject": "",
                "onset": -1,
                "apex": -1,
                "offset": -1,
                "num_frames": 0 if frames is None else len(frames),
                "content_hash": digest,
                "label_name": dfew_name,
                "fold": clip_fold,
            }
        )
    if not rows:
        raise ValueError(f"the split files in {source / LABEL_DIR} list no clips")
    df = pd.DataFrame(rows)
    card = DatasetCard(
        name=name,
        task="dynamic",
        source_format="dfew",
        classes=EXPRESSIONS,
        splits=tuple(s for s in ("train", "test") if s in set(df["split"])),
        counts=class_counts(df, EXPRESSIONS),
        num_samples=len(df),
        provenance={"fold": int(fold), "clips": "video" if use_video else "frames", "protocol": "5-fold"},
    )
    write_prepared(out_dir, df, card)
    return card


def write_synthetic(
    out_dir: Path,
    *,
    seed: int = 0,
    size: int = 15,
    difficulty: float = 0.0,
    image_size: int = 64,
    num_frames: int = 8,
    num_subjects: int = 5,
) -> Path:
    """DFEW layout with SynthFACS clips as ``Clip/clip_224x224/<video>/NNNNN.jpg`` frame folders
    (``image_size`` square rather than 224) and the 10 split CSVs. Folds are assigned by subject
    (subject i -> fold i % 5 + 1), so no identity is in both a fold's train and test lists."""
    import cv2

    from fer_core.data.synthfacs import SynthFACS

    clip_set = SynthFACS(seed, image_size, difficulty).dynamic_clips(size, num_frames, num_subjects)
    root = Path(out_dir)
    unique = sorted({str(s) for s in clip_set.subjects})
    records = []
    for i, frames in enumerate(clip_set.clips):
        video = f"{i + 1:05d}"
        folder = root / FRAMES_DIR / video
        folder.mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(frames):
            bgr = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR)
            if not cv2.imwrite(str(folder / f"{t + 1:05d}.jpg"), bgr):
                raise ValueError(f"OpenCV could not write a frame into {folder}")
        expression = str(clip_set.label_names[int(clip_set.labels[i])])
        records.append(
            {
                "video_name": i + 1,
                "label": DFEW_CLASSES.index(expression) + 1,
                "fold": unique.index(str(clip_set.subjects[i])) % NUM_FOLDS + 1,
            }
        )
    table = pd.DataFrame(records)
    for k in range(1, NUM_FOLDS + 1):
        for kind, chosen in ((TEST_DIR, table["fold"] == k), (TRAIN_DIR, table["fold"] != k)):
            folder = root / LABEL_DIR / kind
            folder.mkdir(parents=True, exist_ok=True)
            table.loc[chosen, ["video_name", "label"]].to_csv(folder / f"set_{k}.csv", index=False)
    return root


FORMAT = register_format(
    DataFormat(
        name="dfew",
        task="dynamic",
        description="DFEW: Clip/clip_224x224/<video>/ frames or Clip/original/<video>.mp4 + EmoLabel_DataSplit",
        adapt=adapt,
        write_synthetic=write_synthetic,
    )
)
