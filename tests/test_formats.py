"""Real-format adapters: hand-written fixtures in each real layout, and SynthFACS data written in
that layout by each format's synthetic writer, adapted back into canonical manifests."""

from __future__ import annotations

import gzip
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from fer_core.data import formats
from fer_core.data.formats import au_table, dfew, fer2013, image_folder, micro
from fer_core.data.labels import AU_NAMES, CASME2_CLASSES, EXPRESSIONS, SMIC_CLASSES
from fer_core.data.manifest import (
    MANIFEST_COLUMNS,
    content_hash,
    read_card,
    read_manifest,
    resolve_reference,
)
from fer_core.data.samples import read_clip, read_image
from tests.fixtures_formats import (
    random_rgb,
    write_casme2,
    write_dfew,
    write_fer2013_csv,
    write_ferplus_csv,
    write_image,
    write_samm,
    write_smic,
)


def _check_prepared(root: Path) -> pd.DataFrame:
    """Manifest + card present, consistent, every reference inside ``root``."""
    df = read_manifest(root)
    card = read_card(root)
    assert set(MANIFEST_COLUMNS) <= set(df.columns)
    assert card.num_samples == len(df) and df["id"].is_unique
    for ref in df["path"]:
        target, _ = resolve_reference(root, ref)  # raises if the reference leaves the root
        assert root.resolve() in target.parents
    labelled = df[df["label"] >= 0]
    assert sum(sum(c.values()) for c in card.counts.values()) == len(labelled)
    return df


# ---------------------------------------------------------------------------------------------
# FER2013 / FER+
# ---------------------------------------------------------------------------------------------


def _fer_fixture(tmp_path: Path, gz: bool = False) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 48, 48), dtype=np.uint8)
    path = tmp_path / ("fer2013.csv.gz" if gz else "fer2013.csv")
    usages = ["Training", "Training", "PublicTest", "PrivateTest", "Training"]
    write_fer2013_csv(path, [0, 3, 6, 9, 5], usages, pixels)  # 9: corrupt label, kept for the gate
    return path, pixels


@pytest.mark.parametrize("gz", [False, True])
def test_fer2013_rows_splits_and_exact_pixels(tmp_path, gz):
    path, pixels = _fer_fixture(tmp_path, gz)
    out = tmp_path / "out"
    card = formats.adapt("fer2013", tmp_path, out, name="fer")  # folder source finds the file
    df = _check_prepared(out)
    assert list(df["split"]) == ["train", "train", "val", "test", "train"]
    assert list(df["label"]) == [0, 3, 6, 9, 5]
    assert list(df["id"]) == [f"fer{i:07d}" for i in range(5)]
    assert card.classes == EXPRESSIONS and card.num_samples == 5
    assert card.counts["train"]["angry"] == 1 and card.counts["train"]["surprise"] == 1
    for i, row in df.iterrows():
        assert row["path"] == f"arrays/pixels.npy#{i}"
        np.testing.assert_array_equal(read_image(out, row["path"]), pixels[i])
        assert row["content_hash"] == content_hash(pixels[i])
    assert (df["num_frames"] == 1).all() and (df["onset"] == -1).all() and (df["subject"] == "").all()


def _ferplus_rows() -> list[tuple[str, str, list[int]]]:
    #        neutral happy surprise sad anger disgust fear contempt unknown NF
    return [
        ("Training", "fer0000000.png", [1, 6, 1, 0, 0, 0, 0, 2, 0, 0]),  # happy
        ("Training", "fer0000001.png", [1, 0, 0, 0, 0, 0, 0, 1, 8, 0]),  # plurality unknown: dropped
        ("PublicTest", "", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),  # FER+ dropped the image
        ("PrivateTest", "fer0000003.png", [0, 0, 0, 0, 0, 0, 0, 5, 0, 5]),  # tie -> contempt wins
        ("Training", "fer0000004.png", [0, 0, 4, 0, 4, 0, 2, 0, 0, 0]),  # tie -> surprise (column order)
    ]


