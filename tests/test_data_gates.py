"""The data gate: good datasets of every task pass, each catalogued corruption is caught by its check."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from data_checks import ExpectationOutcome, GateBounds, GateFailed, GateReport, validate_dataset
from data_checks.sample_checks import inspect_samples
from fer_core.data.labels import AU_NAMES, CASME2_CLASSES, DFEW_CLASSES, EXPRESSIONS
from fer_core.data.manifest import DatasetCard, class_counts, content_hash, write_prepared
from fer_core.data.samples import read_image
from tests.corruptions import CORRUPTIONS, Corruption, applicable, clone

# --------------------------------------------------------------------------- good datasets


def _rows_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    defaults = {"subject": "", "onset": -1, "apex": -1, "offset": -1, "num_frames": 1}
    for column, value in defaults.items():
        if column not in frame.columns:
            frame[column] = value
    return frame


def _card(name: str, task: str, classes: tuple[str, ...], df: pd.DataFrame, **kwargs) -> DatasetCard:
    return DatasetCard(name=name, task=task, source_format="test", classes=classes,
                       counts=class_counts(df, classes), num_samples=len(df), **kwargs)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if pixels.ndim == 3 else pixels
    assert cv2.imwrite(str(path), image)


def _layout(per_class: dict[str, int], num_classes: int) -> list[tuple[str, int, int]]:
    """(split, label, k-th in split) for ``per_class[split]`` samples of each class."""
    return [(split, label, k) for split, n in per_class.items() for label in range(num_classes) for k in range(n)]


def make_static_files(root: Path, seed: int = 0) -> Path:
    """7 classes of grey 48x48 PNGs, train/test by subject (subject-independent protocol)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (split, label, k) in enumerate(_layout({"train": 6, "test": 2}, len(EXPRESSIONS))):
        ref = f"images/{split}/{i:04d}.png"
        _write_png(root / ref, rng.integers(0, 256, (48, 48), dtype=np.uint8))
        subject = f"s{k % 4}" if split == "train" else f"s{4 + k % 2}"
        rows.append(dict(id=f"img{i:04d}", task="static", source=f"src{i}", split=split, path=ref, label=label,
                         subject=subject, content_hash=content_hash(read_image(root, ref))))
    df = _rows_frame(rows)
    write_prepared(root, df, _card("static-files", "static", EXPRESSIONS, df, subject_independent=True))
    return root


def make_static_packed(root: Path, seed: int = 1, per_class: dict[str, int] | None = None) -> Path:
    """FER2013-like: one packed uint8 (N, 48, 48) array, train/val/test, FER+ soft labels."""
    rng = np.random.default_rng(seed)
    layout = _layout(per_class or {"train": 6, "val": 1, "test": 2}, len(EXPRESSIONS))
    pixels = rng.integers(0, 256, (len(layout), 48, 48), dtype=np.uint8)
    (root / "arrays").mkdir(parents=True, exist_ok=True)
    np.save(root / "arrays" / "pixels.npy", pixels)
    votes = rng.integers(0, 10, (len(layout), len(EXPRESSIONS))).astype(np.float64) + 1.0
    df = pd.DataFrame(
        {
            "id": [f"fer{i:05d}" for i in range(len(layout))],
            "task": "static",
            "source": [f"fer2013.csv#{i}" for i in range(len(layout))],
            "split": [s for s, _, _ in layout],
            "path": [f"arrays/pixels.npy#{i}" for i in range(len(layout))],
            "label": [label for _, label, _ in layout],
            "subject": "",
            "onset": -1, "apex": -1, "offset": -1, "num_frames": 1,
            "content_hash": [content_hash(p) for p in pixels],
            "soft_label": list(votes / votes.sum(axis=1, keepdims=True)),
        }
    )
    write_prepared(root, df, _card("fer-like", "static", EXPRESSIONS, df, splits=("train", "val", "test")))
    return root


