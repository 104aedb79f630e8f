"""Micro-expression datasets: CASME II, SAMM and SMIC-HS (one manifest row per clip).

Real layouts (``source`` is the folder holding them)::

    CASME II  CASME2-RAW/sub01/EP02_01f/img46.jpg ...   frames, numbered as in the coding sheet
              CASME2-coding-*.xlsx (or .csv)           Subject, Filename, OnsetFrame, ApexFrame,
                                                       OffsetFrame, Action Units, Estimated Emotion
    SAMM      SAMM/006/006_1_2/006_05562.jpg ...        frames, numbered as in the sheet
              SAMM_Micro_FACS_Codes_v2.xlsx             title rows, then Subject, Filename,
                                                       Onset Frame, Apex Frame, Offset Frame, ...,
                                                       Action Units, ..., Estimated Emotion
    SMIC-HS   HS/s1/micro/{positive,negative,surprise}/s1_ne_01/image106330.bmp ...   (no sheet)

Sheets are read with their header row found by content (SAMM puts title rows above it), and
column names are compared without spaces or case, so ``OnsetFrame`` and ``Onset Frame`` both work.

Frame numbers -> indices: a sheet's onset/apex/offset are the numbers in the frame *file names*
(``img46.jpg`` is frame 46, ``006_05562.jpg`` frame 5562). The manifest stores indices INTO the
clip's naturally sorted frame list (:func:`fer_core.data.samples.frame_files`), i.e. the position of
the file whose trailing number equals the sheet's value; -1 if the sheet says ``/`` (a few CASME II
apexes) or no file carries that number, so the data gate can see it. ``estimate_missing_apex=True``
fills unknown apexes with :func:`fer_core.data.preprocess.estimate_apex` instead. SMIC has no
annotation: onset = 0, offset = last frame, apex estimated with ``estimate_apex`` ("diff" method).

Classes: CASME II's 5-class protocol (:data:`labels.CASME2_CLASSES`); its rare ``fear``/``sadness``
clips are dropped (``other_emotions="drop"``, the usual 5-class protocol) or merged into ``others``.
SAMM defaults to ``classes="composite"``, the MEGC 2019 composite 3 classes
(:data:`labels.SMIC_CLASSES`: positive = happiness, negative = anger, contempt, disgust, fear,
repression, sadness, surprise = surprise; ``Other`` dropped), because several of its 8 estimated
emotions hold under ten clips; ``classes="samm5"`` is the 5-class option (:data:`SAMM5_CLASSES`: the
emotions with at least 10 clips, as the micro-expression method's rule drops the rest);
``classes="samm"`` keeps all 8 (:data:`SAMM_CLASSES`). CASME II also
accepts ``classes="composite"``. SMIC's
classes are its folder names. An emotion name outside these lists raises ``ValueError``.

Frame folders are copied to ``clips/<path below source>``. Protocol: leave-one-subject-out, so the
card is ``subject_independent`` and every row is ``train`` unless ``test_subjects=[...]`` moves
whole subjects to ``test``. A sheet row whose frame folder is missing still becomes a row (its path
does not exist, ``num_frames`` 0) for the data gate to report. ``content_hash`` is
:func:`manifest.content_hash` of the stacked decoded frames (``read_clip`` of the copied folder).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from fer_core.data.formats import DataFormat, register_format
from fer_core.data.labels import CASME2_CLASSES, SMIC_CLASSES
from fer_core.data.manifest import DatasetCard, class_counts, content_hash, is_inside, write_prepared
from fer_core.data.preprocess import estimate_apex
from fer_core.data.samples import frame_files, read_clip

SAMM_CLASSES: tuple[str, ...] = (
    "anger", "contempt", "disgust", "fear", "happiness", "other", "sadness", "surprise",
)
# SAMM's 5-class protocol: the estimated emotions with at least 10 clips in SAMM (anger 57,
# contempt 12, happiness 26, other 26, surprise 15); disgust (9), fear (8) and sadness (6) are dropped.
SAMM5_CLASSES: tuple[str, ...] = ("anger", "contempt", "happiness", "other", "surprise")
COMPOSITE: dict[str, str] = {
    "happiness": "positive",
    "anger": "negative", "contempt": "negative", "disgust": "negative", "fear": "negative",
    "repression": "negative", "sadness": "negative",
    "surprise": "surprise",
}
CASME2_EXTRA_EMOTIONS = ("fear", "sadness")
SHEET_COLUMNS = ("subject", "filename", "onsetframe", "apexframe", "offsetframe", "estimatedemotion")
UNKNOWN_FRAME_MARKS = ("", "/", "-", "nan", "n/a", "none")
CASME2_SHEET_PATTERNS = ("CASME2-coding-*.xlsx", "CASME2-coding-*.xls", "CASME2-coding-*.csv")
SAMM_SHEET_PATTERNS = ("SAMM_Micro_FACS_Codes*.xlsx", "SAMM_Micro_FACS_Codes*.xls", "SAMM_Micro_FACS_Codes*.csv")
CASME2_FRAME_FOLDERS = ("CASME2-RAW", "CASME2_RAW", "CASME2_RAW_selected", "CASME2-RAW-selected", "Cropped")
SAMM_FRAME_FOLDERS = ("SAMM",)
SMIC_ABBREVIATIONS = {"positive": "po", "negative": "ne", "surprise": "sur"}


# ---------------------------------------------------------------------------------------------
# Sheets
# ---------------------------------------------------------------------------------------------


def _column_key(name: object) -> str:
    return re.sub(r"\s+", "", str(name)).lower()


def read_coding_sheet(path: Path) -> pd.DataFrame:
    """A coding sheet (.xlsx/.xls/.csv) as strings, columns keyed without spaces/case
    (``onsetframe``...). The header is the first row naming all of :data:`SHEET_COLUMNS`."""
    try:
        if path.suffix.lower() == ".csv":
            raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
        else:
            raw = pd.read_excel(path, header=None, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable sheet
        raise ValueError(f"cannot read coding sheet {path}: {exc}") from exc
    raw = raw.fillna("")
    for row_index in range(len(raw)):
        keys = [_column_key(v) for v in raw.iloc[row_index]]
        if all(c in keys for c in SHEET_COLUMNS):
            body = raw.iloc[row_index + 1 :].copy()
            body.columns = keys
            body = body.loc[:, ~pd.Index(keys).duplicated()]
            body = body.map(lambda v: str(v).strip())
            # Trailing blank rows (and spreadsheet notes below the table) have no Filename.
            return body[body["filename"] != ""].reset_index(drop=True)
    raise ValueError(f"coding sheet {path} has no header row with columns {list(SHEET_COLUMNS)}")


def _frame_number(text: str, *, sheet: Path, row: int, column: str) -> int | None:
    """The sheet's frame number, None where the sheet marks it unknown."""
    text = str(text).strip()
    if text.lower() in UNKNOWN_FRAME_MARKS:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{sheet.name} row {row}: {column} {text!r} is not a frame number") from None
    if value != int(value):
        raise ValueError(f"{sheet.name} row {row}: {column} {text!r} is not a whole frame number")
    return int(value)


