"""Expectation suites of the data gate, one per task type, built from shared parts.

Every check is a real Great Expectations expectation on a pandas frame. What GX cannot express row
by row (decoding, cross-split leakage, list-valued columns) is first computed in pandas as a
*derived column* (:func:`gate_frame`), which the suites then check. Each expectation carries
``meta={"check": <name>}``: the stable name reports, messages and tests refer to.

One suite, ``<dataset>.<task>``, is validated per dataset, on the :func:`gate_frame` (one row per
manifest row).

Task parts (:data:`TASK_PARTS`)::

    static   common + class balance + images (+ soft labels when the manifest has them)
    au       common + images + action units (+ soft labels, + class balance when labelled);
             label -1 (unlabelled) is allowed
    micro    common + class balance + clips
    dynamic  common + class balance + clips

``common``: canonical columns present and non-null, unique ids, task and splits as the card says,
labels in domain, files exist and decode, image size and channels within :class:`GateBounds`,
finite pixels, no content in two splits, no subject in train and test (subject-independent cards).

Evaluation-only test sets (card ``provenance["role"] == "test"``, e.g. CK+48 for a network trained
on FER2013) have no train split and may lack classes, so the class-balance part does not apply to
them; instead every row must be in the test split. Every other check still runs: a test set with an
undecodable file, a bad label or a leak is refused like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd

from fer_core.data.manifest import LABEL_SETS, MANIFEST_COLUMNS, TASKS, DatasetCard

CLIP_TASKS = ("micro", "dynamic")
# Tasks whose datasets may hold unlabelled rows (label -1), e.g. AU co-training's unlabelled pool.
UNLABELLED_TASKS = ("au",)
AU_VALUES = (-1, 0, 1)  # unknown, inactive, active
FRAME_INDEX_COLUMNS = ("onset", "apex", "offset")


@dataclass(frozen=True)
class GateBounds:
    """Numeric bounds of the gate (defaults suit 48x48 FER2013 up to HD video frames).

    ``min_class_fraction``: every class holds at least this fraction of the train split's labelled
    rows. ``max_cross_split_duplicate_fraction``: share of rows whose pixels also occur in another
    split that is tolerated (0: none; real FER2013 has a few). ``check_content_hash``: the
    manifest's ``content_hash`` must equal the hash of the decoded image (static and AU tasks).
    """

    min_side: int = 16
    max_side: int = 4096
    channels: tuple[int, ...] = (1, 3)
    min_class_fraction: float = 0.005
    soft_label_tolerance: float = 1e-3
    max_cross_split_duplicate_fraction: float = 0.0
    check_content_hash: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError(f"need 1 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive counts, got {self.channels}")
        if not 0.0 <= self.min_class_fraction < 1.0:
            raise ValueError(f"min_class_fraction must be in [0, 1), got {self.min_class_fraction}")
        if not 0.0 < self.soft_label_tolerance < 1.0:
            raise ValueError(f"soft_label_tolerance must be in (0, 1), got {self.soft_label_tolerance}")
        if not 0.0 <= self.max_cross_split_duplicate_fraction < 1.0:
            raise ValueError(
                f"max_cross_split_duplicate_fraction must be in [0, 1), got {self.max_cross_split_duplicate_fraction}"
            )


# --------------------------------------------------------------------------- derived columns


def gate_frame(manifest: pd.DataFrame, samples: pd.DataFrame, card: DatasetCard) -> pd.DataFrame:
    """The manifest plus per-sample facts plus cross-row columns: what the samples suite checks.

    Never raises for bad content: a derived column whose inputs are missing is left out, and the
    expectation on it then fails as "column missing" next to ``required_columns_present``.
    """
    frame = pd.concat([manifest.reset_index(drop=True), samples.reset_index(drop=True)], axis=1)
    frame["row"] = np.arange(len(frame), dtype=np.int64)  # positional row, for examples when id is null
    columns = set(manifest.columns)

    for name in (c for c in FRAME_INDEX_COLUMNS if c in columns):
        # -1 means "not annotated" (DFEW has no apex, SMIC no apex either): null it so the pair
        # expectations skip it instead of reading it as frame -1.
        values = _numbers(frame[name])
        frame[f"{name}_index"] = values.mask(values == -1)

    split = frame["split"].astype("string") if "split" in columns else None
    if split is not None:
        key = frame["pixel_hash"].astype("string")
        if "content_hash" in columns:
            # Undecodable rows still leak if the adapter's hash says so.
            key = key.fillna(frame["content_hash"].astype("string"))
        splits_per_key = pd.DataFrame({"key": key, "split": split}).groupby("key", dropna=True)["split"].transform(
            "nunique"
        )
        frame["content_in_other_split"] = splits_per_key.fillna(1).astype(int).gt(1)

    if split is not None and "subject" in columns:
        subject = frame["subject"].astype("string")
        known = (subject.notna() & subject.str.len().gt(0)).fillna(False).astype(bool)
        in_train = split.eq("train").fillna(False).astype(bool)
        in_test = split.eq("test").fillna(False).astype(bool)
        both = set(subject[known & in_train]) & set(subject[known & in_test])
        frame["subject_in_train_and_test"] = (known & (in_train | in_test) & subject.isin(both)).astype(bool)

    if "content_hash" in columns:
        matches = frame["content_hash"].astype("string") == frame["pixel_hash"].astype("string")
        frame["content_hash_matches"] = matches.astype("boolean")

    for name in ("aus", "true_aus"):
        if name in columns:
            lengths, outside = _list_facts(frame[name], lambda v: int(np.isin(v, AU_VALUES, invert=True).sum()))
            frame[f"{name}_length"], frame[f"{name}_outside_domain"] = lengths, outside

    if "soft_label" in columns:
        lengths, sums = _list_facts(frame["soft_label"], lambda v: float(np.sum(v)), dtype="Float64")
        frame["soft_label_length"], frame["soft_label_sum"] = lengths, sums

    if {"label", "split"} <= columns:
        _add_class_balance(frame, card)
    return frame


def _add_class_balance(frame: pd.DataFrame, card: DatasetCard) -> None:
    """``train_label`` (in-domain labels of the train split, else <NA>) and ``train_class_fraction``
    (the share of the train split's labelled rows that the row's class holds).

    Together they express "every class holds at least a fraction of train" row-wise: a missing
    class is absent from ``train_label``'s distinct values, a rare one fails on each of its rows.
    The card's splits without a train split fall back to all rows.
    """
    labels = _numbers(frame["label"])
    labels = labels.where(labels.round() == labels).astype("Float64").round().astype("Int64")  # 2.5: no class
    in_train = frame["split"].astype("string").eq("train").fillna(False) if "train" in card.splits else True
    labelled = labels.between(0, len(card.classes) - 1).fillna(False) & in_train
    train_label = labels.where(labelled)
    counts = train_label.value_counts(dropna=True)
    total = int(counts.sum())
    frame["train_label"] = train_label.astype("Int64")
    frame["train_class_fraction"] = (train_label.map(counts) / total if total else train_label).astype("Float64")


def _numbers(values: pd.Series) -> pd.Series:
    """A column as nullable numbers: Int64 when every value is integral, else Float64 (so that a
    corrupted 2.5 is compared as 2.5, not rounded away); non-numbers become <NA>."""
    numeric = pd.to_numeric(values, errors="coerce").astype("Float64")
    integral = (numeric.dropna() % 1 == 0).all()
    return numeric.astype("Int64") if integral else numeric


def _list_facts(
    values: pd.Series, reduce: Callable[[np.ndarray], Any], dtype: str = "Int64"
) -> tuple[pd.Series, pd.Series]:
    """(length, reduce(list)) of a list-valued column; <NA> for null rows, -1 length for non-lists."""
    lengths: list[object] = []
    reduced: list[object] = []
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            lengths.append(pd.NA)
            reduced.append(pd.NA)
            continue
        try:
            array = np.asarray(value, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            lengths.append(-1)  # not a list of numbers: fails the length check
            reduced.append(pd.NA)
            continue
        lengths.append(len(array))
        reduced.append(reduce(array))
    return (
        pd.Series(pd.array(lengths, dtype="Int64"), index=values.index),
        pd.Series(pd.array(reduced, dtype=dtype), index=values.index),
    )


# --------------------------------------------------------------------------- expectations


def _expect(check: str, expectation: type, description: str, **kwargs: Any) -> gxe.Expectation:
    """An expectation tagged with the gate's stable check name (rendered in Data Docs too)."""
    return expectation(meta={"check": check}, description=description, **kwargs)


