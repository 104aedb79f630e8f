"""A catalogue of dataset corruptions, each paired with the gate check that must catch it.

Every :class:`Corruption` damages a *good* prepared dataset in place (any adapter's output: image
files, packed arrays, frame folders) and returns the ids of the rows it broke. ``applies`` says
whether the dataset has what the corruption needs (a task, image files, a packed array, soft labels,
a subject-independent protocol...), so end-to-end tests can run the whole catalogue on whatever
they prepared::

    for corruption in applicable(root):
        copy = clone(root); ids = corruption.apply(copy)
        assert corruption.check in validate_dataset(copy).failed_checks
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd

from data_checks import GateBounds
from fer_core.data.manifest import MANIFEST_FILE, content_hash, read_card, read_manifest, resolve_reference
from fer_core.data.samples import frame_files, read_clip, read_image

CLIP_TASKS = ("micro", "dynamic")


@dataclass(frozen=True)
class Corruption:
    """``apply(root) -> broken ids``; ``check`` is the gate check name that must fail."""

    name: str
    check: str
    apply: Callable[[Path], list[str]]
    applies: Callable[[Path], bool]
    bounds: GateBounds | None = None  # bounds to validate with (None: defaults)


# --------------------------------------------------------------------------- helpers


def _manifest(root: Path) -> pd.DataFrame:
    return read_manifest(root)


def _write(root: Path, df: pd.DataFrame) -> None:
    # Straight to Parquet: corruptions must be able to write what write_prepared would refuse.
    df.reset_index(drop=True).to_parquet(Path(root) / MANIFEST_FILE, index=False)


def _is_packed(ref: str) -> bool:
    return "#" in str(ref)


def _rows(df: pd.DataFrame, *, split: str | None = None, packed: bool | None = None) -> pd.DataFrame:
    rows = df if split is None else df[df["split"] == split]
    if packed is not None:
        rows = rows[rows["path"].map(_is_packed) == packed]
    if rows.empty:
        raise ValueError(f"no row with split={split} packed={packed} to corrupt")
    return rows


def _set(root: Path, row_index: int, **values: object) -> list[str]:
    df = _manifest(root)
    for column, value in values.items():
        df.at[row_index, column] = value
    _write(root, df)
    return [str(df.at[row_index, "id"])]


def _has_file_rows(root: Path) -> bool:
    return bool((~_manifest(root)["path"].map(_is_packed)).any())


def _has_packed_rows(root: Path) -> bool:
    return bool(_manifest(root)["path"].map(_is_packed).any())


def _task_in(*tasks: str) -> Callable[[Path], bool]:
    return lambda root: read_card(root).task in tasks


def _all(*conditions: Callable[[Path], bool]) -> Callable[[Path], bool]:
    return lambda root: all(condition(root) for condition in conditions)


def _always(root: Path) -> bool:
    return True


def _packed_target(root: Path) -> tuple[Path, pd.DataFrame]:
    """The first packed array and the manifest rows that reference it."""
    df = _manifest(root)
    packed = _rows(df, packed=True)
    target, _ = resolve_reference(root, packed["path"].iloc[0])
    file_part = str(packed["path"].iloc[0]).partition("#")[0]
    return target, packed[packed["path"].str.partition("#")[0] == file_part]


def _image_files(root: Path, ref: str) -> list[Path]:
    """The image files a file reference stands for (the frames of a frame folder)."""
    target, _ = resolve_reference(root, ref)
    return frame_files(target) if target.is_dir() else [target]


def _read(root: Path, ref: str, clip: bool) -> np.ndarray:
    return read_clip(root, ref) if clip else read_image(root, ref)


def _clip_row(df: pd.DataFrame, condition: Callable[[pd.Series], bool]) -> int:
    for index, row in df.iterrows():
        if condition(row):
            return int(index)
    raise ValueError("no clip row fits the corruption")


# --------------------------------------------------------------------------- file corruptions


def missing_file(root: Path) -> list[str]:
    """Delete the file (or frame folder) of the first file-backed row."""
    row = _rows(_manifest(root), packed=False).iloc[0]
    target, _ = resolve_reference(root, row["path"])
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return [str(row["id"])]


def truncated_image(root: Path) -> list[str]:
    """Cut an image file (a clip's first frame) to a third of its bytes: it no longer decodes."""
    row = _rows(_manifest(root), packed=False).iloc[0]
    path = _image_files(root, row["path"])[0]
    data = path.read_bytes()
    path.write_bytes(data[: max(len(data) // 3, 1)])
    return [str(row["id"])]


def tiny_image(root: Path) -> list[str]:
    """Shrink a sample to 8x8 pixels (every frame of a clip; every row of a packed array)."""
    df = _manifest(root)
    if _has_file_rows(root):
        row = _rows(df, packed=False).iloc[0]
        for path in _image_files(root, row["path"]):
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(path), cv2.resize(image, (8, 8), interpolation=cv2.INTER_AREA))
        return [str(row["id"])]
    target, rows = _packed_target(root)
    array = np.load(target)
    clip = read_card(root).task in CLIP_TASKS
    np.save(target, array[:, :, :8, :8] if clip else array[:, :8, :8])
    return [str(i) for i in rows["id"]]


def two_channel_pixels(root: Path) -> list[str]:
    """Give a packed array a channel axis of 2 (neither grey nor RGB)."""
    target, rows = _packed_target(root)
    array = np.load(target)
    np.save(target, np.stack([array, array], axis=-1))
    return [str(i) for i in rows["id"]]


def nan_pixels(root: Path) -> list[str]:
    """Store a packed array as float32 with one NaN pixel in its first referenced row."""
    target, rows = _packed_target(root)
    array = np.load(target).astype(np.float32)
    first = rows.iloc[0]
    _, row_number = resolve_reference(root, first["path"])
    array[row_number].reshape(-1)[0] = np.nan
    np.save(target, array)
    return [str(first["id"])]


def path_escapes_root(root: Path) -> list[str]:
    """Point a row outside the dataset folder."""
    return _set(root, 0, path="../outside.png")


def train_image_in_test(root: Path) -> list[str]:
    """Copy a train sample's pixels onto a test sample (with the hash an adapter would write)."""
    df = _manifest(root)
    test_split = "test" if (df["split"] == "test").any() else next(s for s in df["split"].unique() if s != "train")
    clip = read_card(root).task in CLIP_TASKS
    packed = not _has_file_rows(root)
    source = _rows(df, split="train", packed=packed).iloc[0]
    victim_index = int(_rows(df, split=test_split, packed=packed).index[0])
    victim = df.loc[victim_index]
    if packed:
        source_file, source_row = resolve_reference(root, source["path"])
        victim_file, victim_row = resolve_reference(root, victim["path"])
        array = np.load(source_file)
        if source_file == victim_file:
            array[victim_row] = array[source_row]
            np.save(source_file, array)
        else:
            other = np.load(victim_file)
            other[victim_row] = array[source_row]
            np.save(victim_file, other)
    else:
        source_path, _ = resolve_reference(root, source["path"])
        victim_path, _ = resolve_reference(root, victim["path"])
        if source_path.is_dir():
            shutil.rmtree(victim_path)
            shutil.copytree(source_path, victim_path)
        else:
            victim_path.write_bytes(source_path.read_bytes())
    new_hash = content_hash(_read(root, victim["path"], clip))
    updates: dict[str, object] = {"content_hash": new_hash}
    if clip:  # the copied clip brings its own length and annotations
        updates.update({c: source[c] for c in ("num_frames", "onset", "apex", "offset")})
    _set(root, victim_index, **updates)
    return [str(victim["id"]), str(source["id"])]


def missing_frame(root: Path) -> list[str]:
    """Delete the last frame of a frame-folder clip (num_frames now overstates it)."""
    row = _rows(_manifest(root), packed=False).iloc[0]
    _image_files(root, row["path"])[-1].unlink()
    return [str(row["id"])]


def _has_frame_folders(root: Path) -> bool:
    df = _manifest(root)
    file_rows = df[~df["path"].map(_is_packed)]
    return bool(len(file_rows)) and resolve_reference(root, file_rows["path"].iloc[0])[0].is_dir()


# --------------------------------------------------------------------------- manifest corruptions


def label_out_of_domain(root: Path) -> list[str]:
    df = _manifest(root)
    return _set(root, int(_rows(df, split="train").index[0]), label=len(read_card(root).classes))


def duplicate_id(root: Path) -> list[str]:
    df = _manifest(root)
    return _set(root, 1, id=str(df.at[0, "id"]))


def subject_leak(root: Path) -> list[str]:
    """Give a test row a subject of the train split (returns it and that subject's train rows)."""
    df = _manifest(root)
    train_subject = str(_rows(df, split="train")["subject"].iloc[0])
    train_ids = [str(i) for i in df[(df["split"] == "train") & (df["subject"] == train_subject)]["id"]]
    return _set(root, int(_rows(df, split="test").index[0]), subject=train_subject) + train_ids


def _subject_independent_with_test(root: Path) -> bool:
    splits = set(_manifest(root)["split"])
    return read_card(root).subject_independent and {"train", "test"} <= splits


def _several_splits(root: Path) -> bool:
    """Micro-expression sets are often one train split (leave-one-subject-out comes later)."""
    return "train" in set(_manifest(root)["split"]) and _manifest(root)["split"].nunique() >= 2


def empty_split(root: Path) -> list[str]:
    """Drop every row of the card's last declared split."""
    df = _manifest(root)
    split = read_card(root).splits[-1]
    gone = df[df["split"] == split]
    _write(root, df[df["split"] != split])
    return [str(i) for i in gone["id"]]


def undeclared_split(root: Path) -> list[str]:
    return _set(root, 0, split="holdout")


def class_missing_from_train(root: Path) -> list[str]:
    """Relabel every train row of class 0 as class 1."""
    df = _manifest(root)
    rows = df[(df["split"] == "train") & (df["label"] == 0)]
    df.loc[rows.index, "label"] = 1
    _write(root, df)
    return [str(i) for i in rows["id"]]


def class_imbalanced(root: Path) -> list[str]:
    """Keep one train row of class 0 (relabel the others as class 1): under a 10 % bound."""
    df = _manifest(root)
    rows = df[(df["split"] == "train") & (df["label"] == 0)]
    df.loc[rows.index[1:], "label"] = 1
    _write(root, df)
    return [str(rows["id"].iloc[0])]


def _has_classes(root: Path) -> bool:
    card = read_card(root)
    return len(card.classes) >= 2 and bool((_manifest(root)["label"] >= 0).any())


def null_subject(root: Path) -> list[str]:
    return _set(root, 0, subject=None)


def null_split(root: Path) -> list[str]:
    return _set(root, 0, split=None)


def null_path(root: Path) -> list[str]:
    return _set(root, 0, path=None)


def dropped_column(root: Path) -> list[str]:
    """Remove the required ``subject`` column."""
    _write(root, _manifest(root).drop(columns=["subject"]))
    return []


def tampered_hash(root: Path) -> list[str]:
    return _set(root, 0, content_hash="0" * 64)


# --------------------------------------------------------------------------- clip annotations


def onset_after_apex(root: Path) -> list[str]:
    df = _manifest(root)
    index = _clip_row(df, lambda r: r["apex"] >= 0 and r["apex"] + 1 < r["num_frames"])
    return _set(root, index, onset=int(df.at[index, "apex"]) + 1)


def apex_after_offset(root: Path) -> list[str]:
    df = _manifest(root)
    index = _clip_row(df, lambda r: r["offset"] >= 0 and r["offset"] + 1 < r["num_frames"])
    return _set(root, index, apex=int(df.at[index, "offset"]) + 1)


def offset_past_end(root: Path) -> list[str]:
    df = _manifest(root)
    index = _clip_row(df, lambda r: r["num_frames"] > 0)
    return _set(root, index, offset=int(df.at[index, "num_frames"]))


def zero_frames(root: Path) -> list[str]:
    return _set(root, 0, num_frames=0)


def _has_apex(root: Path) -> bool:
    df = _manifest(root)
    return bool(((df["apex"] >= 0) & (df["apex"] + 1 < df["num_frames"])).any())


def _has_offset_room(root: Path) -> bool:
    df = _manifest(root)
    return bool(((df["offset"] >= 0) & (df["offset"] + 1 < df["num_frames"])).any())


# --------------------------------------------------------------------------- labels beyond the class


def au_value_seven(root: Path) -> list[str]:
    df = _manifest(root)
    aus = list(df.at[0, "aus"])
    aus[0] = 7
    df.at[0, "aus"] = aus
    _write(root, df)
    return [str(df.at[0, "id"])]


def au_list_short(root: Path) -> list[str]:
    df = _manifest(root)
    df.at[0, "aus"] = list(df.at[0, "aus"])[:-1]
    _write(root, df)
    return [str(df.at[0, "id"])]


def _has_column(column: str) -> Callable[[Path], bool]:
    return lambda root: column in _manifest(root).columns


def soft_label_not_normalised(root: Path) -> list[str]:
    df = _manifest(root)
    df.at[0, "soft_label"] = [2.0 * v for v in df.at[0, "soft_label"]]
    _write(root, df)
    return [str(df.at[0, "id"])]


CORRUPTIONS: tuple[Corruption, ...] = (
    Corruption("missing_file", "file_exists", missing_file, _has_file_rows),
    Corruption("truncated_image", "file_decodes", truncated_image, _has_file_rows),
    Corruption("path_escapes_root", "file_exists", path_escapes_root, _always),
    Corruption("tiny_image", "height_in_bounds", tiny_image, _always),
    Corruption("two_channel_pixels", "channels_valid", two_channel_pixels, _has_packed_rows),
    Corruption("nan_pixels_in_float_array", "pixels_finite", nan_pixels, _has_packed_rows),
    Corruption("label_out_of_domain", "label_in_domain", label_out_of_domain, _always),
    Corruption("duplicate_id", "unique_ids", duplicate_id, _always),
    Corruption("train_image_in_test", "no_content_across_splits", train_image_in_test, _several_splits),
    Corruption("subject_leak", "no_subject_in_train_and_test", subject_leak, _subject_independent_with_test),
    Corruption("empty_split", "declared_splits_non_empty", empty_split, _always),
    Corruption("undeclared_split", "split_declared", undeclared_split, _always),
    Corruption("class_missing_from_train", "every_class_in_train", class_missing_from_train, _has_classes),
    Corruption("class_imbalanced", "class_fraction_in_bounds", class_imbalanced, _has_classes,
               bounds=GateBounds(min_class_fraction=0.1)),
    Corruption("null_subject", "subject_not_null", null_subject, _always),
    Corruption("null_path", "path_not_null", null_path, _always),
    Corruption("null_split", "split_not_null", null_split, _always),
    Corruption("dropped_subject_column", "required_columns_present", dropped_column, _always),
    Corruption("tampered_content_hash", "content_hash_matches_pixels", tampered_hash, _task_in("static", "au")),
    Corruption("onset_after_apex", "onset_le_apex", onset_after_apex, _all(_task_in(*CLIP_TASKS), _has_apex)),
    Corruption("apex_after_offset", "apex_le_offset", apex_after_offset,
               _all(_task_in(*CLIP_TASKS), _has_apex, _has_offset_room)),
    Corruption("offset_past_end", "offset_before_end", offset_past_end, _task_in(*CLIP_TASKS)),
    Corruption("zero_frames", "num_frames_positive", zero_frames, _task_in(*CLIP_TASKS)),
    Corruption("missing_frame", "num_frames_match_decoded", missing_frame,
               _all(_task_in(*CLIP_TASKS), _has_frame_folders)),
    Corruption("au_value_seven", "aus_values_in_domain", au_value_seven, _all(_task_in("au"), _has_column("aus"))),
    Corruption("au_list_short", "aus_length", au_list_short, _all(_task_in("au"), _has_column("aus"))),
    Corruption("soft_label_not_normalised", "soft_label_sums_to_one", soft_label_not_normalised,
               _has_column("soft_label")),
)


def applicable(root: Path) -> list[Corruption]:
    """The corruptions that make sense for the prepared dataset at ``root``."""
    return [c for c in CORRUPTIONS if c.applies(Path(root))]


def clone(root: Path, destination: Path) -> Path:
    """Copy a prepared dataset so a corruption leaves the original intact."""
    shutil.copytree(root, destination)
    return destination