def _find_one(source: Path, patterns: Sequence[str], what: str) -> Path:
    if source.is_file():
        return source
    for pattern in patterns:
        found = sorted(source.glob(pattern)) or sorted(source.glob(f"*/{pattern}"))
        if found:
            return found[0]
    raise ValueError(f"no {what} ({' or '.join(patterns)}) in {source}")


def _frames_root(source: Path, candidates: Sequence[str], frames_dir: str | None) -> Path:
    if frames_dir is not None:
        if Path(frames_dir).is_absolute() or ".." in Path(frames_dir).parts:
            raise ValueError(f"frames_dir must be a folder name below {source}, got {frames_dir!r}")
        root = source / frames_dir
        if not root.is_dir():
            raise ValueError(f"frames_dir {root} is not a folder")
        return root
    for name in candidates:
        if (source / name).is_dir():
            return source / name
    return source  # subject folders directly below the source


# ---------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------


def trailing_number(path: Path) -> int | None:
    """The frame number in a frame file's name (``img46.jpg`` -> 46, ``006_05562.jpg`` -> 5562)."""
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else None


def copy_clip(frames_folder: Path, target: Path) -> list[Path]:
    """Copy a frame folder's image files to ``target``; returns the source frames in order."""
    files = frame_files(frames_folder)
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, target / file.name)
    return files


