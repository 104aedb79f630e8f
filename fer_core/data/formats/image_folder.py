"""Class-per-folder image trees: Kaggle FER2013 folders, CK+48, RAF-DB-style exports.

Recognised layouts (``source`` is the folder above them)::

    <split>/<class>/<image>   Kaggle FER2013 ("train/angry/Training_3908.jpg"), RAF-DB exports
    <class>/<image>           CK+48 ("anger/S010_004_00000017.png"), no split folders

Split folders are recognised by name (train/training, val/valid/validation/publictest,
test/testing/privatetest, case-insensitive); either every top-level folder is a split or none is.
Without split folders every image is ``train`` unless ``test_fraction`` > 0 holds some out: whole
subjects when subjects are known, else single images, chosen by a hash of the subject or file name,
so the split is stable across runs and machines and independent of the folder listing order.

Class folder names map to :data:`labels.EXPRESSIONS` through common synonyms (anger/angry,
happiness/happy, sadness/sad, surprised, fearful, ...; :data:`CLASS_SYNONYMS`). A folder that names
no expression (CK+'s ``contempt``) is handled by ``unknown_classes``: ``"extend"`` (default: append it
to the card's classes after the 7 expressions, so no image is lost and indices 0..6 keep their
meaning), ``"drop"`` (skip its images, counted in the card's provenance) or ``"error"``.
Numbered class folders (RAF-DB's ``1``..``7``) need ``folder_names`` (e.g. :data:`RAFDB_FOLDERS`).

Evaluation-only test sets (``role="test"``, e.g. CK+48 as a cross-dataset test of a network trained
on FER2013): every image goes to the ``test`` split (split folders are refused, so nothing is silently
merged), the card records ``provenance["role"] = "test"`` and the data gate skips the train-split
class-balance checks (a test set may lack classes, CK+ has no neutral) while keeping every file,
label and leakage check. Classes keep the canonical 7-class indices so a network's outputs line up.
``label_map`` names folder→class explicitly (``anger:angry,sadness:sad`` or a mapping; applied
before the synonyms; a target that is no expression is refused). ``unknown_classes="unknown"`` keeps
every unmapped folder's images as one extra class ``unknown`` (evaluation reports what the network
predicts for them but leaves them out of the metrics); ``"drop"`` skips them (counted).

Images are copied byte-for-byte to ``images/<path below source>``. Subjects come from file names
via ``subject_pattern`` (default: CK+'s ``S010_...``); otherwise ``subject`` is "". An image that
cannot be decoded still gets a row (with an empty ``content_hash``) so the data gate can see it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from fer_core.data.formats import DataFormat, register_format
from fer_core.data.labels import EXPRESSIONS
from fer_core.data.manifest import DatasetCard, class_counts, content_hash, is_inside, write_prepared
from fer_core.data.samples import IMAGE_SUFFIXES, decode_image_file

SPLIT_ALIASES: Mapping[str, str] = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "publictest": "val",
    "test": "test", "testing": "test", "privatetest": "test",
}
CLASS_SYNONYMS: Mapping[str, str] = {
    **{e: e for e in EXPRESSIONS},
    "anger": "angry", "angry": "angry", "mad": "angry",
    "disgusted": "disgust", "disgusting": "disgust",
    "fearful": "fear", "afraid": "fear", "scared": "fear",
    "happiness": "happy", "joy": "happy", "happy": "happy",
    "sadness": "sad", "unhappy": "sad",
    "surprised": "surprise", "suprise": "surprise",  # the misspelling occurs in public exports
    "neutrality": "neutral", "calm": "neutral",
}
# RAF-DB's basic-emotion ids (1-based, its own order), as used by its class-per-folder exports.
RAFDB_FOLDERS: Mapping[str, str] = {
    "1": "surprise", "2": "fear", "3": "disgust", "4": "happy", "5": "sad", "6": "angry", "7": "neutral",
}
UNKNOWN_CLASS_MODES = ("extend", "drop", "error", "unknown")
ROLES = ("train", "test")  # "train": a training set (splits as found); "test": evaluation only
UNKNOWN_CLASS = "unknown"
CKPLUS_SUBJECT_PATTERN = r"^(S\d{3})_"


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def canonical_class(folder_name: str, folder_names: Mapping[str, str] | None = None) -> str | None:
    """The EXPRESSIONS name a class folder stands for, or None if it names no expression."""
    key = folder_name.strip()
    if folder_names and key in folder_names:
        key = folder_names[key]
    return CLASS_SYNONYMS.get(key.lower().replace("-", "_").replace(" ", "_"))


def parse_label_map(value: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"anger:angry,sadness:sad"`` (or a mapping) as {folder name: canonical class}.

    Raises ``ValueError`` for a malformed pair or a target that names no expression.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for item in str(value).split(","):
            folder, sep, target = item.partition(":")
            if not sep or not folder.strip() or not target.strip():
                raise ValueError(f"label_map entry {item!r} must look like FOLDER:CLASS (e.g. anger:angry)")
            pairs.append((folder.strip(), target.strip()))
    mapping = {}
    for folder, target in pairs:
        cls = CLASS_SYNONYMS.get(target.lower())
        if cls is None:
            raise ValueError(f"label_map target {target!r} (for {folder!r}) is none of {EXPRESSIONS}")
        mapping[folder] = cls
    return mapping


def _held_out(key: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _find_layout(source: Path) -> list[tuple[str | None, Path]]:
    """[(split or None, class folder)] for the tree at ``source``."""
    top = _visible_dirs(source)
    if not top:
        raise ValueError(f"{source} holds no class folders")
    is_split = [p.name.lower() in SPLIT_ALIASES for p in top]
    if all(is_split):
        return [(SPLIT_ALIASES[s.name.lower()], c) for s in top for c in _visible_dirs(s)]
    if any(is_split):
        names = [p.name for p in top]
        raise ValueError(f"{source} mixes split folders and class folders: {names}")
    return [(None, c) for c in top]


def adapt(
    source: Path,
    out_dir: Path,
    *,
    name: str,
    unknown_classes: str = "extend",
    folder_names: Mapping[str, str] | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    subject_pattern: str | None = CKPLUS_SUBJECT_PATTERN,
    role: str = "train",
    label_map: str | Mapping[str, str] | None = None,
) -> DatasetCard:
    """Read a class-per-folder tree at ``source`` into a prepared dataset (see module docstring).

    ``folder_names`` maps folder names to class names first (e.g. :data:`RAFDB_FOLDERS`);
    ``test_fraction``/``seed`` hold out a stable share when there are no split folders;
    ``subject_pattern`` is a regex whose first group, searched in the file name, is the subject;
    ``role="test"`` makes an evaluation-only test set; ``label_map`` maps folders to classes explicitly.
    """
    source, out_dir = Path(source), Path(out_dir)
    if unknown_classes not in UNKNOWN_CLASS_MODES:
        raise ValueError(f"unknown_classes must be one of {UNKNOWN_CLASS_MODES}, got {unknown_classes!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if not source.is_dir():
        raise ValueError(f"image_folder source {source} must be a folder")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "test" and test_fraction:
        raise ValueError("role=test puts every image in the test split; drop test_fraction")
    if unknown_classes == UNKNOWN_CLASS and role != "test":
        raise ValueError("unknown_classes=unknown is for evaluation-only sets: add role=test (or use extend)")
    explicit = parse_label_map(label_map)
    subject_regex = re.compile(subject_pattern) if subject_pattern else None
    layout = _find_layout(source)
    if role == "test" and layout[0][0] is not None:
        raise ValueError(f"role=test expects class folders only, but {source} has split folders")

    # Resolve class folders first, so an unknown one fails before anything is copied.
    folder_class: dict[Path, str | None] = {}
    extra: list[str] = []
    for _, folder in layout:
        cls = explicit.get(folder.name) or canonical_class(folder.name, folder_names)
        if cls is None:
            if folder.name.isdigit() and not folder_names:
                raise ValueError(
                    f"class folder {folder.name!r} is a number; pass folder_names= (e.g. RAFDB_FOLDERS)"
                )
            if unknown_classes == "error":
                raise ValueError(f"class folder {folder.name!r} names no expression of {EXPRESSIONS}")
            if unknown_classes in ("extend", UNKNOWN_CLASS):
                cls = UNKNOWN_CLASS if unknown_classes == UNKNOWN_CLASS else folder.name.strip().lower()
                if cls not in extra:
                    extra.append(cls)
        folder_class[folder] = cls
    classes = tuple(EXPRESSIONS) + tuple(sorted(extra))

    rows: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    for split, folder in layout:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        cls = folder_class[folder]
        if cls is None:
            dropped[folder.name] = dropped.get(folder.name, 0) + len(files)
            continue
        for file in files:
            if not is_inside(source, file):  # a symlink out of the tree: never read files beyond the source
                raise ValueError(f"{file} links to {file.resolve()}, outside the source folder {source.resolve()}")
            relative = file.relative_to(source).as_posix()
            match = subject_regex.search(file.name) if subject_regex else None
            subject = match.group(1) if match else ""
            if role == "test":
                split_of_file = "test"
            elif split is None:
                key = subject or relative
                split_of_file = "test" if test_fraction and _held_out(key, test_fraction, seed) else "train"
            else:
                split_of_file = split
            target = out_dir / "images" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
            try:
                digest = content_hash(decode_image_file(target))
            except ValueError:
                digest = ""  # undecodable: keep the row, the data gate reports it
            rows.append(
                {
                    "id": Path(relative).with_suffix("").as_posix(),
                    "task": "static",
                    "source": relative,
                    "split": split_of_file,
                    "path": f"images/{relative}",
                    "label": classes.index(cls),
                    "subject": subject,
                    "onset": -1,
                    "apex": -1,
                    "offset": -1,
                    "num_frames": 1,
                    "content_hash": digest,
                    "label_name": cls,
                }
            )
    if not rows:
        raise ValueError(f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    df = pd.DataFrame(rows)
    present = tuple(s for s in ("train", "val", "test") if s in set(df["split"]))
    card = DatasetCard(
        name=name,
        task="static",
        source_format="image_folder",
        classes=classes,
        splits=present,
        subject_independent=bool(test_fraction and (df["subject"] != "").all()),
        counts=class_counts(df, classes),
        num_samples=len(df),
        provenance={
            "layout": "split/class" if layout[0][0] is not None else "class",
            "unknown_classes": unknown_classes,
            "dropped_images": dropped,
            "test_fraction": test_fraction,
            "seed": seed,
            "role": role,
            "label_map": explicit,
        },
    )
    write_prepared(out_dir, df, card)
    return card


# Folder names the synthetic writer uses, deliberately not the canonical ones (Kaggle FER2013 and
# CK+ spell them differently), so the synonym mapping is exercised.
_SYNTHETIC_FOLDERS = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")


def write_synthetic(
    out_dir: Path,
    *,
    seed: int = 0,
    size: int = 48,
    difficulty: float = 0.0,
    image_size: int = 48,
    num_subjects: int = 6,
    with_splits: bool = True,
    image_format: str = "png",
) -> Path:
    """Render SynthFACS faces as a class-per-folder tree and return its root.

    ``with_splits``: Kaggle FER2013 layout (``train/<class>/``, ``test/<class>/``, subjects split
    70/30); else CK+48 layout (``<class>/S<subject>_<seq>_<frame>.png``). ``image_format``: png | jpg.
    """
    import cv2
    import numpy as np

    from fer_core.data.synthfacs import SynthFACS

    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    sample = SynthFACS(seed, image_size, difficulty).expression_set(size, num_subjects)
    subjects = [str(s) for s in sample.subjects]
    unique = sorted(set(subjects))
    test_subjects = set(unique[: max(1, round(0.3 * len(unique)))]) if len(unique) > 1 else set()
    root = Path(out_dir)
    for i, (image, label) in enumerate(zip(sample.images, sample.labels)):
        subject_number = unique.index(subjects[i]) + 10
        file_name = f"S{subject_number:03d}_{i // 100 + 1:03d}_{i:08d}.{image_format}"
        folder = root / _SYNTHETIC_FOLDERS[int(label)]
        if with_splits:
            folder = root / ("test" if subjects[i] in test_subjects else "train") / _SYNTHETIC_FOLDERS[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(folder / file_name), bgr):
            raise ValueError(f"OpenCV could not write {folder / file_name}")
    return root


FORMAT = register_format(
    DataFormat(
        name="image_folder",
        task="static",
        description="class-per-folder images: Kaggle FER2013 (split/class/), CK+48 (class/), RAF-DB exports",
        adapt=adapt,
        write_synthetic=write_synthetic,
    )
)
