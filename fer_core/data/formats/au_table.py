"""Action-unit tables (EmotioNet / DISFA / BP4D style) and AU co-training sets.

Real layouts accepted at ``source``:

* a single table: a CSV file (or a folder holding exactly one ``*.csv``) with an image-path column
  (``image``, ``image_path``, ``path``, ``file``, ``filename``, ``img`` or ``image_name``; or option
  ``image_column``) and AU columns (``AU1``, ``AU01``, ``au_12`` ...); optional ``subject`` and
  ``split`` columns. Every row is ``label_set="clean"``.
* a co-training folder (this project's layout, the one :func:`write_synthetic` produces)::

      clean.csv            labelled images (label_set "clean")
      noisy.csv            weakly/automatically labelled images (label_set "noisy"), optional
      noisy_truth.csv      the true AUs of the noisy rows (synthetic data only) -> ``true_aus``
      unlabelled/          images without labels (label_set "unlabelled", aus all -1), optional
      images/...           the files the CSVs reference

Image paths are relative to the CSV's folder. Files are copied to ``images/<path below source>``.
A path that leaves the source folder (``../x``, an absolute path, a symlink out of it) is refused
with ``ValueError``: a table must not make the adapter read files outside the dataset it describes.
With ``allow_outside_source=True`` such files are copied to ``images/external/<row>_<name>``. A listed image
that does not exist still becomes a row (its path does not exist, ``content_hash`` "") so the data
gate can report it.

AU values: 0/1 are kept; the unknown codes 9 and 999 and empty cells become -1. Other values are
kept as they are (the gate flags them) unless ``intensity_threshold`` is given (DISFA's 0..5
intensities: ``>= threshold`` -> 1, else 0). The manifest's ``aus`` lists follow the card's
``au_names`` (default :data:`labels.AU_NAMES`): an AU of ``au_names`` missing from the table is -1,
a table AU outside ``au_names`` is ignored (listed in the card's provenance).

``role="test"`` makes an evaluation-only test set (e.g. DISFA's test subjects for a network trained
on BP4D, scored by ``fer evaluate``): a single table only, every row goes to the ``test`` split
(a ``split`` column, if any, must say ``test`` or nothing), the card records ``provenance["role"]``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from fer_core.data.formats import DataFormat, register_format
from fer_core.data.labels import AU_NAMES
from fer_core.data.manifest import DatasetCard, content_hash, is_inside, write_prepared
from fer_core.data.samples import IMAGE_SUFFIXES, decode_image_file

IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "img", "image_name")
UNKNOWN_CODES = (9, 999)
CLEAN_FILE, NOISY_FILE, TRUTH_FILE, UNLABELLED_DIR = "clean.csv", "noisy.csv", "noisy_truth.csv", "unlabelled"


def au_name(column: str) -> str | None:
    """Canonical AU name of a column header (``AU01``, ``au_1``, ``AU 1`` -> ``AU1``), else None."""
    match = re.fullmatch(r"au[\s_-]?0*(\d+)", str(column).strip(), flags=re.IGNORECASE)
    return f"AU{int(match.group(1))}" if match else None


def _pick_column(columns: Sequence[str], wanted: Sequence[str]) -> str | None:
    lowered = {str(c).strip().lower(): c for c in columns}
    return next((lowered[w] for w in wanted if w in lowered), None)


def read_au_table(
    csv: Path,
    au_names: Sequence[str],
    *,
    image_column: str | None = None,
    intensity_threshold: int | None = None,
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """(table, aus int64 (N, len(au_names)), table AUs ignored) of one AU CSV."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable table
        raise ValueError(f"cannot read AU table {csv}: {exc}") from exc
    image_col = image_column if image_column is not None else _pick_column(table.columns, IMAGE_COLUMNS)
    if image_col is None or image_col not in table.columns:
        raise ValueError(f"AU table {csv} has no image column ({image_column or ', '.join(IMAGE_COLUMNS)})")
    au_columns = {au_name(c): c for c in table.columns if au_name(c)}
    if not au_columns:
        raise ValueError(f"AU table {csv} has no AU columns (AU1, AU2, ...); found {list(table.columns)}")
    aus = np.full((len(table), len(au_names)), -1, dtype=np.int64)
    for j, name in enumerate(au_names):
        if name not in au_columns:
            continue
        column = au_columns[name]
        text = table[column].str.strip()
        values = pd.to_numeric(text.where(text != "", None), errors="coerce")
        unparsable = values.isna() & (text != "")
        if unparsable.any():
            row = int(np.flatnonzero(unparsable.to_numpy())[0])
            raise ValueError(f"{csv} row {row}: {column} value {table[column].iloc[row]!r} is not a number")
        if (values.dropna() != values.dropna().round()).any():
            raise ValueError(f"{csv}: {column} holds non-integer values")
        codes = np.array(values.fillna(-1).astype(np.int64), dtype=np.int64)  # writable copy
        unknown = np.isin(codes, UNKNOWN_CODES) | (codes == -1)
        if intensity_threshold is not None:
            codes = (codes >= intensity_threshold).astype(np.int64)
        codes[unknown] = -1
        aus[:, j] = codes
    ignored = sorted(set(au_columns) - set(au_names), key=lambda a: int(a[2:]))
    table = table.rename(columns={image_col: "__image__"})
    return table, aus, ignored