def clip_hash_and_frames(out_dir: Path, ref: str) -> tuple[str, np.ndarray | None]:
    """(content hash of the stacked decoded frames, frames) of a copied clip; ("", None) if unreadable."""
    try:
        frames = read_clip(out_dir, ref)
    except ValueError:
        return "", None
    return content_hash(frames), frames


def _index_of(numbers: list[int | None], frame: int | None) -> int:
    if frame is None or frame not in numbers:
        return -1
    return numbers.index(frame)


def _check_test_subjects(
    test_subjects: Sequence[Any] | None, present: set[str], normalise: Callable[[Any], str]
) -> set[str]:
    if not test_subjects:
        return set()
    wanted = {normalise(s) for s in test_subjects}
    unknown = sorted(wanted - present)
    if unknown:
        raise ValueError(f"test_subjects {unknown} are not in the dataset; subjects: {sorted(present)}")
    return wanted


def _card(
    name: str, source_format: str, classes: tuple[str, ...], df: pd.DataFrame, provenance: dict[str, Any]
) -> DatasetCard:
    splits = tuple(s for s in ("train", "test") if s in set(df["split"])) or ("train",)
    return DatasetCard(
        name=name,
        task="micro",
        source_format=source_format,
        classes=classes,
        splits=splits,
        subject_independent=True,
        counts=class_counts(df, classes),
        num_samples=len(df),
        provenance={"protocol": "leave-one-subject-out", **provenance},
    )


def _clip_row(subject: str, clip: str, source: str, test: bool, ref: str, label: int, label_name: str,
              onset: int, apex: int, offset: int, num_frames: int, digest: str) -> dict[str, Any]:
    """One manifest row of a micro-expression clip (all three datasets share this shape)."""
    return {
        "id": f"{subject}/{clip}", "task": "micro", "source": source, "split": "test" if test else "train",
        "path": ref, "label": label, "subject": subject, "onset": onset, "apex": apex, "offset": offset,
        "num_frames": num_frames, "content_hash": digest, "label_name": label_name,
    }


def _rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    columns = (
        "id", "task", "source", "split", "path", "label", "subject", "onset", "apex", "offset",
        "num_frames", "content_hash", "label_name",
    )
    return pd.DataFrame(rows, columns=list(columns))


# ---------------------------------------------------------------------------------------------
# CASME II and SAMM: sheet + frame folders
# ---------------------------------------------------------------------------------------------


def casme2_subject(value: object) -> str:
    """CASME II subject id as its folder name: 1, "01", "sub01" -> "sub01"."""
    text = str(value).strip()
    digits = re.fullmatch(r"(?:sub)?0*(\d+)(?:\.0+)?", text, flags=re.IGNORECASE)
    if not digits:
        raise ValueError(f"CASME II subject {value!r} is not a subject number")
    return f"sub{int(digits.group(1)):02d}"


def samm_subject(value: object) -> str:
    """SAMM subject id as its folder name: 6, "006" -> "006"."""
    text = str(value).strip()
    digits = re.fullmatch(r"0*(\d+)(?:\.0+)?", text)
    if not digits:
        raise ValueError(f"SAMM subject {value!r} is not a subject number")
    return f"{int(digits.group(1)):03d}"


def _label_scheme(dataset: str, classes: str, other_emotions: str) -> tuple[tuple[str, ...], dict[str, str | None]]:
    """(card classes, sheet emotion -> class name or None to drop)."""
    if classes == "composite":
        mapping: dict[str, str | None] = dict(COMPOSITE)
        mapping.update({"others": None, "other": None})
        return SMIC_CLASSES, mapping
    if dataset == "casme2":
        if classes != "casme2":
            raise ValueError(f"CASME II classes must be 'casme2' or 'composite', got {classes!r}")
        if other_emotions not in ("drop", "others"):
            raise ValueError(f"other_emotions must be 'drop' or 'others', got {other_emotions!r}")
        mapping = {c: c for c in CASME2_CLASSES}
        mapping.update({e: (None if other_emotions == "drop" else "others") for e in CASME2_EXTRA_EMOTIONS})
        return CASME2_CLASSES, mapping
    if classes == "samm5":
        return SAMM5_CLASSES, {c: (c if c in SAMM5_CLASSES else None) for c in SAMM_CLASSES}
    if classes != "samm":
        raise ValueError(f"SAMM classes must be 'samm', 'samm5' or 'composite', got {classes!r}")
    return SAMM_CLASSES, {c: c for c in SAMM_CLASSES}