@pytest.mark.parametrize("mode", ["majority", "soft"])
def test_ferplus_majority_and_soft_labels(tmp_path, mode):
    path, pixels = _fer_fixture(tmp_path)
    write_ferplus_csv(tmp_path / "fer2013new.csv", _ferplus_rows())
    out = tmp_path / "out"
    card = formats.adapt("fer2013", path, out, name="ferplus", ferplus=tmp_path / "fer2013new.csv", ferplus_mode=mode)
    df = _check_prepared(out)
    assert card.classes == (*EXPRESSIONS, "contempt")
    assert list(df["id"]) == ["fer0000000", "fer0000003", "fer0000004"]
    assert list(df["label_name"]) == ["happy", "contempt", "surprise"]
    assert list(df["split"]) == ["train", "test", "train"]
    # Kept rows are repacked; references point at the right pixels.
    for row, original in zip(df.itertuples(), (0, 3, 4)):
        np.testing.assert_array_equal(read_image(out, row.path), pixels[original])
    assert card.provenance["ferplus_dropped_by_fer_plus"] == 1
    assert card.provenance["ferplus_dropped_unknown_or_nf"] == 1
    if mode == "soft":
        soft = np.array(df["soft_label"].tolist())
        assert soft.shape == (3, 8)
        np.testing.assert_allclose(soft.sum(axis=1), 1.0)
        # First row: votes neutral 1, happy 6, surprise 1, contempt 2 over 10.
        expected = np.zeros(8)
        expected[[EXPRESSIONS.index("neutral"), EXPRESSIONS.index("happy"), EXPRESSIONS.index("surprise"), 7]] = [
            0.1, 0.6, 0.1, 0.2,
        ]
        np.testing.assert_allclose(soft[0], expected)
        np.testing.assert_allclose(soft[1], np.eye(8)[7])  # NF votes excluded from the distribution
    else:
        assert "soft_label" not in df.columns


