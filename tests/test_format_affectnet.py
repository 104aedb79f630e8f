"""AffectNet format: a hand-written fixture in the real layout (lists + images), and SynthFACS faces
written in that layout by the synthetic writer, adapted back and passed through the data gate."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from fer_core.data import formats
from fer_core.data.formats import affectnet
from fer_core.data.labels import EXPRESSIONS
from fer_core.data.manifest import MANIFEST_COLUMNS, content_hash, read_manifest, resolve_reference
from fer_core.data.samples import read_image

HEADER = ",".join(affectnet.COLUMNS)


def _landmark_text(points: np.ndarray) -> str:
    return ";".join(f"{v:.2f}" for v in points.reshape(-1))


def _write_fixture(root: Path, rows: dict[str, list[tuple]], image_side: int = 40) -> dict[str, np.ndarray]:
    """AffectNet layout; rows are (relative path, box, landmarks text, expression, valence, arousal).
    Images are PNG so pixels can be compared exactly; returns relative path -> RGB pixels."""
    rng = np.random.default_rng(0)
    pixels: dict[str, np.ndarray] = {}
    lists = root / affectnet.LISTS_DIR
    lists.mkdir(parents=True, exist_ok=True)
    for list_name, entries in rows.items():
        lines = [HEADER]
        for relative, (x, y, w, h), landmarks, code, valence, arousal in entries:
            if relative not in pixels and not relative.startswith("missing"):
                image = rng.integers(0, 256, size=(image_side, image_side + 8, 3), dtype=np.uint8)
                path = root / affectnet.IMAGES_DIR / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                pixels[relative] = image
            lines.append(f"{relative},{x},{y},{w},{h},{landmarks},{code},{valence},{arousal}")
        (lists / list_name).write_text("\n".join(lines) + "\n")
    return pixels


def _points(offset: float) -> np.ndarray:
    return np.round(np.stack([np.linspace(5, 30, 68), np.linspace(8, 28, 68)], axis=1), 2) + offset


FIXTURE = {
    "training.csv": [
        ("1/a.png", (4, 6, 20, 24), _landmark_text(_points(0.0)), 0, 0.5, -0.25),  # neutral
        ("1/b.png", (0, 0, 40, 40), _landmark_text(_points(1.0)), 6, -0.7, 0.8),  # anger
        ("2/c.png", (2, 2, 30, 30), "", 1, -2, -2),  # happy, no landmarks, VA not annotated
        ("2/d.png", (2, 2, 30, 30), _landmark_text(_points(0.5)), 7, 0.1, 0.2),  # contempt
        ("3/e.png", (2, 2, 30, 30), _landmark_text(_points(0.5)), 8, 0.3, 0.3),  # none
        ("3/f.png", (2, 2, 30, 30), "", 10, -2, -2),  # no-face
    ],
    "validation.csv": [
        ("4/g.png", (-5, -5, 20, 20), _landmark_text(_points(2.0)), 5, 0.0, 0.1),  # disgust, box clipped
        ("missing/h.png", (0, 0, 10, 10), _landmark_text(_points(0.0)), 3, 0.2, 0.2),  # surprise, file absent
    ],
}


def test_layout_labels_affect_and_landmarks(tmp_path):
    pixels = _write_fixture(tmp_path / "src", FIXTURE)
    out = tmp_path / "out"
    card = formats.adapt("affectnet", tmp_path / "src", out, name="an")
    raw = read_manifest(out)
    assert raw["id"].is_unique and card.num_samples == len(raw)
    df = raw.set_index("id")
    assert set(MANIFEST_COLUMNS) - {"id"} <= set(df.columns) and {"valence", "arousal", "landmarks"} <= set(df.columns)
    assert card.classes == (*EXPRESSIONS, "contempt") and card.source_format == "affectnet"
    # 8 None and 10 No-Face are dropped by default and counted
    assert card.provenance["dropped"] == {"none": 1, "no_face": 1}
    assert sorted(df.index) == ["1/a", "1/b", "2/c", "2/d", "4/g", "missing/h"]
    expected = {"1/a": "neutral", "1/b": "angry", "2/c": "happy", "2/d": "contempt", "4/g": "disgust", "missing/h": "surprise"}
    assert {i: card.classes[df.loc[i, "label"]] for i in df.index} == expected
    assert (df["label_name"] == pd.Series(expected)).all()
    assert df.loc["1/a", "split"] == "train" and df.loc["4/g", "split"] == "test"
    assert card.splits == ("train", "test")
    # -2 means not annotated -> NaN; others verbatim
    assert math.isnan(df.loc["2/c", "valence"]) and math.isnan(df.loc["2/c", "arousal"])
    assert df.loc["1/b", "valence"] == pytest.approx(-0.7) and df.loc["1/b", "arousal"] == pytest.approx(0.8)
    assert df.loc["2/c", "landmarks"] is None
    # the face box is cut out (lossless PNG) and the landmarks follow it into the crop's frame
    a = read_image(out, df.loc["1/a", "path"])
    np.testing.assert_array_equal(a, pixels["1/a.png"][6:30, 4:24])
    np.testing.assert_allclose(np.asarray(df.loc["1/a", "landmarks"]).reshape(68, 2), _points(0.0) - [4, 6], atol=1e-6)
    assert df.loc["1/a", "content_hash"] == content_hash(a)
    # a box reaching outside the image is clipped to it
    g = read_image(out, df.loc["4/g", "path"])
    np.testing.assert_array_equal(g, pixels["4/g.png"][0:15, 0:15])
    np.testing.assert_allclose(np.asarray(df.loc["4/g", "landmarks"]).reshape(68, 2), _points(2.0), atol=1e-6)
    # a listed but absent image keeps its row for the gate
    target, _ = resolve_reference(out, df.loc["missing/h", "path"])
    assert not target.exists() and df.loc["missing/h", "content_hash"] == ""
    assert card.counts["train"]["contempt"] == 1 and card.num_samples == 6


def test_options_contempt_drop_non_expressions_no_crop_and_val(tmp_path):
    pixels = _write_fixture(tmp_path / "src", FIXTURE)
    card = formats.adapt("affectnet", tmp_path / "src", tmp_path / "a", name="an", contempt="drop",
                         keep_non_expressions=True, crop_faces=False)
    df = read_manifest(tmp_path / "a").set_index("id")
    assert card.classes == EXPRESSIONS and "2/d" not in df.index
    assert df.loc["3/e", "label"] == -1 and df.loc["3/e", "label_name"] == "none"
    assert card.provenance["dropped"] == {"contempt": 1, "no_face": 1}
    # without cropping the file is copied byte for byte and landmarks stay in its frame
    assert df.loc["1/a", "path"] == "images/1/a.png"
    assert (tmp_path / "a" / "images/1/a.png").read_bytes() == (tmp_path / "src" / affectnet.IMAGES_DIR / "1/a.png").read_bytes()
    np.testing.assert_array_equal(read_image(tmp_path / "a", df.loc["1/a", "path"]), pixels["1/a.png"])
    np.testing.assert_allclose(np.asarray(df.loc["1/a", "landmarks"]).reshape(68, 2), _points(0.0), atol=1e-6)
    # val_fraction holds out a stable share of training faces
    first = formats.adapt("affectnet", tmp_path / "src", tmp_path / "b", name="an", val_fraction=0.5, seed=3)
    again = formats.adapt("affectnet", tmp_path / "src", tmp_path / "c", name="an", val_fraction=0.5, seed=3)
    assert "val" in first.splits and first.counts == again.counts
    split = read_manifest(tmp_path / "b").set_index("id")["split"]
    assert split["4/g"] == "test" and set(split[["1/a", "1/b", "2/c", "2/d"]]) <= {"train", "val"}


@pytest.mark.parametrize(
    "landmarks, code, match",
    [("1;2;3", 0, "136"), ("a;b", 0, "not numbers"), (_landmark_text(_points(0)), 11, "AffectNet code"),
     (_landmark_text(_points(0)), "x", "AffectNet code")],
)
def test_unparseable_rows_raise(tmp_path, landmarks, code, match):
    _write_fixture(tmp_path / "src", {"training.csv": [("1/a.png", (0, 0, 10, 10), landmarks, code, 0, 0)]})
    with pytest.raises(ValueError, match=match):
        formats.adapt("affectnet", tmp_path / "src", tmp_path / "out", name="an")


def test_missing_lists_and_bad_options_raise(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError, match="training.csv"):
        formats.adapt("affectnet", tmp_path / "src", tmp_path / "out", name="an")
    _write_fixture(tmp_path / "src", FIXTURE)
    with pytest.raises(ValueError, match="contempt"):
        formats.adapt("affectnet", tmp_path / "src", tmp_path / "out", name="an", contempt="merge")
    with pytest.raises(ValueError, match="val_fraction"):
        formats.adapt("affectnet", tmp_path / "src", tmp_path / "out", name="an", val_fraction=1.0)


def test_synthetic_round_trip_and_data_gate(tmp_path):
    from data_checks import validate_dataset
    from fer_core.data.synthfacs import SynthFACS

    fmt = formats.get_format("affectnet")
    assert fmt.task == "static"
    src = fmt.write_synthetic(tmp_path / "src", seed=2, size=42, difficulty=0.0, image_size=48, num_subjects=6,
                              missing_va_fraction=0.2, missing_landmarks_fraction=0.2)
    lists = {name: pd.read_csv(src / affectnet.LISTS_DIR / name) for name in affectnet.LIST_FILES}
    assert list(lists["training.csv"].columns) == list(affectnet.COLUMNS)
    assert all(str(p).endswith(".jpg") for p in lists["training.csv"]["subDirectory_filePath"])
    card = formats.adapt("affectnet", src, tmp_path / "out", name="synth")
    df = read_manifest(tmp_path / "out")
    assert card.num_samples == 42 and card.classes == EXPRESSIONS and set(df["split"]) == {"train", "test"}

    # The writer renders exactly the generator's faces: labels, VA and landmarks survive the round trip.
    truth = SynthFACS(2, 48, 0.0).expression_set(42, 6)
    assert sum(len(t) for t in lists.values()) == 42
    # the writer names face i by a hash of (seed, i), as AffectNet names files by hashes
    generated = {f"1/{hashlib.sha1(f'2:{i}'.encode()).hexdigest()}": i for i in range(42)}
    checked_va = checked_landmarks = 0
    for _, row in df.iterrows():
        i = generated[row["id"]]
        assert row["label"] == truth.labels[i]
        if not math.isnan(row["valence"]):
            np.testing.assert_allclose([row["valence"], row["arousal"]], truth.valence_arousal[i], atol=1e-3)
            checked_va += 1
        if row["landmarks"] is not None:
            np.testing.assert_allclose(np.asarray(row["landmarks"]).reshape(68, 2), truth.landmarks[i], atol=2e-3)
            checked_landmarks += 1
        # the crop is the 48x48 face tile, JPEG-decoded
        image = read_image(tmp_path / "out", row["path"])
        assert image.shape == (48, 48, 3)
        assert np.abs(image.astype(int) - truth.images[i].astype(int)).mean() < 6.0
    assert 0 < checked_va < 42 and 0 < checked_landmarks < 42  # both kinds of gaps occur

    report = validate_dataset(tmp_path / "out")
    assert report.success, [o for o in report.results if not o.success]