def _adapt_sheet_dataset(
    dataset: str,
    source: Path,
    out_dir: Path,
    *,
    name: str,
    sheet: Path | str | None,
    frames_dir: str | None,
    classes: str,
    other_emotions: str,
    test_subjects: Sequence[Any] | None,
    estimate_missing_apex: bool,
) -> DatasetCard:
    source, out_dir = Path(source), Path(out_dir)
    is_casme2 = dataset == "casme2"
    sheet_path = (
        Path(sheet)
        if sheet is not None
        else _find_one(source, CASME2_SHEET_PATTERNS if is_casme2 else SAMM_SHEET_PATTERNS, "coding sheet")
    )
    if not sheet_path.is_file():
        raise ValueError(f"coding sheet {sheet_path} does not exist")
    folder = source if source.is_dir() else source.parent
    frames_root = _frames_root(folder, CASME2_FRAME_FOLDERS if is_casme2 else SAMM_FRAME_FOLDERS, frames_dir)
    normalise = casme2_subject if is_casme2 else samm_subject
    card_classes, emotion_to_class = _label_scheme(dataset, classes, other_emotions)

    table = read_coding_sheet(sheet_path)
    subjects = [normalise(s) for s in table["subject"]]
    wanted_test = _check_test_subjects(test_subjects, set(subjects), normalise)
    rows: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    apex_filled = 0
    for i, record in table.iterrows():
        emotion = record["estimatedemotion"].strip().lower()
        if emotion not in emotion_to_class:
            raise ValueError(
                f"{sheet_path.name} row {i}: unknown emotion {record['estimatedemotion']!r}; "
                f"expected one of {sorted(emotion_to_class)}"
            )
        cls = emotion_to_class[emotion]
        if cls is None:
            dropped[emotion] = dropped.get(emotion, 0) + 1
            continue
        subject, clip_name = subjects[i], record["filename"]
        frame_values = {
            key: _frame_number(record[key], sheet=sheet_path, row=int(i), column=key)
            for key in ("onsetframe", "apexframe", "offsetframe")
        }
        clip_folder = frames_root / subject / clip_name
        # The sheet's filename is free text: "../../x" or an absolute path must not make us read
        # (or, through ``ref``, write) outside the source and the prepared folder.
        if Path(clip_name).is_absolute() or ".." in Path(clip_name).parts or not is_inside(folder, clip_folder):
            raise ValueError(f"{sheet_path.name} row {i}: filename {clip_name!r} leaves the source folder {folder}")
        relative = clip_folder.relative_to(folder).as_posix()
        ref = f"clips/{relative}"
        num_frames, onset, apex, offset, digest = 0, -1, -1, -1, ""
        if clip_folder.is_dir():
            files = copy_clip(clip_folder, out_dir / ref)
            numbers = [trailing_number(f) for f in files]
            num_frames = len(files)
            onset = _index_of(numbers, frame_values["onsetframe"])
            apex = _index_of(numbers, frame_values["apexframe"])
            offset = _index_of(numbers, frame_values["offsetframe"])
            digest, frames = clip_hash_and_frames(out_dir, ref)
            if apex < 0 and estimate_missing_apex and frames is not None and 0 <= onset <= offset:
                apex = estimate_apex(frames, onset, offset)
                apex_filled += 1
        rows.append(_clip_row(subject, clip_name, relative, subject in wanted_test, ref, card_classes.index(cls),
                              cls, onset, apex, offset, num_frames, digest))
    if not rows:
        raise ValueError(f"{sheet_path.name} lists no clips of the classes {card_classes} (dropped: {dropped})")
    df = _rows_frame(rows)
    provenance = {
        "sheet": sheet_path.name,
        "classes": classes,
        "dropped_emotions": dropped,
        "apex_estimated": apex_filled,
        "test_subjects": sorted(wanted_test),
    }
    card = _card(name, dataset, card_classes, df, provenance)
    write_prepared(out_dir, df, card)
    return card