def _copy_image(source_root: Path, image_ref: str, out_dir: Path, row_id: str,
                allow_outside_source: bool = False) -> tuple[str, str, str]:
    """(manifest path, source reference, content hash) for one listed image."""
    original = (source_root / image_ref).resolve()
    root = source_root.resolve()
    if is_inside(root, original) and original != root:
        relative = original.relative_to(root).as_posix()
        ref = f"images/{relative}"
    else:
        if not allow_outside_source:
            raise ValueError(f"image {image_ref!r} (row {row_id}) resolves to {original}, outside the source folder "
                             f"{root}; refusing to read it (pass allow_outside_source=True to copy such files)")
        relative = image_ref
        ref = f"images/external/{re.sub(r'[^A-Za-z0-9_.-]', '_', row_id)}_{Path(image_ref).name}"
    digest = ""
    if original.is_file():
        target = out_dir / ref
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(original, target)
        try:
            digest = content_hash(decode_image_file(target))
        except ValueError:
            digest = ""  # undecodable: keep the row for the data gate
    return ref, relative, digest


def _rows(
    label_set: str,
    table: pd.DataFrame,
    aus: np.ndarray,
    csv_root: Path,
    out_dir: Path,
    true_aus: dict[str, list[int]] | None,
    allow_outside_source: bool = False,
) -> list[dict[str, Any]]:
    subject_col = _pick_column(table.columns, ("subject", "subject_id"))
    split_col = _pick_column(table.columns, ("split",))
    rows = []
    for i, image_ref in enumerate(table["__image__"].str.strip()):
        row_id = f"{label_set}/{Path(image_ref).with_suffix('').as_posix()}"
        ref, relative, digest = _copy_image(csv_root, image_ref, out_dir, f"{label_set}{i}", allow_outside_source)
        rows.append(
            {
                "id": row_id,
                "task": "au",
                "source": relative,
                "split": table[split_col].iloc[i].strip().lower() if split_col else "train",
                "path": ref,
                "label": -1,
                "subject": table[subject_col].iloc[i].strip() if subject_col else "",
                "onset": -1,
                "apex": -1,
                "offset": -1,
                "num_frames": 1,
                "content_hash": digest,
                "label_name": "",
                "aus": aus[i].tolist(),
                "true_aus": None if true_aus is None else true_aus.get(image_ref),
                "label_set": label_set,
            }
        )
    return rows


def _unlabelled_rows(folder: Path, source: Path, out_dir: Path, num_aus: int,
                     allow_outside_source: bool = False) -> list[dict[str, Any]]:
    rows = []
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for file in files:
        relative = file.relative_to(source).as_posix()
        ref, _, digest = _copy_image(source, relative, out_dir, relative, allow_outside_source)
        rows.append(
            {
                "id": Path(relative).with_suffix("").as_posix(),
                "task": "au",
                "source": relative,
                "split": "train",
                "path": ref,
                "label": -1,
                "subject": "",
                "onset": -1,
                "apex": -1,
                "offset": -1,
                "num_frames": 1,
                "content_hash": digest,
                "label_name": "",
                "aus": [-1] * num_aus,
                "true_aus": None,
                "label_set": "unlabelled",
            }
        )
    return rows