def make_au_files(root: Path, seed: int = 2) -> Path:
    """RGB PNGs with AU lists, clean and unlabelled (label -1) rows, subject-independent."""
    rng = np.random.default_rng(seed)
    layout = _layout({"train": 4, "test": 1}, len(EXPRESSIONS))
    layout += [("train", -1, k) for k in range(6)]  # the unlabelled pool of AU co-training
    rows = []
    for i, (split, label, k) in enumerate(layout):
        ref = f"faces/{i:04d}.png"
        _write_png(root / ref, rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
        rows.append(dict(id=f"au{i:04d}", task="au", source=f"src{i}", split=split, path=ref, label=label,
                         subject=f"s{k % 3}" if split == "train" else "s9",
                         content_hash=content_hash(read_image(root, ref)),
                         aus=[int(v) for v in rng.integers(-1, 2, len(AU_NAMES))],
                         label_set="unlabelled" if label < 0 else "clean"))
    df = _rows_frame(rows)
    write_prepared(root, df, _card("au-files", "au", EXPRESSIONS, df, au_names=AU_NAMES, subject_independent=True))
    return root


def make_micro_frames(root: Path, seed: int = 3) -> Path:
    """CASME II-like: frame folders of six 32x32 grey frames with onset/apex/offset."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (split, label, k) in enumerate(_layout({"train": 4, "test": 2}, len(CASME2_CLASSES))):
        ref = f"clips/sub{i:03d}"
        for t in range(6):
            _write_png(root / ref / f"img{t + 1}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
        rows.append(dict(id=f"me{i:03d}", task="micro", source=f"src{i}", split=split, path=ref, label=label,
                         subject=f"s{k % 4}" if split == "train" else f"s{4 + k % 2}",
                         onset=0, apex=2 + i % 2, offset=4, num_frames=6, content_hash=f"clip{i}"))
    df = _rows_frame(rows)
    write_prepared(root, df, _card("micro-frames", "micro", CASME2_CLASSES, df, subject_independent=True))
    return root


def make_dynamic_packed(root: Path, seed: int = 4) -> Path:
    """DFEW-like: packed (N, 5, 32, 32) clips, no apex annotation (-1)."""
    rng = np.random.default_rng(seed)
    layout = _layout({"train": 3, "test": 1}, len(DFEW_CLASSES))
    clips = rng.integers(0, 256, (len(layout), 5, 32, 32), dtype=np.uint8)
    (root / "arrays").mkdir(parents=True, exist_ok=True)
    np.save(root / "arrays" / "clips.npy", clips)
    rows = [
        dict(id=f"dfew{i:03d}", task="dynamic", source=f"{i + 1}.mp4", split=split, path=f"arrays/clips.npy#{i}",
             label=label, onset=0, apex=-1, offset=4, num_frames=5, content_hash=content_hash(clips[i]))
        for i, (split, label, _) in enumerate(layout)
    ]
    df = _rows_frame(rows)
    write_prepared(root, df, _card("dfew-like", "dynamic", DFEW_CLASSES, df))
    return root


MAKERS = {
    "static_files": make_static_files,
    "static_packed": make_static_packed,
    "au_files": make_au_files,
    "micro_frames": make_micro_frames,
    "dynamic_packed": make_dynamic_packed,
}


def _build_good_datasets() -> dict[str, Path]:
    """One pristine dataset per flavour, built once at collection: the parametrisation needs to know
    which corruptions apply to which flavour, and the tests clone them before corrupting."""
    base = Path(tempfile.mkdtemp(prefix="fer-gate-good-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    return {name: make(base / name) for name, make in MAKERS.items()}


_GOOD = _build_good_datasets()
_APPLICABLE = {name: {c.name for c in applicable(root)} for name, root in _GOOD.items()}


@pytest.fixture
def good() -> dict[str, Path]:
    return _GOOD


def _pairs() -> list[tuple[str, Corruption]]:
    """Each corruption on one flavour it applies to, rotating the flavours so that every layout is
    exercised (the full matrix, ~95 validations, would blow the module's 60 s budget)."""
    flavours = list(MAKERS)
    pairs = []
    for i, corruption in enumerate(CORRUPTIONS):
        rotated = flavours[i % len(flavours):] + flavours[: i % len(flavours)]
        pairs.append((next(f for f in rotated if corruption.name in _APPLICABLE[f]), corruption))
    return pairs


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("flavour", list(MAKERS))
def test_good_dataset_of_each_task_passes(good, flavour, capfd):
    report = validate_dataset(good[flavour])
    assert isinstance(report, GateReport)
    assert report.success, report.summary()
    assert report.failures == [] and report.num_rows > 0 and report.docs_index is None
    names = {r.name for r in report.results}
    assert {"unique_ids", "file_decodes", "label_in_domain", "no_content_across_splits"} <= names
    if report.task in ("micro", "dynamic"):
        assert {"onset_le_apex", "offset_before_end", "num_frames_match_decoded"} <= names
    if report.task == "au":
        assert {"aus_length", "aus_values_in_domain", "class_fraction_in_bounds"} <= names
    report.raise_for_failure()  # no-op on success
    assert "Calculating Metrics" not in capfd.readouterr().err, "GX progress bars must be silenced"


def test_catalogue_has_a_dozen_kinds_each_used_by_some_flavour():
    assert len(CORRUPTIONS) >= 12
    assert len({c.name for c in CORRUPTIONS}) == len(CORRUPTIONS)
    used = set().union(*_APPLICABLE.values())
    assert used == {c.name for c in CORRUPTIONS}, f"never applied: {({c.name for c in CORRUPTIONS}) - used}"


@pytest.mark.parametrize(("flavour", "corruption"), _pairs(), ids=lambda v: getattr(v, "name", v))
def test_corruption_is_caught_by_its_check(good, tmp_path, flavour, corruption):
    root = clone(good[flavour], tmp_path / "data")
    broken_ids = corruption.apply(root)
    report = validate_dataset(root, bounds=corruption.bounds)

    assert not report.success
    assert corruption.check in report.failed_checks, report.summary()
    outcome = next(r for r in report.failures if r.name == corruption.check)
    with pytest.raises(GateFailed) as raised:
        report.raise_for_failure()
    message = str(raised.value)
    assert raised.value.report is report
    line = next(line for line in message.splitlines() if corruption.check in line)
    if outcome.unexpected_count is not None:  # row-level expectation: counts and example ids
        assert outcome.unexpected_count >= 1
        assert f"{outcome.unexpected_count} of {outcome.element_count} rows unexpected" in line
        if broken_ids and outcome.examples:
            assert any(sample_id in line for sample_id in broken_ids), line
    else:  # table-level expectation: what was observed
        assert outcome.observed or outcome.error


def test_failure_message_names_each_failed_check_on_its_own_line(good, tmp_path):
    root = clone(good["static_files"], tmp_path / "data")
    by_name = {c.name: c for c in CORRUPTIONS}
    by_name["duplicate_id"].apply(root)
    by_name["label_out_of_domain"].apply(root)
    by_name["empty_split"].apply(root)

    with pytest.raises(GateFailed) as raised:
        validate_dataset(root).raise_for_failure()
    lines = str(raised.value).splitlines()
    assert "static-files" in lines[0] and "failed" in lines[0]
    for check, fragment in [
        ("unique_ids", "2 of 42 rows unexpected"),
        ("label_in_domain", "1 of 42 rows unexpected"),
        ("declared_splits_non_empty", "missing ['test']"),
    ]:
        assert sum(check in line for line in lines) == 1
        assert fragment in next(line for line in lines if check in line)
    assert "img0000" in next(line for line in lines if "unique_ids" in line)


def test_unlabelled_rows_pass_only_where_the_task_allows_them(good, tmp_path):
    root = clone(good["static_files"], tmp_path / "data")
    df = pd.read_parquet(root / "manifest.parquet")
    df.loc[df.index[-1], "label"] = -1  # a test row: class balance of train unaffected
    df.to_parquet(root / "manifest.parquet", index=False)
    report = validate_dataset(root)
    assert report.failed_checks == ["label_in_domain"]
    assert validate_dataset(good["au_files"]).success  # holds six -1 rows


def test_bounds_are_live(good):
    strict = validate_dataset(good["static_files"], bounds=GateBounds(min_side=64, min_class_fraction=0.2))
    assert {"height_in_bounds", "width_in_bounds", "class_fraction_in_bounds"} <= set(strict.failed_checks)
    grey_only = validate_dataset(good["au_files"], bounds=GateBounds(channels=(1,)))
    assert grey_only.failed_checks == ["channels_valid"]


def test_cross_split_duplicates_can_be_tolerated_by_bound(good, tmp_path):
    root = clone(good["static_packed"], tmp_path / "data")
    next(c for c in CORRUPTIONS if c.name == "train_image_in_test").apply(root)
    assert "no_content_across_splits" in validate_dataset(root).failed_checks
    assert validate_dataset(root, bounds=GateBounds(max_cross_split_duplicate_fraction=0.05)).success


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_side=0), dict(min_side=64, max_side=32), dict(channels=()), dict(min_class_fraction=1.0),
     dict(soft_label_tolerance=0.0), dict(max_cross_split_duplicate_fraction=-0.1)],
)
def test_gate_bounds_reject_nonsense(kwargs):
    with pytest.raises(ValueError):
        GateBounds(**kwargs)