def adapt_casme2(
    source: Path,
    out_dir: Path,
    *,
    name: str,
    sheet: Path | str | None = None,
    frames_dir: str | None = None,
    classes: str = "casme2",
    other_emotions: str = "drop",
    test_subjects: Sequence[Any] | None = None,
    estimate_missing_apex: bool = False,
) -> DatasetCard:
    """CASME II: ``CASME2-RAW/subNN/<Filename>/imgK.jpg`` + ``CASME2-coding-*.xlsx|csv``.

    ``classes``: "casme2" (5 classes) or "composite" (3); ``other_emotions``: "drop" or "others"
    for fear/sadness clips; ``test_subjects``: e.g. ``["sub01"]`` or ``[1]``.
    """
    return _adapt_sheet_dataset(
        "casme2", source, out_dir, name=name, sheet=sheet, frames_dir=frames_dir, classes=classes,
        other_emotions=other_emotions, test_subjects=test_subjects,
        estimate_missing_apex=estimate_missing_apex,
    )


def adapt_samm(
    source: Path,
    out_dir: Path,
    *,
    name: str,
    sheet: Path | str | None = None,
    frames_dir: str | None = None,
    classes: str = "composite",
    test_subjects: Sequence[Any] | None = None,
    estimate_missing_apex: bool = False,
) -> DatasetCard:
    """SAMM: ``SAMM/NNN/<Filename>/NNN_FFFFF.jpg`` + ``SAMM_Micro_FACS_Codes*.xlsx``.

    ``classes``: "composite" (3, default), "samm5" (5: the emotions with >= 10 clips) or "samm" (8
    estimated emotions); ``test_subjects``:
    e.g. ``["006"]`` or ``[6]``.
    """
    return _adapt_sheet_dataset(
        "samm", source, out_dir, name=name, sheet=sheet, frames_dir=frames_dir, classes=classes,
        other_emotions="drop", test_subjects=test_subjects, estimate_missing_apex=estimate_missing_apex,
    )


# ---------------------------------------------------------------------------------------------
# SMIC: class folders, no sheet
# ---------------------------------------------------------------------------------------------


def _smic_root(source: Path, modality: str) -> Path:
    for candidate in (source / modality, source):
        if candidate.is_dir() and any(re.fullmatch(r"s\d+", p.name) for p in candidate.iterdir() if p.is_dir()):
            return candidate
    raise ValueError(f"no SMIC subject folders (s1, s2, ...) in {source} or {source / modality}")


def adapt_smic(
    source: Path,
    out_dir: Path,
    *,
    name: str,
    modality: str = "HS",
    test_subjects: Sequence[Any] | None = None,
) -> DatasetCard:
    """SMIC: ``<modality>/sN/micro/{positive,negative,surprise}/<clip>/*.bmp``; apex estimated."""
    source, out_dir = Path(source), Path(out_dir)
    root = _smic_root(source, modality)
    rows: list[dict[str, Any]] = []
    subject_folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"s\d+", p.name)),
        key=lambda p: int(p.name[1:]),
    )
    subjects = {p.name for p in subject_folders}
    wanted_test = _check_test_subjects(test_subjects, subjects, lambda s: f"s{int(str(s).lstrip('sS'))}")
    for subject_folder in subject_folders:
        micro = subject_folder / "micro"
        if not micro.is_dir():
            continue
        for class_folder in sorted(p for p in micro.iterdir() if p.is_dir()):
            cls = class_folder.name.lower()
            if cls not in SMIC_CLASSES:
                raise ValueError(f"SMIC class folder {class_folder} is not one of {SMIC_CLASSES}")
            for clip_folder in sorted(p for p in class_folder.iterdir() if p.is_dir()):
                relative = clip_folder.relative_to(root.parent).as_posix()
                ref = f"clips/{relative}"
                num_frames = len(copy_clip(clip_folder, out_dir / ref))
                digest, frames = clip_hash_and_frames(out_dir, ref)
                onset, offset = (0, num_frames - 1) if num_frames else (-1, -1)
                apex = estimate_apex(frames, onset, offset) if frames is not None else -1
                subject = subject_folder.name
                rows.append(_clip_row(subject, clip_folder.name, relative, subject in wanted_test, ref,
                                      SMIC_CLASSES.index(cls), cls, onset, apex, offset, num_frames, digest))
    if not rows:
        raise ValueError(f"no SMIC clips below {root}/sN/micro/<class>/")
    df = _rows_frame(rows)
    provenance = {"modality": modality, "apex": "estimate_apex (diff)", "test_subjects": sorted(wanted_test)}
    card = _card(name, "smic", SMIC_CLASSES, df, provenance)
    write_prepared(out_dir, df, card)
    return card