def _common(card: DatasetCard, bounds: GateBounds, columns: set[str]) -> list[gxe.Expectation]:
    """Checks every prepared dataset passes, whatever its task."""
    allowed_labels = list(range(len(card.classes)))
    if card.task in UNLABELLED_TASKS:
        allowed_labels.append(-1)
    checks = [
        _expect("required_columns_present", gxe.ExpectTableColumnsToMatchSet,
                "The manifest has every canonical column.", column_set=list(MANIFEST_COLUMNS), exact_match=False),
        *(
            _expect(f"{column}_not_null", gxe.ExpectColumnValuesToNotBeNull,
                    f"Required column {column} is never null.", column=column)
            for column in MANIFEST_COLUMNS
        ),
        _expect("unique_ids", gxe.ExpectColumnValuesToBeUnique, "Sample ids are unique.", column="id"),
        _expect("task_matches_card", gxe.ExpectColumnValuesToBeInSet,
                f"Every row's task is the card's ({card.task}).", column="task", value_set=[card.task]),
        _expect("split_declared", gxe.ExpectColumnValuesToBeInSet,
                "Every split is one the card declares.", column="split", value_set=list(card.splits)),
        _expect("declared_splits_non_empty", gxe.ExpectColumnDistinctValuesToContainSet,
                "Every split the card declares holds rows.", column="split", value_set=list(card.splits)),
        _expect("label_in_domain", gxe.ExpectColumnValuesToBeInSet,
                f"Labels index the card's {len(card.classes)} classes"
                + (" (-1: unlabelled)." if -1 in allowed_labels else "."),
                column="label", value_set=allowed_labels),
        _expect("file_exists", gxe.ExpectColumnValuesToBeInSet,
                "The file (or packed-array row) each path names exists.", column="exists", value_set=[True]),
        _expect("file_decodes", gxe.ExpectColumnValuesToBeInSet,
                "Each path decodes to pixels.", column="decodes", value_set=[True]),
        _expect("height_in_bounds", gxe.ExpectColumnValuesToBeBetween,
                f"Image/frame height within [{bounds.min_side}, {bounds.max_side}].",
                column="height", min_value=bounds.min_side, max_value=bounds.max_side),
        _expect("width_in_bounds", gxe.ExpectColumnValuesToBeBetween,
                f"Image/frame width within [{bounds.min_side}, {bounds.max_side}].",
                column="width", min_value=bounds.min_side, max_value=bounds.max_side),
        _expect("channels_valid", gxe.ExpectColumnValuesToBeInSet,
                f"Images have {' or '.join(map(str, bounds.channels))} channels.",
                column="channels", value_set=list(bounds.channels)),
        _expect("pixels_finite", gxe.ExpectColumnValuesToBeInSet,
                "No NaN or infinite pixel.", column="finite", value_set=[True]),
        _expect("no_content_across_splits", gxe.ExpectColumnValuesToBeInSet,
                "No decoded content occurs in two splits (leakage).", column="content_in_other_split",
                value_set=[False], mostly=1.0 - bounds.max_cross_split_duplicate_fraction),
    ]
    if card.subject_independent:
        checks += [
            _expect("subject_known", gxe.ExpectColumnValueLengthsToBeBetween,
                    "Subject-independent protocol: every row names its subject.", column="subject", min_value=1),
            _expect("no_subject_in_train_and_test", gxe.ExpectColumnValuesToBeInSet,
                    "Subject-independent protocol: no subject in both train and test.",
                    column="subject_in_train_and_test", value_set=[False]),
        ]
    return checks