def test_garbage_manifests_are_reported_not_raised(good, tmp_path):
    root = clone(good["au_files"], tmp_path / "data")
    df = pd.read_parquet(root / "manifest.parquet").astype({"label": "string"})
    df["label"] = df["label"].where(df.index % 2 == 0, "happy")  # strings where ints belong
    df["split"] = df["split"].where(df.index % 3 != 0, None)
    df["path"] = df["path"].where(df.index % 5 != 0, "arrays/none.npy#x")  # a non-numeric row
    df["aus"] = [None if i % 4 == 0 else [] if i % 4 == 1 else a for i, a in enumerate(df["aus"])]
    df.to_parquet(root / "manifest.parquet", index=False)
    report = validate_dataset(root)
    assert {"label_in_domain", "split_not_null", "file_exists", "aus_not_null", "aus_length"} <= set(
        report.failed_checks
    ), report.summary()

    empty = clone(good["micro_frames"], tmp_path / "empty")
    pd.read_parquet(empty / "manifest.parquet").iloc[:0].to_parquet(empty / "manifest.parquet", index=False)
    report = validate_dataset(empty)
    assert report.num_rows == 0 and "declared_splits_non_empty" in report.failed_checks


def test_a_folder_that_is_not_a_prepared_dataset_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not a prepared dataset"):
        validate_dataset(tmp_path)