def test_fer2013_bad_inputs_raise_value_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "fer2013.csv").write_text("emotion,Usage\n0,Training\n")
    with pytest.raises(ValueError, match="lacks FER2013 columns"):
        formats.adapt("fer2013", tmp_path / "a", tmp_path / "o1", name="x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "fer2013.csv").write_text("emotion,pixels,Usage\n0,1 2 3,Training\n")
    with pytest.raises(ValueError, match="2304"):
        formats.adapt("fer2013", tmp_path / "b", tmp_path / "o2", name="x")
    (tmp_path / "c").mkdir()
    write_fer2013_csv(tmp_path / "c" / "fer2013.csv", ["happy"], ["Training"], np.zeros((1, 48, 48), np.uint8))
    with pytest.raises(ValueError, match="not an integer"):
        formats.adapt("fer2013", tmp_path / "c", tmp_path / "o3", name="x")
    with pytest.raises(ValueError, match="no fer2013.csv"):
        formats.adapt("fer2013", tmp_path, tmp_path / "o4", name="x")
    path, _ = _fer_fixture(tmp_path / "c")  # 5 rows; FER+ with 4 rows is misaligned
    write_ferplus_csv(tmp_path / "plus.csv", _ferplus_rows()[:4])
    with pytest.raises(ValueError, match="rows"):
        formats.adapt("fer2013", path, tmp_path / "o5", name="x", ferplus=tmp_path / "plus.csv")
    with pytest.raises(ValueError, match="ferplus_mode"):
        formats.adapt("fer2013", path, tmp_path / "o6", name="x", ferplus_mode="vote")


def test_fer2013_gz_is_really_compressed(tmp_path):
    path, _ = _fer_fixture(tmp_path, gz=True)
    assert gzip.decompress(path.read_bytes()).startswith(b"emotion,pixels,Usage")


# ---------------------------------------------------------------------------------------------
# Class-per-folder images
# ---------------------------------------------------------------------------------------------


def test_image_folder_kaggle_layout_with_synonyms(tmp_path):
    rng = np.random.default_rng(1)
    images = {}
    for rel in ("train/angry/Training_1.png", "train/Happiness/Training_2.png", "test/surprised/PublicTest_3.png",
                "test/sad/PublicTest_4.png"):
        images[rel] = random_rgb(rng)
        write_image(tmp_path / "src" / rel, images[rel])
    (tmp_path / "src" / "train" / "angry" / "Thumbs.db").write_bytes(b"junk")  # skipped by suffix
    out = tmp_path / "out"
    card = formats.adapt("image_folder", tmp_path / "src", out, name="kaggle")
    df = _check_prepared(out)
    assert card.classes == EXPRESSIONS and card.splits == ("train", "test")
    by_source = df.set_index("source")
    assert by_source.loc["train/Happiness/Training_2.png", "label"] == EXPRESSIONS.index("happy")
    assert by_source.loc["test/surprised/PublicTest_3.png", "split"] == "test"
    for rel, rgb in images.items():
        row = by_source.loc[rel]
        np.testing.assert_array_equal(read_image(out, row["path"]), rgb)  # PNG: exact
        assert row["content_hash"] == content_hash(rgb)


def _ckplus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    root = tmp_path / "CK+48"
    for cls in ("anger", "contempt", "happy"):
        for subject in range(10, 20):
            write_image(root / cls / f"S{subject:03d}_001_{subject:08d}.png", random_rgb(rng, 8))
    return root


def test_image_folder_ckplus_unknown_classes_and_subject_held_out(tmp_path):
    root = _ckplus(tmp_path)
    card = formats.adapt("image_folder", root, tmp_path / "extend", name="ck")
    df = _check_prepared(tmp_path / "extend")
    assert card.classes == (*EXPRESSIONS, "contempt") and len(df) == 30
    assert (df.loc[df["label_name"] == "contempt", "label"] == 7).all()
    assert set(df["split"]) == {"train"} and set(df["subject"]) == {f"S{s:03d}" for s in range(10, 20)}

    card = formats.adapt("image_folder", root, tmp_path / "drop", name="ck", unknown_classes="drop", test_fraction=0.4)
    df = _check_prepared(tmp_path / "drop")
    assert card.classes == EXPRESSIONS and len(df) == 20
    assert card.provenance["dropped_images"] == {"contempt": 10}
    train, test = set(df.loc[df["split"] == "train", "subject"]), set(df.loc[df["split"] == "test", "subject"])
    assert train and test and not train & test and card.subject_independent
    with pytest.raises(ValueError, match="contempt"):
        formats.adapt("image_folder", root, tmp_path / "err", name="ck", unknown_classes="error")


def test_image_folder_numbered_folders_need_a_mapping_and_corrupt_files_stay_visible(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "raf"
    write_image(root / "train" / "1" / "train_00001_aligned.jpg", random_rgb(rng, 32))
    write_image(root / "test" / "4" / "test_0001_aligned.jpg", random_rgb(rng, 32))
    with pytest.raises(ValueError, match="folder_names"):
        formats.adapt("image_folder", root, tmp_path / "o1", name="raf")
    (root / "test" / "4" / "test_0002_aligned.jpg").write_bytes(b"not an image")
    formats.adapt("image_folder", root, tmp_path / "o2", name="raf", folder_names=image_folder.RAFDB_FOLDERS)
    df = _check_prepared(tmp_path / "o2").set_index("source")
    assert df.loc["train/1/train_00001_aligned.jpg", "label_name"] == "surprise"
    assert df.loc["test/4/test_0001_aligned.jpg", "label_name"] == "happy"
    assert df.loc["test/4/test_0002_aligned.jpg", "content_hash"] == ""  # the gate will flag it
    mixed = tmp_path / "mixed"
    write_image(mixed / "train" / "happy" / "a.png", random_rgb(rng))
    write_image(mixed / "sad" / "b.png", random_rgb(rng))
    with pytest.raises(ValueError, match="mixes"):
        formats.adapt("image_folder", mixed, tmp_path / "o3", name="m")


# ---------------------------------------------------------------------------------------------
# Micro-expressions
# ---------------------------------------------------------------------------------------------


def _assert_clip_close(actual: np.ndarray, expected: np.ndarray, tol: float = 4.0) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual.astype(np.float64) - expected).mean() < tol  # JPEG: approximately


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_casme2_sheet_frame_numbers_become_indices(tmp_path, suffix):
    written = write_casme2(tmp_path / "src", np.random.default_rng(4), suffix)
    out = tmp_path / "out"
    card = formats.adapt("casme2", tmp_path / "src", out, name="casme")
    df = _check_prepared(out).set_index("id")
    assert card.classes == CASME2_CLASSES and card.subject_independent and card.splits == ("train",)
    assert "sub02/EP01_11f" not in df.index and card.provenance["dropped_emotions"] == {"fear": 1}
    happy = df.loc["sub01/EP02_01f"]
    assert (happy["onset"], happy["apex"], happy["offset"], happy["num_frames"]) == (0, 2, 4, 5)
    assert happy["label"] == CASME2_CLASSES.index("happiness") and happy["subject"] == "sub01"
    assert happy["path"] == "clips/CASME2-RAW/sub01/EP02_01f"
    _assert_clip_close(read_clip(out, happy["path"]), written["sub01/EP02_01f"])
    assert happy["content_hash"] == content_hash(read_clip(out, happy["path"]))
    assert df.loc["sub01/EP03_02", "apex"] == -1  # "/" in the sheet
    missing = df.loc["sub02/EP09_09"]  # listed, frames missing: a visible row, not an error
    assert missing["num_frames"] == 0 and not (out / missing["path"]).exists()

    formats.adapt("casme2", tmp_path / "src", tmp_path / "o2", name="c", other_emotions="others",
                  test_subjects=[2], estimate_missing_apex=True)
    df2 = read_manifest(tmp_path / "o2").set_index("id")
    assert df2.loc["sub02/EP01_11f", "label_name"] == "others" and df2.loc["sub02/EP01_11f", "split"] == "test"
    assert df2.loc["sub01/EP03_02", "apex"] == 3  # the fixture's peak frame
    formats.adapt("casme2", tmp_path / "src", tmp_path / "o3", name="c", classes="composite")
    df3 = read_manifest(tmp_path / "o3").set_index("id")
    assert df3.loc["sub01/EP03_02", "label_name"] == "negative"  # repression
    with pytest.raises(ValueError, match="not in the dataset"):
        formats.adapt("casme2", tmp_path / "src", tmp_path / "o4", name="c", test_subjects=["sub99"])


def test_casme2_bad_sheets_raise_value_error(tmp_path):
    write_casme2(tmp_path, np.random.default_rng(5))
    sheet = tmp_path / "CASME2-coding-20140508.csv"
    table = pd.read_csv(sheet, dtype=str)
    table.loc[0, "Estimated Emotion"] = "hapiness"
    table.to_csv(sheet, index=False)
    with pytest.raises(ValueError, match="unknown emotion"):
        formats.adapt("casme2", tmp_path, tmp_path / "o1", name="c")
    table.drop(columns="OnsetFrame").to_csv(sheet, index=False)
    with pytest.raises(ValueError, match="no header row"):
        formats.adapt("casme2", tmp_path, tmp_path / "o2", name="c")
    sheet.write_bytes(b"\x00\x01 not a sheet")
    sheet.rename(tmp_path / "CASME2-coding-broken.xlsx")
    with pytest.raises(ValueError, match="cannot read coding sheet"):
        formats.adapt("casme2", tmp_path, tmp_path / "o3", name="c")


def test_samm_xlsx_with_title_rows(tmp_path):
    written = write_samm(tmp_path, np.random.default_rng(6))
    out = tmp_path / "out"
    card = formats.adapt("samm", tmp_path, out, name="samm", classes="samm")
    df = _check_prepared(out)
    assert card.classes == micro.SAMM_CLASSES
    row = df.iloc[0]
    assert (row["id"], row["subject"], row["label_name"]) == ("006/006_1_2", "006", "contempt")
    assert (row["onset"], row["apex"], row["offset"], row["num_frames"]) == (0, 3, 4, 5)
    _assert_clip_close(read_clip(out, row["path"]), written["006/006_1_2"])
    card = formats.adapt("samm", tmp_path, tmp_path / "c", name="samm")  # composite by default
    assert card.classes == SMIC_CLASSES
    assert read_manifest(tmp_path / "c")["label_name"].tolist() == ["negative"]


def test_smic_apex_is_estimated_and_bmp_is_exact(tmp_path):
    written = write_smic(tmp_path, np.random.default_rng(7))
    out = tmp_path / "out"
    card = formats.adapt("smic", tmp_path, out, name="smic", test_subjects=["s2"])
    df = _check_prepared(out).set_index("id")
    assert card.classes == SMIC_CLASSES and card.splits == ("train", "test")
    for clip_id, (frames, peak) in written.items():
        row = df.loc[clip_id]
        np.testing.assert_array_equal(read_clip(out, row["path"]), frames)
        assert (row["onset"], row["apex"], row["offset"]) == (0, peak, len(frames) - 1)
    assert df.loc["s2/s2_sur_01", "split"] == "test" and df.loc["s1/s1_ne_01", "label_name"] == "negative"
    with pytest.raises(ValueError, match="no SMIC subject folders"):
        formats.adapt("smic", tmp_path / "HS" / "s1", tmp_path / "o2", name="smic")


# ---------------------------------------------------------------------------------------------
# DFEW
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("videos", [False, True])
def test_dfew_folds_and_label_mapping(tmp_path, videos):
    written = write_dfew(tmp_path / "src", np.random.default_rng(8), videos=videos)
    out = tmp_path / "out"
    card = formats.adapt("dfew", tmp_path / "src", out, name="dfew", fold=2)
    df = _check_prepared(out).set_index("id")
    assert card.classes == EXPRESSIONS and card.provenance["clips"] == ("video" if videos else "frames")
    from fer_core.data.labels import DFEW_CLASSES

    for video, (frames, dfew_label) in written.items():
        row = df.loc[video]
        assert row["label_name"] == DFEW_CLASSES[dfew_label - 1]
        assert row["label"] == EXPRESSIONS.index(DFEW_CLASSES[dfew_label - 1])
        assert row["fold"] == (dfew_label - 1) % 5 + 1
        assert row["split"] == ("test" if row["fold"] == 2 else "train")
        _assert_clip_close(read_clip(out, row["path"]), frames, tol=6.0)
        assert row["num_frames"] == len(frames)
    with pytest.raises(ValueError, match="fold"):
        formats.adapt("dfew", tmp_path / "src", tmp_path / "o2", name="d", fold=6)


def test_dfew_bad_labels_raise_and_missing_clips_stay_visible(tmp_path):
    write_dfew(tmp_path, np.random.default_rng(9))
    csv = tmp_path / "EmoLabel_DataSplit" / "test(single-labeled)" / "set_1.csv"
    pd.DataFrame({"video_name": [1, 6, 99], "label": [1, 6, 3]}).to_csv(csv, index=False)
    formats.adapt("dfew", tmp_path, tmp_path / "o1", name="d")
    df = read_manifest(tmp_path / "o1").set_index("id")
    assert df.loc["00099", "num_frames"] == 0 and not (tmp_path / "o1" / df.loc["00099", "path"]).exists()
    pd.DataFrame({"video_name": [1], "label": [8]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="not a DFEW label"):
        formats.adapt("dfew", tmp_path, tmp_path / "o2", name="d")
    pd.DataFrame({"video": [1], "label": [1]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="lacks columns"):
        formats.adapt("dfew", tmp_path, tmp_path / "o3", name="d")


# ---------------------------------------------------------------------------------------------
# AU tables
# ---------------------------------------------------------------------------------------------


def test_au_plain_table_unknown_codes_and_column_names(tmp_path):
    rng = np.random.default_rng(10)
    images = [random_rgb(rng) for _ in range(3)]
    for i, image in enumerate(images):
        write_image(tmp_path / "src" / "img" / f"{i}.png", image)
    pd.DataFrame(
        {
            "image_path": ["img/0.png", "img/1.png", "img/missing.png"],
            "AU01": [1, 0, 999], "AU2": [9, 1, 0], "AU12": [0, "", 1], "AU43": [1, 1, 1],
        }
    ).to_csv(tmp_path / "src" / "emotionet.csv", index=False)
    out = tmp_path / "out"
    card = formats.adapt("au_table", tmp_path / "src", out, name="au")
    df = _check_prepared(out)
    assert card.au_names == AU_NAMES and card.provenance["ignored_aus"] == ["AU43"]
    aus = np.array(df["aus"].tolist())
    col = {name: AU_NAMES.index(name) for name in ("AU1", "AU2", "AU12", "AU4")}
    assert aus[:, col["AU1"]].tolist() == [1, 0, -1]
    assert aus[:, col["AU2"]].tolist() == [-1, 1, 0]
    assert aus[:, col["AU12"]].tolist() == [0, -1, 1]
    assert (aus[:, col["AU4"]] == -1).all()  # not in the table: unknown
    assert (df["label_set"] == "clean").all() and (df["label"] == -1).all()
    np.testing.assert_array_equal(read_image(out, df["path"][0]), images[0])
    assert df["content_hash"][2] == "" and not (out / df["path"][2]).exists()

    pd.DataFrame({"image": ["img/0.png"], "AU1": ["yes"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="not a number"):
        formats.adapt("au_table", tmp_path / "bad.csv", tmp_path / "o2", name="au")
    pd.DataFrame({"image": ["img/0.png"], "smile": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="no AU columns"):
        formats.adapt("au_table", tmp_path / "bad.csv", tmp_path / "o3", name="au")


def test_au_intensity_threshold(tmp_path):
    write_image(tmp_path / "a.png", random_rgb(np.random.default_rng(11)))
    pd.DataFrame({"file": ["a.png"] * 4, "AU1": [0, 2, 5, 9]}).to_csv(tmp_path / "disfa.csv", index=False)
    formats.adapt("au_table", tmp_path / "disfa.csv", tmp_path / "raw", name="d", au_names=["AU1"])
    assert [a[0] for a in read_manifest(tmp_path / "raw")["aus"]] == [0, 2, 5, -1]  # 2, 5 left for the gate
    formats.adapt("au_table", tmp_path / "disfa.csv", tmp_path / "bin", name="d", au_names=["AU1"],
                  intensity_threshold=2)
    assert [a[0] for a in read_manifest(tmp_path / "bin")["aus"]] == [0, 1, 1, -1]


def test_au_cotraining_layout_label_sets_and_truth(tmp_path):
    rng = np.random.default_rng(12)
    src = tmp_path / "src"
    for rel in ("images/clean/0.png", "images/noisy/0.png", "images/noisy/1.png", "unlabelled/u0.png"):
        write_image(src / rel, random_rgb(rng))
    write_image(tmp_path / "outside.png", random_rgb(rng))
    pd.DataFrame({"image": ["images/clean/0.png", "../outside.png"], "subject": ["p1", "p2"], "AU1": [1, 0],
                  "AU4": [0, 1]}).to_csv(src / "clean.csv", index=False)
    pd.DataFrame({"image": ["images/noisy/0.png", "images/noisy/1.png"], "AU1": [0, 1], "AU4": [1, 999]}).to_csv(
        src / "noisy.csv", index=False
    )
    pd.DataFrame({"image": ["images/noisy/0.png", "images/noisy/1.png"], "AU1": [1, 1], "AU4": [1, 0]}).to_csv(
        src / "noisy_truth.csv", index=False
    )
    out = tmp_path / "out"
    card = formats.adapt("au_table", src, out, name="co", au_names=["AU1", "AU4"], allow_outside_source=True)
    df = _check_prepared(out).set_index("id")
    assert card.provenance["layout"] == "co-training"
    assert card.provenance["label_sets"] == {"clean": 2, "noisy": 2, "unlabelled": 1}
    assert df.loc["noisy/images/noisy/1", "aus"].tolist() == [1, -1]
    assert df.loc["noisy/images/noisy/1", "true_aus"].tolist() == [1, 0]
    assert df.loc["clean/images/clean/0", "true_aus"] is None
    assert df.loc["unlabelled/u0", "aus"].tolist() == [-1, -1] and df.loc["unlabelled/u0", "label_set"] == "unlabelled"
    assert df.loc["clean/images/clean/0", "subject"] == "p1"
    outside = df[df["source"] == "../outside.png"].iloc[0]
    assert outside["path"].startswith("images/external/") and (out / outside["path"]).is_file()
    with pytest.raises(ValueError, match="au_names"):
        formats.adapt("au_table", src, tmp_path / "o2", name="co", au_names=["smile"])


def test_every_format_is_registered_with_its_task():
    tasks = {f.name: f.task for f in formats.list_formats()}
    expected = {
        "fer2013": "static", "image_folder": "static", "casme2": "micro", "samm": "micro", "smic": "micro",
        "dfew": "dynamic", "au_table": "au",
    }
    assert {name: tasks.get(name) for name in expected} == expected


# ---------------------------------------------------------------------------------------------
# SynthFACS written in each real layout, adapted back
# ---------------------------------------------------------------------------------------------


def _generator(seed: int, image_size: int, difficulty: float = 0.0):
    from fer_core.data.synthfacs import SynthFACS

    return SynthFACS(seed, image_size, difficulty)


@pytest.mark.parametrize("name", ["fer2013", "image_folder", "casme2", "samm", "smic", "dfew", "au_table"])
def test_synthetic_writer_round_trips_through_its_adapter(tmp_path, name):
    fmt = formats.get_format(name)
    source = fmt.write_synthetic(tmp_path / "src", seed=3)
    out = tmp_path / "out"
    card = formats.adapt(name, source, out, name=f"synth-{name}")
    df = _check_prepared(out)
    assert len(df) > 0 and card.task == fmt.task and (df["task"] == fmt.task).all()
    assert (df["content_hash"] != "").all()  # every reference decodes
    assert all(resolve_reference(out, ref)[0].exists() for ref in df["path"])
    # Deterministic: adapting again gives the same manifest (dataset versioning relies on it).
    formats.adapt(name, source, tmp_path / "again", name=f"synth-{name}")
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "again"), read_manifest(out))


def test_synthetic_fer2013_pixels_labels_and_ferplus(tmp_path):
    source = fer2013.write_synthetic(tmp_path / "src", seed=1, size=40)
    sample = _generator(1, 48).expression_set(40, 8)
    greys = [cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY) for im in sample.images]
    formats.adapt("fer2013", source, tmp_path / "plain", name="f")
    df = read_manifest(tmp_path / "plain")
    assert df["label"].tolist() == np.asarray(sample.labels).tolist()
    for i, row in df.iterrows():
        np.testing.assert_array_equal(read_image(tmp_path / "plain", row["path"]), greys[i])
    card = formats.adapt("fer2013", source, tmp_path / "soft", name="f", ferplus=source / "fer2013new.csv",
                         ferplus_mode="soft")
    soft = read_manifest(tmp_path / "soft")
    assert 0 < len(soft) <= 40 and card.classes[-1] == "contempt"
    kept = [int(i[3:]) for i in soft["id"]]
    # At difficulty 0 most voters agree with the generator's expression.
    agree = np.mean(soft["label"].to_numpy() == np.asarray(sample.labels)[kept])
    assert agree > 0.8


@pytest.mark.parametrize("with_splits", [True, False])
def test_synthetic_image_folder_layouts(tmp_path, with_splits):
    source = image_folder.write_synthetic(tmp_path / "src", seed=2, size=30, with_splits=with_splits)
    sample = _generator(2, 48).expression_set(30, 6)
    card = formats.adapt("image_folder", source, tmp_path / "out", name="i", test_fraction=0.0 if with_splits else 0.3)
    df = read_manifest(tmp_path / "out")
    assert len(df) == 30 and card.classes == EXPRESSIONS
    for row in df.itertuples():
        i = int(Path(row.source).stem.split("_")[-1])
        assert row.label == int(sample.labels[i])
        np.testing.assert_array_equal(read_image(tmp_path / "out", row.path), sample.images[i])
    train = set(df.loc[df["split"] == "train", "subject"])
    test = set(df.loc[df["split"] == "test", "subject"])
    assert train and test and not train & test


@pytest.mark.parametrize("name", ["casme2", "samm"])
def test_synthetic_micro_sheets_frames_and_annotations(tmp_path, name):
    writer = micro.write_synthetic_casme2 if name == "casme2" else micro.write_synthetic_samm
    source = writer(tmp_path / "src", seed=4, size=6, num_frames=6, num_subjects=3)
    clips = _generator(4, 64).micro_clips(6, scheme="casme2" if name == "casme2" else "smic", num_frames=6,
                                          num_subjects=3)
    card = formats.adapt(name, source, tmp_path / "out", name="m")
    df = read_manifest(tmp_path / "out")  # sheet order == generator order
    assert len(df) == 6 and card.subject_independent
    names = [str(clips.label_names[int(y)]) for y in clips.labels]
    assert df["label_name"].tolist() == names
    assert df["onset"].tolist() == np.asarray(clips.onset).tolist()
    assert df["offset"].tolist() == np.asarray(clips.offset).tolist()
    expected_apex = np.asarray(clips.apex).tolist()
    if name == "casme2":
        expected_apex[0] = -1  # the writer marks the first apex "/" like the real sheet
    assert df["apex"].tolist() == expected_apex
    for i, row in df.iterrows():
        _assert_clip_close(read_clip(tmp_path / "out", row["path"]), clips.clips[i], tol=6.0)


def test_synthetic_smic_is_lossless(tmp_path):
    source = micro.write_synthetic_smic(tmp_path / "src", seed=5, size=6, num_frames=6, num_subjects=3)
    clips = _generator(5, 64).micro_clips(6, scheme="smic", num_frames=6, num_subjects=3)
    formats.adapt("smic", source, tmp_path / "out", name="s")
    df = read_manifest(tmp_path / "out")
    expected = {content_hash(np.asarray(c)): str(clips.label_names[int(y)]) for c, y in zip(clips.clips, clips.labels)}
    assert dict(zip(df["content_hash"], df["label_name"])) == expected  # BMP frames: bit-exact clips


def test_synthetic_dfew_folds_by_subject(tmp_path):
    source = dfew.write_synthetic(tmp_path / "src", seed=6, size=10, num_frames=4, num_subjects=5)
    clip_set = _generator(6, 64).dynamic_clips(10, 4, 5)
    formats.adapt("dfew", source, tmp_path / "out", name="d", fold=3)
    df = read_manifest(tmp_path / "out")
    assert len(df) == 10 and set(df["fold"]) <= {1, 2, 3, 4, 5}
    subjects = [str(s) for s in clip_set.subjects]
    for i, row in df.iterrows():  # ids 00001.. in generator order
        assert row["label_name"] == str(clip_set.label_names[int(clip_set.labels[i])])
        assert EXPRESSIONS[row["label"]] == row["label_name"]
        _assert_clip_close(read_clip(tmp_path / "out", row["path"]), clip_set.clips[i], tol=6.0)
    fold_of_subject = {}
    for subject, fold in zip(subjects, df["fold"]):
        assert fold_of_subject.setdefault(subject, fold) == fold


def test_synthetic_au_cotraining_set(tmp_path):
    source = au_table.write_synthetic(tmp_path / "src", seed=7, size=16, unknown_rate=0.2)
    sets = _generator(7, 64).au_sets(8, 4, 4, 0.2)
    card = formats.adapt("au_table", source, tmp_path / "out", name="a")
    df = read_manifest(tmp_path / "out")
    assert card.provenance["label_sets"] == {"clean": 8, "noisy": 4, "unlabelled": 4}
    for label_set, subset in (("clean", sets.clean), ("noisy", sets.noisy)):
        rows = df[df["label_set"] == label_set].reset_index(drop=True)
        written = pd.read_csv(source / f"{label_set}.csv")[list(AU_NAMES)].to_numpy()
        aus = np.array(rows["aus"].tolist())
        unknown = np.isin(written, (9, 999))
        assert unknown.any()
        assert (aus[unknown] == -1).all()
        np.testing.assert_array_equal(aus[~unknown], np.asarray(subset.labels)[~unknown])
        for i, row in rows.iterrows():
            np.testing.assert_array_equal(read_image(tmp_path / "out", row["path"]), subset.images[i])
    noisy = df[df["label_set"] == "noisy"]
    np.testing.assert_array_equal(np.array(noisy["true_aus"].tolist()), np.asarray(sets.noisy.true_labels))