def adapt(
    source: Path,
    out_dir: Path,
    *,
    name: str,
    au_names: Sequence[str] | None = None,
    image_column: str | None = None,
    intensity_threshold: int | None = None,
    allow_outside_source: bool = False,
    role: str = "train",
) -> DatasetCard:
    """Read an AU table or co-training folder at ``source`` (see module docstring).

    ``allow_outside_source``: copy listed images that lie outside ``source`` instead of refusing them.
    ``role``: ``"train"`` (splits as found) or ``"test"`` (an evaluation-only test set).
    """
    source, out_dir = Path(source), Path(out_dir)
    if role not in ("train", "test"):
        raise ValueError(f"role must be 'train' or 'test', got {role!r}")
    names = tuple(AU_NAMES if au_names is None else au_names)
    bad_names = [n for n in names if au_name(n) != n]
    if not names or bad_names:
        raise ValueError(f"au_names must be canonical AU names like 'AU1'; got {bad_names or names}")
    options = {"image_column": image_column, "intensity_threshold": intensity_threshold}

    rows: list[dict[str, Any]] = []
    ignored: set[str] = set()
    if source.is_dir() and (source / CLEAN_FILE).is_file():
        if role == "test":
            raise ValueError(f"{source} is a co-training folder (clean/noisy/unlabelled), a training set; "
                             "an evaluation-only test set is a single AU table")
        layout = "co-training"
        truth: dict[str, list[int]] | None = None
        if (source / TRUTH_FILE).is_file():
            truth_table, truth_aus, _ = read_au_table(source / TRUTH_FILE, names, **options)
            truth = {ref.strip(): a.tolist() for ref, a in zip(truth_table["__image__"], truth_aus)}
        for label_set, file in (("clean", CLEAN_FILE), ("noisy", NOISY_FILE)):
            if (source / file).is_file():
                table, aus, skipped = read_au_table(source / file, names, **options)
                ignored.update(skipped)
                rows += _rows(label_set, table, aus, source, out_dir, truth if label_set == "noisy" else None,
                              allow_outside_source)
        if (source / UNLABELLED_DIR).is_dir():
            rows += _unlabelled_rows(source / UNLABELLED_DIR, source, out_dir, len(names), allow_outside_source)
    else:
        layout = "table"
        if source.is_dir():
            tables = sorted(source.glob("*.csv"))
            if len(tables) != 1:
                raise ValueError(f"{source} must hold {CLEAN_FILE} or exactly one AU table CSV; found {len(tables)}")
            csv = tables[0]
        else:
            csv = source
        table, aus, skipped = read_au_table(csv, names, **options)
        ignored.update(skipped)
        rows += _rows("clean", table, aus, csv.parent, out_dir, None, allow_outside_source)
    if not rows:
        raise ValueError(f"no AU rows or images found at {source}")

    df = pd.DataFrame(rows)
    if role == "test":
        named = sorted(set(df["split"]) - {"test"}) if _pick_column(table.columns, ("split",)) else []
        if named:
            raise ValueError(f"role=test puts every row in the test split, but the table's split column says {named}")
        df["split"] = "test"
    if df["true_aus"].isna().all():
        df = df.drop(columns="true_aus")
    card = DatasetCard(
        name=name,
        task="au",
        source_format="au_table",
        au_names=names,
        splits=tuple(s for s in ("train", "val", "test") if s in set(df["split"])) or ("train",),
        num_samples=len(df),
        provenance={
            "layout": layout,
            "label_sets": {k: int(v) for k, v in df["label_set"].value_counts().sort_index().items()},
            "ignored_aus": sorted(ignored, key=lambda a: int(a[2:])),
            "unknown_codes": list(UNKNOWN_CODES),
            "intensity_threshold": intensity_threshold,
            "role": role,
        },
    )
    write_prepared(out_dir, df, card)
    return card


def write_synthetic(
    out_dir: Path,
    *,
    seed: int = 0,
    size: int = 40,
    difficulty: float = 0.0,
    image_size: int = 64,
    flip_rate: float = 0.2,
    unknown_rate: float = 0.05,
) -> Path:
    """Render a SynthFACS AU co-training set in the co-training layout and return its folder.

    ``size`` images: half clean, a quarter noisy (labels flipped at ``flip_rate``), a quarter
    unlabelled. A share ``unknown_rate`` of clean/noisy AU cells is written as an unknown code
    (999 as EmotioNet does, every third one 9 as BP4D/DISFA do). ``noisy_truth.csv`` holds the
    generator's true AUs of the noisy rows.
    """
    import cv2

    from fer_core.data.synthfacs import SynthFACS

    n_clean = max(1, size // 2)
    n_noisy = max(1, size // 4)
    n_unlabelled = max(0, size - n_clean - n_noisy)
    sets = SynthFACS(seed, image_size, difficulty).au_sets(n_clean, n_noisy, n_unlabelled, flip_rate)
    rng = np.random.default_rng(seed + 5)
    root = Path(out_dir)

    def write_images(folder: str, images: np.ndarray) -> list[str]:
        refs = []
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            ref = f"{folder}/{i:06d}.png"
            bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
            if not cv2.imwrite(str(root / ref), bgr):
                raise ValueError(f"OpenCV could not write {root / ref}")
            refs.append(ref)
        return refs

    def table(refs: list[str], labels: np.ndarray, subjects: Sequence[Any], mark_unknown: bool) -> pd.DataFrame:
        codes = np.asarray(labels, dtype=np.int64).copy()
        if mark_unknown:
            unknown = rng.random(codes.shape) < unknown_rate
            codes[unknown] = np.where(np.arange(unknown.sum()) % 3 == 2, 9, 999)
        frame = pd.DataFrame(codes, columns=list(AU_NAMES))
        frame.insert(0, "subject", [str(s) for s in subjects])
        frame.insert(0, "image", refs)
        return frame

    clean_refs = write_images("images/clean", sets.clean.images)
    table(clean_refs, sets.clean.labels, sets.clean.subjects, True).to_csv(root / CLEAN_FILE, index=False)
    noisy_refs = write_images("images/noisy", sets.noisy.images)
    table(noisy_refs, sets.noisy.labels, sets.noisy.subjects, True).to_csv(root / NOISY_FILE, index=False)
    table(noisy_refs, sets.noisy.true_labels, sets.noisy.subjects, False).to_csv(root / TRUTH_FILE, index=False)
    if len(sets.unlabelled.images):
        write_images(UNLABELLED_DIR, sets.unlabelled.images)
    return root


FORMAT = register_format(
    DataFormat(
        name="au_table",
        task="au",
        description="AU tables (image path + AU1.. columns, 9/999 unknown) or clean/noisy/unlabelled co-training sets",
        adapt=adapt,
        write_synthetic=write_synthetic,
    )
)