def test_data_docs_are_written_into_the_workspace(good, workspace, capfd):
    first = validate_dataset(good["micro_frames"], docs_dir=workspace.gx_docs)
    second = validate_dataset(good["micro_frames"], docs_dir=workspace.gx_docs)  # reuses the GX project
    assert first.success and second.success
    index = second.docs_index
    assert index is not None and index.is_file()
    assert workspace.gx_docs in index.parents
    assert (workspace.gx_docs / "great_expectations.yml").is_file()
    assert second.run_name == first.run_name and second.run_name.startswith("micro-frames@table-")
    assert f"{first.run_name}.micro" in index.read_text()  # the suite, named after the table it gated
    pages = list((index.parent / "validations").rglob("*.html"))
    assert len(pages) >= 2
    assert "Calculating Metrics" not in capfd.readouterr().err


def test_vectorised_packed_path_agrees_with_per_sample_decoding(good):
    root = good["static_packed"]
    manifest = pd.read_parquet(root / "manifest.parquet")
    facts = inspect_samples(root, manifest, clips=False)
    for i in (0, 17, len(manifest) - 1):
        pixels = read_image(root, manifest["path"].iloc[i])
        assert (facts["height"].iloc[i], facts["width"].iloc[i], facts["channels"].iloc[i]) == (48, 48, 1)
        assert facts["pixel_hash"].iloc[i] == content_hash(pixels) == manifest["content_hash"].iloc[i]
    assert facts["decodes"].all() and facts["finite"].all()


def test_outcome_describe_is_one_line():
    outcome = ExpectationOutcome(name="unique_ids", expectation="expect_column_values_to_be_unique",
                                 columns=("id",), success=False, element_count=10, unexpected_count=2,
                                 examples=("a (id='a')", "a (id='a')"))
    assert outcome.describe() == (
        "unique_ids [expect_column_values_to_be_unique on id]: 2 of 10 rows unexpected; e.g. a (id='a'); a (id='a')"
    )


def test_fer2013_sized_dataset_validates_well_under_a_minute(tmp_path):
    """32,298 rows of packed 48x48 pixels (FER2013's train + public test size)."""
    per_class = {"train": 3589, "val": 513, "test": 512}  # 7 * 4614 = 32,298 rows
    root = make_static_packed(tmp_path / "fer", per_class=per_class)
    start = time.perf_counter()
    report = validate_dataset(root)
    seconds = time.perf_counter() - start
    assert report.num_rows == 32_298
    assert report.success, report.summary()
    print(f"\n32,298-row packed dataset validated in {seconds:.1f} s")
    assert seconds < 45.0  # generous: ~10 s on a loaded 2-core box
