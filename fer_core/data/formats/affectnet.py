"""AffectNet (manually annotated part): expression, valence/arousal and 68 landmarks per face.

Real layout (``source`` is the folder holding both)::

    Manually_Annotated_file_lists/training.csv     one row per face:
    Manually_Annotated_file_lists/validation.csv     subDirectory_filePath,face_x,face_y,face_width,
                                                     face_height,facial_landmarks,expression,valence,arousal
    Manually_Annotated_Images/<subDirectory_filePath>   e.g. 689/737db2...ca.jpg (JPEG photographs)

``facial_landmarks`` are 68 iBUG points written ``x;y;x;y;...`` (136 floats) in the original image's
pixels; ``expression`` is 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger,
7 Contempt, 8 None, 9 Uncertain, 10 No-Face; ``valence``/``arousal`` lie in [-1, 1] with -2 meaning
"not annotated".

What the adapter does:

* Splits: ``training.csv`` -> ``train`` and ``validation.csv`` -> ``test`` (AffectNet's public
  protocol: its test set is not released, papers report on the validation set). ``val_fraction`` > 0
  holds out a stable share of the training faces as ``val`` (chosen by a hash of the file path).
* Labels: codes 0..6 map onto :data:`labels.EXPRESSIONS`. Contempt (7) is handled by ``contempt``:
  ``"extend"`` (default) appends a ``contempt`` class after the seven -- only when some listed face
  is contempt, so a 7-class export keeps 7 classes -- or ``"drop"``. Codes 8..10 are no expression:
  dropped by default (counted in the card's provenance); ``keep_non_expressions=True`` keeps None and
  Uncertain faces as unlabelled rows (label -1) for their landmarks/valence-arousal (the static data
  gate rejects label -1, so such a dataset is for multi-task experiments outside the gated
  pipeline); No-Face rows are always dropped. A code outside 0..10 raises ``ValueError``.
* Valence/arousal: -2 becomes NaN (the multi-task loss masks NaN); other values are kept verbatim.
* Faces: with ``crop_faces`` (default) the face box, grown by ``margin`` x its size on every side
  and clipped to the image, is cut out and stored losslessly as PNG (no second JPEG generation);
  landmarks are shifted into the crop's pixel frame. A box that is empty after clipping keeps the
  whole image (counted as ``uncropped``). With ``crop_faces=False`` files are copied byte for byte.
  Either way the manifest's ``landmarks`` are pixel coordinates of the stored image.
* An empty ``facial_landmarks`` field gives ``landmarks`` = None (not annotated); a non-empty one that
  is not 136 numbers, a non-integer expression or a non-numeric box/valence raises ``ValueError``.
  A listed image that is missing or cannot be decoded still gets a row (empty ``content_hash``,
  copied as is when present) for the data gate to report.

Stored files: ``images/<subDirectory_filePath>`` (suffix ``.png`` when cropped); ids are the path
without suffix. AffectNet has no subject ids (``subject`` = "").
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from fer_core.data.formats import DataFormat, register_format
from fer_core.data.labels import EXPRESSIONS
from fer_core.data.manifest import DatasetCard, class_counts, content_hash, write_prepared
from fer_core.data.samples import decode_image_file

LISTS_DIR = "Manually_Annotated_file_lists"
IMAGES_DIR = "Manually_Annotated_Images"
LIST_FILES = {"training.csv": "train", "validation.csv": "test"}
COLUMNS = (
    "subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
    "facial_landmarks", "expression", "valence", "arousal",
)
# AffectNet's expression codes, in its own order.
AFFECTNET_CODES: tuple[str, ...] = (
    "neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt", "none", "uncertain", "no_face",
)
CONTEMPT_CODE, NONE_CODE, UNCERTAIN_CODE, NO_FACE_CODE = 7, 8, 9, 10
NOT_ANNOTATED = -2.0
NUM_LANDMARK_VALUES = 136
CONTEMPT_MODES = ("extend", "drop")


def parse_landmarks(text: object, where: str = "") -> list[float] | None:
    """``"x;y;x;y;..."`` -> 136 floats, or None for an empty field; ``ValueError`` otherwise."""
    value = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text).strip()
    if not value:
        return None
    try:
        numbers = [float(v) for v in value.replace(",", ";").split(";") if v.strip()]
    except ValueError:
        raise ValueError(f"{where}facial_landmarks {value[:40]!r}... are not numbers") from None
    if len(numbers) != NUM_LANDMARK_VALUES:
        raise ValueError(f"{where}facial_landmarks hold {len(numbers)} values, expected {NUM_LANDMARK_VALUES}")
    return numbers


def _affect_value(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}valence/arousal {text!r} is not a number") from None
    return math.nan if value == NOT_ANNOTATED else value


def read_list(path: Path) -> pd.DataFrame:
    """One AffectNet list as strings (column names stripped); ``ValueError`` if unreadable or incomplete."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable list
        raise ValueError(f"cannot read AffectNet list {path}: {exc}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"AffectNet list {path} lacks columns {missing}; found {list(table.columns)}")
    return table


def _held_out(key: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _crop_box(box: tuple[float, float, float, float], margin: float, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) exclusive pixel bounds of the grown, clipped face box, or None if empty."""
    x, y, w, h = box
    x0, y0 = math.floor(x - margin * w), math.floor(y - margin * h)
    x1, y1 = math.ceil(x + w + margin * w), math.ceil(y + h + margin * h)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, shape[1]), min(y1, shape[0])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 and w > 0 and h > 0 else None


def adapt(
    source: Path,
    out_dir: Path,
    *,
    name: str,
    contempt: str = "extend",
    keep_non_expressions: bool = False,
    crop_faces: bool = True,
    margin: float = 0.0,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> DatasetCard:
    """Read AffectNet's manually annotated part at ``source`` into a prepared dataset (see module docstring)."""
    source, out_dir = Path(source), Path(out_dir)
    if contempt not in CONTEMPT_MODES:
        raise ValueError(f"contempt must be one of {CONTEMPT_MODES}, got {contempt!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    lists = [(source / LISTS_DIR / f, split) for f, split in LIST_FILES.items() if (source / LISTS_DIR / f).is_file()]
    if not lists:
        raise ValueError(f"no {' or '.join(LIST_FILES)} in {source / LISTS_DIR}")
    tables = [(path, split, read_list(path)) for path, split in lists]

    # Expression codes first, so a bad list fails before anything is copied.
    for path, _, table in tables:
        for index, value in enumerate(table["expression"]):
            text = str(value).strip()
            if not text.isdigit() or int(text) >= len(AFFECTNET_CODES):
                raise ValueError(f"{path} row {index}: expression {value!r} is not an AffectNet code "
                                 f"0..{len(AFFECTNET_CODES) - 1}")
    has_contempt = any((t["expression"].str.strip().astype(int) == CONTEMPT_CODE).any() for _, _, t in tables)
    classes = tuple(EXPRESSIONS) + (("contempt",) if contempt == "extend" and has_contempt else ())
    code_to_label = {code: EXPRESSIONS.index(AFFECTNET_CODES[code]) for code in range(CONTEMPT_CODE)}
    if "contempt" in classes:
        code_to_label[CONTEMPT_CODE] = classes.index("contempt")
    if keep_non_expressions:
        code_to_label[NONE_CODE] = code_to_label[UNCERTAIN_CODE] = -1

    rows: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    uncropped = 0
    for path, list_split, table in tables:
        for index, record in enumerate(table.itertuples(index=False)):
            where = f"{path.name} row {index}: "
            code = int(str(record.expression).strip())
            if code not in code_to_label:
                dropped[AFFECTNET_CODES[code]] = dropped.get(AFFECTNET_CODES[code], 0) + 1
                continue
            relative = str(record.subDirectory_filePath).strip().replace("\\", "/")
            if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
                raise ValueError(f"{where}subDirectory_filePath {relative!r} must be a relative path")
            landmarks = parse_landmarks(record.facial_landmarks, where)
            try:
                box = tuple(float(getattr(record, k)) for k in ("face_x", "face_y", "face_width", "face_height"))
            except ValueError:
                raise ValueError(f"{where}face box is not numeric") from None
            original = source / IMAGES_DIR / relative
            image = None
            if original.is_file():
                try:
                    image = decode_image_file(original)
                except ValueError:
                    image = None  # undecodable: copied as is below, the gate reports it
            crop = _crop_box(box, margin, image.shape) if crop_faces and image is not None else None
            if crop_faces and image is not None and crop is None:
                uncropped += 1
            if crop is not None:
                x0, y0, x1, y1 = crop
                stored_image = np.ascontiguousarray(image[y0:y1, x0:x1])
                stored = Path("images") / Path(relative).with_suffix(".png")
                (out_dir / stored).parent.mkdir(parents=True, exist_ok=True)
                bgr = stored_image if stored_image.ndim == 2 else cv2.cvtColor(stored_image, cv2.COLOR_RGB2BGR)
                if not cv2.imwrite(str(out_dir / stored), bgr):
                    raise ValueError(f"OpenCV could not write {out_dir / stored}")
                if landmarks is not None:
                    shifted = np.asarray(landmarks, np.float64).reshape(-1, 2) - np.array([x0, y0], np.float64)
                    landmarks = shifted.reshape(-1).tolist()
                digest = content_hash(stored_image)
            else:
                stored = Path("images") / relative
                digest = content_hash(image) if image is not None else ""
                if original.is_file():
                    (out_dir / stored).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(original, out_dir / stored)
            split = list_split
            if split == "train" and val_fraction and _held_out(relative, val_fraction, seed):
                split = "val"
            label = code_to_label[code]
            rows.append(
                {
                    "id": Path(relative).with_suffix("").as_posix(),
                    "task": "static",
                    "source": f"{IMAGES_DIR}/{relative}",
                    "split": split,
                    "path": stored.as_posix(),
                    "label": label,
                    "subject": "",
                    "onset": -1,
                    "apex": -1,
                    "offset": -1,
                    "num_frames": 1,
                    "content_hash": digest,
                    "label_name": classes[label] if label >= 0 else AFFECTNET_CODES[code],
                    "valence": _affect_value(str(record.valence).strip(), where),
                    "arousal": _affect_value(str(record.arousal).strip(), where),
                    "landmarks": landmarks,
                }
            )
    if not rows:
        raise ValueError(f"the AffectNet lists in {source / LISTS_DIR} hold no usable faces")
    df = pd.DataFrame(rows)
    card = DatasetCard(
        name=name,
        task="static",
        source_format="affectnet",
        classes=classes,
        splits=tuple(s for s in ("train", "val", "test") if s in set(df["split"])),
        counts=class_counts(df, classes),
        num_samples=len(df),
        provenance={
            "lists": [p.name for p, _ in lists], "protocol": "training.csv -> train, validation.csv -> test",
            "contempt": contempt, "keep_non_expressions": keep_non_expressions, "dropped": dropped,
            "crop_faces": crop_faces, "margin": margin, "uncropped": uncropped,
            "val_fraction": val_fraction, "seed": seed,
        },
    )
    write_prepared(out_dir, df, card)
    return card


def _format_number(value: float) -> str:
    return f"{value:.3f}"


def write_synthetic(
    out_dir: Path,
    *,
    seed: int = 0,
    size: int = 70,
    difficulty: float = 0.0,
    image_size: int = 64,
    num_subjects: int = 8,
    canvas_scale: float = 1.5,
    missing_va_fraction: float = 0.0,
    missing_landmarks_fraction: float = 0.0,
) -> Path:
    """Render SynthFACS faces into AffectNet's layout and return the folder to hand to :func:`adapt`.

    Each ``image_size`` face is pasted at a random place of a ``canvas_scale`` times larger photograph
    (JPEG, quality 95), and its square is the face box; landmarks and valence/arousal are the
    generator's exact ones, shifted into the photograph. About 30 % of the subjects go to
    ``validation.csv``, the rest to ``training.csv`` (subject-disjoint). Faceless renders (difficulty
    > 0) are listed as No-Face (code 10, valence/arousal -2), as AffectNet does. ``missing_va_fraction``
    / ``missing_landmarks_fraction`` of the faces get -2 valence/arousal / an empty landmark field, so
    the masking of partial annotations is exercised.
    """
    from fer_core.data.synthfacs import SynthFACS

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if canvas_scale < 1.0:
        raise ValueError(f"canvas_scale must be >= 1, got {canvas_scale}")
    for option, value in (("missing_va_fraction", missing_va_fraction), ("missing_landmarks_fraction", missing_landmarks_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{option} must be in [0, 1], got {value}")
    sample = SynthFACS(seed, image_size, difficulty).expression_set(size, num_subjects)
    rng = np.random.default_rng(seed + 7_000)
    subjects = sorted({int(s) for s in sample.subjects})
    validation_subjects = set(subjects[: max(1, round(0.3 * len(subjects)))]) if len(subjects) > 1 else set()
    side = int(round(image_size * canvas_scale))
    to_code = {EXPRESSIONS.index(name): code for code, name in enumerate(AFFECTNET_CODES[:CONTEMPT_CODE])}

    root = Path(out_dir)
    records: dict[str, list[dict[str, Any]]] = {"training.csv": [], "validation.csv": []}
    for i, face in enumerate(sample.images):
        background = rng.uniform(40, 215, 3)
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[:] = background.astype(np.uint8)
        x, y = (int(v) for v in rng.integers(0, side - image_size + 1, 2))
        canvas[y : y + image_size, x : x + image_size] = face
        relative = f"{i // 500 + 1}/{hashlib.sha1(f'{seed}:{i}'.encode()).hexdigest()}.jpg"
        path = root / IMAGES_DIR / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise ValueError(f"OpenCV could not write {path}")
        if sample.has_face[i]:
            code = to_code[int(sample.labels[i])]
            valence, arousal = (float(v) for v in sample.valence_arousal[i])
            points = sample.landmarks[i].astype(np.float64) + np.array([x, y], np.float64)
            landmarks = ";".join(_format_number(v) for v in points.reshape(-1))
            if rng.uniform() < missing_va_fraction:
                valence = arousal = NOT_ANNOTATED
            if rng.uniform() < missing_landmarks_fraction:
                landmarks = ""
        else:
            code, valence, arousal, landmarks = NO_FACE_CODE, NOT_ANNOTATED, NOT_ANNOTATED, ""
        list_name = "validation.csv" if int(sample.subjects[i]) in validation_subjects else "training.csv"
        records[list_name].append({
            "subDirectory_filePath": relative, "face_x": x, "face_y": y, "face_width": image_size,
            "face_height": image_size, "facial_landmarks": landmarks, "expression": code,
            "valence": _format_number(valence), "arousal": _format_number(arousal),
        })
    lists = root / LISTS_DIR
    lists.mkdir(parents=True, exist_ok=True)
    for list_name, rows in records.items():
        pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(lists / list_name, index=False)
    return root


FORMAT = register_format(
    DataFormat(
        name="affectnet",
        task="static",
        description="AffectNet: Manually_Annotated_file_lists/{training,validation}.csv + Manually_Annotated_Images/ "
        "(expression, valence/arousal, 68 landmarks)",
        adapt=adapt,
        write_synthetic=write_synthetic,
    )
)