def _images(card: DatasetCard, bounds: GateBounds, columns: set[str]) -> list[gxe.Expectation]:
    """Single-image samples: the manifest's content hash is the decoded image's."""
    if not bounds.check_content_hash:
        return []
    return [
        _expect("content_hash_matches_pixels", gxe.ExpectColumnValuesToBeInSet,
                "content_hash is the SHA-256 of the decoded pixels.", column="content_hash_matches",
                value_set=[True]),
    ]


def _clips(card: DatasetCard, bounds: GateBounds, columns: set[str]) -> list[gxe.Expectation]:
    """Clips: 0 <= onset <= apex <= offset < num_frames (-1: not annotated), frames all there."""
    pair = gxe.ExpectColumnPairValuesAToBeGreaterThanB
    checks = [
        _expect("num_frames_positive", gxe.ExpectColumnValuesToBeBetween,
                "Clips have frames.", column="num_frames", min_value=1),
        _expect("num_frames_match_decoded", gxe.ExpectColumnPairValuesToBeEqual,
                "num_frames is the number of frames the clip decodes to.",
                column_A="num_frames", column_B="num_decoded", ignore_row_if="either_value_is_missing"),
    ]
    checks += [
        _expect(f"{name}_non_negative", gxe.ExpectColumnValuesToBeBetween,
                f"{name} is a frame index (or -1: not annotated).", column=f"{name}_index", min_value=0)
        for name in FRAME_INDEX_COLUMNS
    ]
    ordered = (("onset", "apex"), ("apex", "offset"), ("onset", "offset"))
    checks += [
        _expect(f"{first}_le_{second}", pair, f"{first} <= {second}.", column_A=f"{second}_index",
                column_B=f"{first}_index", or_equal=True, ignore_row_if="either_value_is_missing")
        for first, second in ordered
    ]
    checks += [
        _expect(f"{name}_before_end", pair, f"{name} < num_frames.", column_A="num_frames",
                column_B=f"{name}_index", ignore_row_if="either_value_is_missing")
        for name in FRAME_INDEX_COLUMNS
    ]
    return checks