# ---------------------------------------------------------------------------------------------
# Synthetic writers
# ---------------------------------------------------------------------------------------------


def _write_frames(folder: Path, frames: np.ndarray, names: Sequence[str]) -> None:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for frame, file_name in zip(frames, names):
        bgr = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(folder / file_name), bgr):
            raise ValueError(f"OpenCV could not write {folder / file_name}")


def _clips(seed: int, image_size: int, difficulty: float, size: int, scheme: str, num_frames: int, num_subjects: int):
    from fer_core.data.synthfacs import SynthFACS

    return SynthFACS(seed, image_size, difficulty).micro_clips(
        size, scheme=scheme, num_frames=num_frames, num_subjects=num_subjects
    )


def write_synthetic_casme2(
    out_dir: Path,
    *,
    seed: int = 0,
    size: int = 12,
    difficulty: float = 0.0,
    image_size: int = 64,
    num_frames: int = 8,
    num_subjects: int = 4,
    missing_apex_rows: int = 1,
) -> Path:
    """CASME II layout: ``CASME2-RAW/subNN/EPxx_yy/imgK.jpg`` (frame numbers start at an offset,
    as in the real data) and ``CASME2-coding-20140508.xlsx``; the first ``missing_apex_rows`` rows
    mark their apex ``/`` as a few real rows do."""
    clips = _clips(seed, image_size, difficulty, size, "casme2", num_frames, num_subjects)
    rng = np.random.default_rng(seed + 2)
    root = Path(out_dir)
    unique = sorted({str(s) for s in clips.subjects})
    per_subject: dict[str, int] = {}
    records = []
    for i, frames in enumerate(clips.clips):
        subject_number = unique.index(str(clips.subjects[i])) + 1
        episode = per_subject[str(subject_number)] = per_subject.get(str(subject_number), 0) + 1
        clip_name = f"EP{episode:02d}_{int(rng.integers(1, 20)):02d}f"
        start = int(rng.integers(20, 200))
        _write_frames(
            root / "CASME2-RAW" / f"sub{subject_number:02d}" / clip_name,
            frames,
            [f"img{start + t}.jpg" for t in range(len(frames))],
        )
        records.append(
            {
                "Subject": f"{subject_number:02d}",
                "Filename": clip_name,
                "OnsetFrame": start + int(clips.onset[i]),
                "ApexFrame": "/" if i < missing_apex_rows else start + int(clips.apex[i]),
                "OffsetFrame": start + int(clips.offset[i]),
                "Action Units": "",
                "Estimated Emotion": str(clips.label_names[int(clips.labels[i])]),
            }
        )
    pd.DataFrame(records).to_excel(root / "CASME2-coding-20140508.xlsx", index=False, engine="openpyxl")
    return root


# SAMM's emotions for the generator's composite (SMIC-scheme) labels; negatives rotate over SAMM's
# negative emotions so every class occurs.
_SAMM_NEGATIVES = ("Anger", "Contempt", "Disgust", "Fear", "Sadness")


