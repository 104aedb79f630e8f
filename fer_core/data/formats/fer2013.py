"""FER2013 (Kaggle ``fer2013.csv``) and its FER+ relabelling (Microsoft ``fer2013new.csv``).

Real layout::

    fer2013.csv[.gz]   emotion,pixels,Usage
                       emotion 0..6 in labels.EXPRESSIONS order; pixels = 2304 space-separated grey
                       values (48x48, row-major); Usage Training | PublicTest | PrivateTest
    fer2013new.csv     Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,
                       contempt,unknown,NF -- 10 votes per row, same row order as fer2013.csv;
                       an empty ``Image name`` is a row FER+ dropped

The prepared dataset packs all kept images into ``arrays/pixels.npy`` (N, 48, 48) uint8 and each
manifest row references ``arrays/pixels.npy#<row>``. Row ids are ``fer%07d`` of the row's position in
``fer2013.csv``, the same numbering as FER+'s ``Image name`` (``fer0000000.png``).

Usage maps Training->train, PublicTest->val, PrivateTest->test. Any other Usage value is kept
verbatim (lower-cased) so the data gate can flag it; an emotion outside 0..6 is kept as is for the
same reason. Only what cannot be parsed (missing columns, a non-integer emotion, a row without
exactly 2304 values in 0..255) raises ``ValueError``.

FER+ (option ``ferplus=<fer2013new.csv>``): the card's classes become the 7 FER2013 expressions in
their usual order followed by ``contempt`` (:data:`FERPLUS_CLASSES`), so label indices stay
compatible with FER2013-trained models. A row's label is the plurality of its 10 votes; ties go to
the first column in FER+'s file order, which puts the emotions before ``unknown`` and ``NF``. Rows
with an empty ``Image name``, or whose plurality is ``unknown`` or ``NF``, are dropped (the FER+
authors' own rule). ``ferplus_mode="soft"`` additionally stores ``soft_label``: the votes over the 8
emotions normalised to sum to 1 (``unknown``/``NF`` votes excluded).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_core.data.formats import DataFormat, register_format
from fer_core.data.labels import EXPRESSIONS
from fer_core.data.manifest import DatasetCard, class_counts, content_hash, write_prepared

IMAGE_SIDE = 48
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
CSV_NAMES = ("fer2013.csv", "fer2013.csv.gz")
FERPLUS_NAME = "fer2013new.csv"
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
SPLIT_TO_USAGE = {split: usage for usage, split in USAGE_TO_SPLIT.items()}
FERPLUS_EMOTIONS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
FERPLUS_COLUMNS = ("Usage", "Image name", *FERPLUS_EMOTIONS, "unknown", "NF")
FERPLUS_CLASSES: tuple[str, ...] = (*EXPRESSIONS, "contempt")
# FER+ column -> index into FERPLUS_CLASSES.
_FERPLUS_TO_CLASS = {
    "neutral": FERPLUS_CLASSES.index("neutral"),
    "happiness": FERPLUS_CLASSES.index("happy"),
    "surprise": FERPLUS_CLASSES.index("surprise"),
    "sadness": FERPLUS_CLASSES.index("sad"),
    "anger": FERPLUS_CLASSES.index("angry"),
    "disgust": FERPLUS_CLASSES.index("disgust"),
    "fear": FERPLUS_CLASSES.index("fear"),
    "contempt": FERPLUS_CLASSES.index("contempt"),
}
FERPLUS_MODES = ("majority", "soft")
PIXELS_FILE = "arrays/pixels.npy"


def find_csv(source: Path) -> Path:
    """``source`` itself if it is a file, else the ``fer2013.csv[.gz]`` inside the folder."""
    source = Path(source)
    if source.is_file():
        return source
    for candidate in CSV_NAMES:
        if (source / candidate).is_file():
            return source / candidate
    raise ValueError(f"no {' or '.join(CSV_NAMES)} in {source}")


def read_fer2013_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse ``fer2013.csv[.gz]`` into (emotions int64 (N,), usages str (N,), pixels uint8 (N,48,48)).

    Errors name the data row (0-based, the number in the ``fer%07d`` ids) and its line in the file.
    """
    table = _read_table(path)
    missing = [c for c in ("emotion", "pixels", "Usage") if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks FER2013 columns {missing}; found {list(table.columns)}")
    emotion_text = table["emotion"].astype(str).str.strip()
    bad = ~emotion_text.str.fullmatch(r"-?\d+").fillna(False).astype(bool)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{path} {_where(row)}: emotion {table['emotion'].iloc[row]!r} is not an integer")
    emotions = emotion_text.astype(np.int64).to_numpy()
    # One np.fromstring per row (C parser, ~1.5 s for the full file) also checks each row's length,
    # which a single parse of the joined column could not.
    pixels = np.empty((len(table), IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    for i, text in enumerate(table["pixels"].to_numpy()):
        values = np.fromstring(text, dtype=np.int32, sep=" ")
        if values.size != NUM_PIXELS:
            raise ValueError(
                f"{path} {_where(i)}: pixels must be {NUM_PIXELS} space-separated values, got {values.size}"
            )
        outside = np.flatnonzero((values < 0) | (values > 255))
        if outside.size:
            k = int(outside[0])
            raise ValueError(
                f"{path} {_where(i)}: pixel {k} is {int(values[k])}, outside 0..255 "
                f"({outside.size} such value{'s' if outside.size > 1 else ''} in the row)"
            )
        pixels[i] = values.reshape(IMAGE_SIDE, IMAGE_SIDE)
    return emotions, table["Usage"].astype(str).str.strip().to_numpy(dtype=object), pixels


# A real row is at most ~9.2 KB (2304 values of up to 3 digits); longer lines are not FER2013 rows.
MAX_LINE_BYTES = 16 * 1024
_BLOCK_BYTES = 4 << 20  # pyarrow's parse block: any real row fits many times over


def _where(row: int) -> str:
    """``row R (line L)``: data rows count from 0 (the ids' numbering), lines from 1 with the header."""
    return f"row {row} (line {row + 2})"


def _read_table(path: Path) -> pd.DataFrame:
    """The CSV with FER2013's columns read as text (pyarrow must not infer ``4`` as ``4.0``)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    text_columns = {c: pa.string() for c in ("emotion", "pixels", "Usage")}
    try:
        # pyarrow's reader is ~4x faster than pandas' C engine on the 290 MB of pixel strings.
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=_BLOCK_BYTES),
            convert_options=pacsv.ConvertOptions(column_types=text_columns, strings_can_be_null=False),
        )
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path} as a FER2013 CSV: {_diagnose(path, exc)}") from None
    return table.to_pandas()


def _diagnose(path: Path, exc: Exception) -> str:
    """Our own reason for a reader failure: pyarrow's messages carry tuning hints (block size) and
    whole rows of pixels, neither of which tells a user what is wrong with the file."""
    import gzip

    try:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if len(line) > MAX_LINE_BYTES:
                    return (f"line {number} is {len(line) / 1e6:.1f} MB long; a FER2013 row is at most "
                            f"~{NUM_PIXELS * 4 // 1000} KB (emotion, {NUM_PIXELS} pixel values, Usage)")
    except (OSError, EOFError) as scan_error:
        return f"{type(scan_error).__name__}: {scan_error}"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    message = re.sub(r"\s*\(try to [^)]*\)", "", message)  # drop reader-tuning hints
    return message if len(message) <= 200 else message[:197] + "..."


def read_ferplus_votes(path: Path, num_rows: int, usages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``fer2013new.csv``: (kept bool (N,), votes int64 (N, 10) in FER+ column order)."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read FER+ file {path}: {exc}") from exc
    missing = [c for c in FERPLUS_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"FER+ file {path} lacks columns {missing}; found {list(table.columns)}")
    if len(table) != num_rows:
        raise ValueError(f"FER+ file {path} has {len(table)} rows but the FER2013 CSV has {num_rows}")
    # FER+ repeats FER2013's Usage column: a mismatch means the two files are not row-aligned.
    mismatch = table["Usage"].str.strip().to_numpy(dtype=object) != usages
    if mismatch.any():
        row = int(np.flatnonzero(mismatch)[0])
        raise ValueError(f"FER+ file {path} is not row-aligned with FER2013 (Usage differs at row {row})")
    vote_columns = list(FERPLUS_COLUMNS[2:])
    try:
        votes = table[vote_columns].apply(lambda col: pd.to_numeric(col.str.strip())).to_numpy(np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"FER+ file {path} has non-integer votes: {exc}") from exc
    kept = table["Image name"].str.strip().to_numpy(dtype=object) != ""
    return kept, votes


def _ferplus_labels(
    votes: np.ndarray, kept: np.ndarray, mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(keep mask, labels into FERPLUS_CLASSES, soft labels or None) from the raw votes."""
    plurality = votes.argmax(axis=1)  # first maximum wins: emotions precede unknown / NF
    keep = kept & (plurality < len(FERPLUS_EMOTIONS)) & (votes.max(axis=1) > 0)
    to_class = np.array([_FERPLUS_TO_CLASS[e] for e in FERPLUS_EMOTIONS])
    labels = np.where(plurality < len(FERPLUS_EMOTIONS), to_class[np.minimum(plurality, 7)], -1)
    soft = None
    if mode == "soft":
        emotion_votes = np.zeros((len(votes), len(FERPLUS_CLASSES)), dtype=np.float64)
        emotion_votes[:, to_class] = votes[:, : len(FERPLUS_EMOTIONS)]
        totals = emotion_votes.sum(axis=1, keepdims=True)
        soft = np.divide(emotion_votes, totals, out=np.zeros_like(emotion_votes), where=totals > 0)
    return keep, labels, soft


def adapt(
    source: Path,
    out_dir: Path,
    *,
    name: str,
    ferplus: Path | str | None = None,
    ferplus_mode: str = "majority",
) -> DatasetCard:
    """Read ``fer2013.csv[.gz]`` (a file, or a folder holding it) into a prepared dataset.

    ``ferplus``: path to ``fer2013new.csv`` to relabel with FER+ votes (see module docstring);
    ``ferplus_mode``: ``"majority"`` (hard plurality labels) or ``"soft"`` (also ``soft_label``).
    """
    if ferplus_mode not in FERPLUS_MODES:
        raise ValueError(f"ferplus_mode must be one of {FERPLUS_MODES}, got {ferplus_mode!r}")
    csv_path = find_csv(source)
    emotions, usages, pixels = read_fer2013_csv(csv_path)
    row_ids = np.arange(len(emotions))
    labels, classes, soft = emotions, EXPRESSIONS, None
    provenance: dict[str, Any] = {"file": csv_path.name, "rows_in_file": int(len(emotions))}
    if ferplus is not None:
        ferplus_path = Path(ferplus)
        if ferplus_path.is_dir():
            ferplus_path = ferplus_path / FERPLUS_NAME
        if not ferplus_path.is_file():
            raise ValueError(f"FER+ file {ferplus_path} does not exist")
        kept, votes = read_ferplus_votes(ferplus_path, len(emotions), usages)
        keep, labels, soft = _ferplus_labels(votes, kept, ferplus_mode)
        row_ids, labels = row_ids[keep], labels[keep]
        soft = soft[keep] if soft is not None else None
        usages, pixels = usages[keep], pixels[keep]
        classes = FERPLUS_CLASSES
        provenance.update(
            ferplus_file=ferplus_path.name,
            ferplus_mode=ferplus_mode,
            ferplus_dropped_by_fer_plus=int((~kept).sum()),
            ferplus_dropped_unknown_or_nf=int((kept & ~keep).sum()),
        )

    out_dir = Path(out_dir)
    (out_dir / PIXELS_FILE).parent.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / PIXELS_FILE, pixels)
    splits = np.array([USAGE_TO_SPLIT.get(u, str(u).lower()) for u in usages], dtype=object)
    n = len(row_ids)
    df = pd.DataFrame(
        {
            "id": [f"fer{i:07d}" for i in row_ids],
            "task": "static",
            "source": [f"{csv_path.name}#{i}" for i in row_ids],
            "split": splits,
            "path": [f"{PIXELS_FILE}#{k}" for k in range(n)],
            "label": labels.astype(np.int64),
            "subject": "",
            "onset": -1,
            "apex": -1,
            "offset": -1,
            "num_frames": 1,
            "content_hash": [content_hash(image) for image in pixels],
            "label_name": [classes[y] if 0 <= y < len(classes) else "" for y in labels],
        },
        index=pd.RangeIndex(n),
    )
    if soft is not None:
        df["soft_label"] = [row.tolist() for row in soft]
    present = [s for s in ("train", "val", "test") if s in set(splits)]
    card = DatasetCard(
        name=name,
        task="static",
        source_format="fer2013",
        classes=tuple(classes),
        splits=tuple(present),
        counts=class_counts(df, tuple(classes)),
        num_samples=n,
        provenance=provenance,
    )
    write_prepared(out_dir, df, card)
    return card


def _synthetic_votes(labels: np.ndarray, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """10 FER+ votes per image: most on the true expression, the rest spread (more with difficulty)."""
    # FERPLUS_CLASSES starts with EXPRESSIONS, so an expression index is also a class index.
    class_to_column = {cls: FERPLUS_EMOTIONS.index(col) for col, cls in _FERPLUS_TO_CLASS.items()}
    votes = np.zeros((len(labels), len(FERPLUS_COLUMNS) - 2), dtype=np.int64)
    p_true = 0.85 - 0.45 * float(difficulty)
    for i, label in enumerate(labels):
        true_column = class_to_column[int(label)]
        agree = rng.binomial(10, p_true)
        votes[i, true_column] += agree
        # Dissenting votes land on any of the 8 emotions or "unknown" (never NF: the face is there).
        others = rng.integers(0, len(FERPLUS_EMOTIONS) + 1, size=10 - agree)
        np.add.at(votes[i], others, 1)
    return votes


def write_synthetic(
    out_dir: Path,
    *,
    seed: int = 0,
    size: int = 64,
    difficulty: float = 0.0,
    image_size: int = IMAGE_SIDE,
    num_subjects: int = 8,
    ferplus: bool = True,
    compress: bool = False,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> Path:
    """Render ``size`` SynthFACS faces as ``fer2013.csv`` (grey 48x48) and, with ``ferplus``, a
    row-aligned ``fer2013new.csv`` with synthetic votes; returns the folder to hand to :func:`adapt`.

    About 2% of the FER+ rows are written the way FER+ marks a dropped image (empty ``Image name``,
    all 10 votes on ``NF``), so that path is exercised too.
    """
    if image_size != IMAGE_SIDE:
        raise ValueError(f"FER2013 images are {IMAGE_SIDE}x{IMAGE_SIDE}; got image_size={image_size}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    import cv2

    from fer_core.data.synthfacs import SynthFACS

    sample = SynthFACS(seed, image_size, difficulty).expression_set(size, num_subjects)
    greys = np.stack([cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY) for im in sample.images])
    rng = np.random.default_rng(seed + 2013)
    fractions = np.asarray(split_fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"split_fractions must be three non-negative numbers, got {split_fractions}")
    split_index = rng.choice(3, size=size, p=fractions / fractions.sum())
    usages = np.array([SPLIT_TO_USAGE[("train", "val", "test")[k]] for k in split_index])
    labels = np.asarray(sample.labels, dtype=np.int64)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        {
            "emotion": labels,
            "pixels": [" ".join(map(str, g.reshape(-1).tolist())) for g in greys],
            "Usage": usages,
        }
    )
    csv_path = out_dir / ("fer2013.csv.gz" if compress else "fer2013.csv")
    table.to_csv(csv_path, index=False)
    if ferplus:
        votes = _synthetic_votes(labels, difficulty, rng)
        dropped = rng.random(size) < 0.02
        votes[dropped] = 0
        votes[dropped, -1] = 10
        names = np.where(dropped, "", [f"fer{i:07d}.png" for i in range(size)])
        plus = pd.DataFrame(votes, columns=list(FERPLUS_COLUMNS[2:]))
        plus.insert(0, "Image name", names)
        plus.insert(0, "Usage", usages)
        plus.to_csv(out_dir / FERPLUS_NAME, index=False)
    return out_dir


FORMAT = register_format(
    DataFormat(
        name="fer2013",
        task="static",
        description="Kaggle fer2013.csv[.gz] (emotion,pixels,Usage), optional FER+ fer2013new.csv votes",
        adapt=adapt,
        write_synthetic=write_synthetic,
    )
)