def _action_units(card: DatasetCard, bounds: GateBounds, columns: set[str]) -> list[gxe.Expectation]:
    """AU lists: one value in {-1, 0, 1} per name of card.au_names."""
    n = len(card.au_names)
    checks = [_expect("aus_not_null", gxe.ExpectColumnValuesToNotBeNull, "Every AU sample has its AU list.",
                      column="aus")]
    for name in ("aus", "true_aus"):
        if name != "aus" and name not in columns:
            continue
        checks += [
            _expect(f"{name}_length", gxe.ExpectColumnValuesToBeInSet,
                    f"{name} lists hold one value per AU name ({n}).", column=f"{name}_length", value_set=[n]),
            _expect(f"{name}_values_in_domain", gxe.ExpectColumnValuesToBeInSet,
                    f"{name} values are -1 (unknown), 0 or 1 (count of other values per row).",
                    column=f"{name}_outside_domain", value_set=[0]),
        ]
    if "label_set" in columns:
        checks.append(_expect("label_set_known", gxe.ExpectColumnValuesToBeInSet,
                              f"label_set is one of {', '.join(LABEL_SETS)}.", column="label_set",
                              value_set=list(LABEL_SETS)))
    return checks


def _soft_labels(card: DatasetCard, bounds: GateBounds, columns: set[str]) -> list[gxe.Expectation]:
    """FER+-style vote distributions: one probability per class, summing to 1."""
    if "soft_label" not in columns:
        return []
    tol = bounds.soft_label_tolerance
    return [
        _expect("soft_label_length", gxe.ExpectColumnValuesToBeInSet,
                f"Soft labels hold one value per class ({len(card.classes)}).", column="soft_label_length",
                value_set=[len(card.classes)]),
        _expect("soft_label_sums_to_one", gxe.ExpectColumnValuesToBeBetween,
                f"Soft labels sum to 1 (± {tol}).", column="soft_label_sum", min_value=1.0 - tol,
                max_value=1.0 + tol),
    ]