def write_synthetic_samm(
    out_dir: Path,
    *,
    seed: int = 0,
    size: int = 12,
    difficulty: float = 0.0,
    image_size: int = 64,
    num_frames: int = 8,
    num_subjects: int = 4,
) -> Path:
    """SAMM layout: ``SAMM/NNN/NNN_k_j/NNN_FFFFF.jpg`` and ``SAMM_Micro_FACS_Codes_v2.xlsx`` with
    title rows above the table, as in the real file. Labels come from the generator's composite
    scheme (positive -> Happiness, negative -> a SAMM negative emotion, surprise -> Surprise)."""
    clips = _clips(seed, image_size, difficulty, size, "smic", num_frames, num_subjects)
    rng = np.random.default_rng(seed + 3)
    root = Path(out_dir)
    unique = sorted({str(s) for s in clips.subjects})
    per_subject: dict[str, int] = {}
    records = []
    for i, frames in enumerate(clips.clips):
        subject = f"{unique.index(str(clips.subjects[i])) + 6:03d}"
        take = per_subject[subject] = per_subject.get(subject, 0) + 1
        clip_name = f"{subject}_{take}_{int(rng.integers(1, 8))}"
        start = int(rng.integers(1000, 6000))
        _write_frames(
            root / "SAMM" / subject / clip_name, frames, [f"{subject}_{start + t:05d}.jpg" for t in range(len(frames))]
        )
        composite = str(clips.label_names[int(clips.labels[i])])
        emotion = {"positive": "Happiness", "surprise": "Surprise"}.get(composite)
        if emotion is None:
            emotion = _SAMM_NEGATIVES[i % len(_SAMM_NEGATIVES)]
        onset, apex, offset = (start + int(v[i]) for v in (clips.onset, clips.apex, clips.offset))
        records.append(
            {
                "Subject": subject,
                "Filename": clip_name,
                "Inducement Code": 1,
                "Onset Frame": onset,
                "Apex Frame": apex,
                "Offset Frame": offset,
                "Duration": offset - onset + 1,
                "Type": "Micro - 1/2",
                "Action Units": "",
                "Notes": "",
                "Estimated Emotion": emotion,
            }
        )
    path = root / "SAMM_Micro_FACS_Codes_v2.xlsx"
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        pd.DataFrame(records).to_excel(writer, sheet_name="FACS_Movement_Only", index=False, startrow=3)
        sheet = writer.sheets["FACS_Movement_Only"]
        sheet.cell(row=1, column=1, value="SAMM Micro-FACS Codes (synthetic)")
        sheet.cell(row=2, column=1, value="Frame numbers are the numbers in the image file names.")
    return root


def write_synthetic_smic(
    out_dir: Path,
    *,
    seed: int = 0,
    size: int = 12,
    difficulty: float = 0.0,
    image_size: int = 64,
    num_frames: int = 8,
    num_subjects: int = 4,
) -> Path:
    """SMIC-HS layout: ``HS/sN/micro/<class>/sN_<po|ne|sur>_KK/imageFFFFFF.bmp`` (lossless BMP)."""
    clips = _clips(seed, image_size, difficulty, size, "smic", num_frames, num_subjects)
    rng = np.random.default_rng(seed + 4)
    root = Path(out_dir)
    unique = sorted({str(s) for s in clips.subjects})
    counters: dict[tuple[str, str], int] = {}
    for i, frames in enumerate(clips.clips):
        subject = f"s{unique.index(str(clips.subjects[i])) + 1}"
        cls = str(clips.label_names[int(clips.labels[i])])
        k = counters[(subject, cls)] = counters.get((subject, cls), 0) + 1
        start = int(rng.integers(10000, 900000))
        _write_frames(
            root / "HS" / subject / "micro" / cls / f"{subject}_{SMIC_ABBREVIATIONS[cls]}_{k:02d}",
            frames,
            [f"image{start + t:06d}.bmp" for t in range(len(frames))],
        )
    return root


register_format(
    DataFormat(
        name="casme2",
        task="micro",
        description="CASME II: CASME2-RAW/subNN/EPxx_yy/imgK.jpg + CASME2-coding-*.xlsx|csv (5 classes)",
        adapt=adapt_casme2,
        write_synthetic=write_synthetic_casme2,
    )
)
register_format(
    DataFormat(
        name="samm",
        task="micro",
        description="SAMM: SAMM/NNN/NNN_k_j/NNN_FFFFF.jpg + SAMM_Micro_FACS_Codes_v2.xlsx",
        adapt=adapt_samm,
        write_synthetic=write_synthetic_samm,
    )
)
register_format(
    DataFormat(
        name="smic",
        task="micro",
        description="SMIC-HS: HS/sN/micro/{positive,negative,surprise}/<clip>/*.bmp (apex estimated)",
        adapt=adapt_smic,
        write_synthetic=write_synthetic_smic,
    )
)