SuitePart = Callable[[DatasetCard, GateBounds, set[str]], list[gxe.Expectation]]
TASK_PARTS: dict[str, tuple[SuitePart, ...]] = {
    "static": (_common, _images, _soft_labels),
    "au": (_common, _images, _action_units, _soft_labels),
    "micro": (_common, _clips),
    "dynamic": (_common, _clips),
}


def _class_balance(card: DatasetCard, bounds: GateBounds, columns: set[str]) -> list[gxe.Expectation]:
    """Every class of the card is in the train split with at least ``min_class_fraction`` of it."""
    if not card.classes:
        return []
    return [
        _expect("every_class_in_train", gxe.ExpectColumnDistinctValuesToContainSet,
                "Every class of the card occurs in the train split.", column="train_label",
                value_set=list(range(len(card.classes)))),
        _expect("class_fraction_in_bounds", gxe.ExpectColumnValuesToBeBetween,
                f"Every class holds at least {bounds.min_class_fraction:.2%} of the train split's labelled rows.",
                column="train_class_fraction", min_value=bounds.min_class_fraction),
    ]


SuitePart = Callable[[DatasetCard, GateBounds, set[str]], list[gxe.Expectation]]
TASK_PARTS: dict[str, tuple[SuitePart, ...]] = {
    "static": (_common, _class_balance, _images, _soft_labels),
    "au": (_common, _images, _action_units, _soft_labels),  # + _class_balance when it has labels
    "micro": (_common, _class_balance, _clips),
    "dynamic": (_common, _class_balance, _clips),
}


def is_test_set(card: DatasetCard) -> bool:
    """Whether the card marks an evaluation-only test set."""
    return str(card.provenance.get("role", "train")) == "test"


def _test_set(card: DatasetCard, bounds: GateBounds, columns: set[str]) -> list[gxe.Expectation]:
    """Evaluation-only sets: every row is a test row (nothing of it may be trained on)."""
    return [
        _expect("test_set_only_test_split", gxe.ExpectColumnValuesToBeInSet,
                "Evaluation-only test set: every row is in the test split.", column="split", value_set=["test"]),
    ]


def build_suite(
    card: DatasetCard, bounds: GateBounds, manifest_columns: Iterable[str], *, has_labels: bool = True
) -> gx.ExpectationSuite:
    """The suite for ``card`` (its task, classes, splits, protocol) and the manifest's columns.

    ``has_labels``: whether any row carries a class label; AU sets without expression labels skip
    the class-balance checks (for the other tasks an unlabelled set fails them, as it should).
    """
    if card.task not in TASK_PARTS:
        raise ValueError(f"card {card.name!r} has unknown task {card.task!r}; known: {', '.join(TASKS)}")
    columns = set(manifest_columns)
    parts = TASK_PARTS[card.task]
    if card.task in UNLABELLED_TASKS and has_labels:
        parts = (*parts, _class_balance)
    if is_test_set(card):
        parts = (*(p for p in parts if p is not _class_balance), _test_set)
    expectations = [e for part in parts for e in part(card, bounds, columns)]
    return gx.ExpectationSuite(name=f"{card.name}.{card.task}", expectations=expectations)
