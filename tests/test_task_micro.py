"""The micro_lsh training task: onset/apex inputs, subject hold-outs, training and LOSO pooling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fer_core.errors import UsageError

from fer_core.data.formats import adapt, get_format
from fer_core.data.manifest import read_manifest
from fer_core.data.preprocess import estimate_apex, onset_apex_pair, to_model_input
from fer_core.data.samples import read_clip
from fer_core.metrics.classification import classification_metrics
from fer_core.data.preprocess import HaarFaceDetector, align_face
from fer_core.models import create_model
from fer_core.training.tasks import create_task, get_recipe
from fer_core.training.tasks.micro import clip_key_frames, drop_rare_classes
from fer_core.training.tasks.micro import run_loso, subject_splits
from fer_core.training.trainer import Trainer


def _shrunk(**overrides):
    base = {"device": "cpu", "epochs": 3, "batch_size": 8, "max_steps_per_epoch": 0, "early_stopping_patience": 0,
            "model_kwargs.img_size": 24, "model_kwargs.width": 4, "model_kwargs.magnifier_width": 4,
            "model_kwargs.num_mag_frames": 3, "model_kwargs.head_hidden": 16}
    return get_recipe("micro_lsh", "quick").with_overrides({**base, **overrides})


@pytest.fixture(scope="module")
def smic_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smic")
    source = get_format("smic").write_synthetic(tmp / "src", seed=0, size=18, image_size=32, num_frames=5,
                                                num_subjects=3)
    adapt("smic", source, tmp / "prepared", name="smic-synth")
    return tmp / "prepared"


@pytest.fixture(scope="module")
def casme2_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("casme2")
    source = get_format("casme2").write_synthetic(tmp / "src", seed=1, size=10, image_size=32, num_frames=6,
                                                  num_subjects=4, missing_apex_rows=2)
    adapt("casme2", source, tmp / "prepared", name="casme2-synth")
    return tmp / "prepared"


def test_input_is_the_onset_apex_pair_and_unknown_apexes_are_estimated(casme2_root):
    torch.set_num_threads(1)
    recipe = _shrunk(augment={}, **{"data.face_crop": False})
    task = create_task("micro_lsh", casme2_root, recipe)
    rows = task.manifest
    assert (rows["apex"] < 0).sum() == 2, "the fixture must exercise unknown apexes"
    for i in range(len(rows)):
        row = rows.iloc[i]
        frames = read_clip(casme2_root, row["path"])
        apex = int(row["apex"]) if row["apex"] >= 0 else estimate_apex(frames, int(row["onset"]), int(row["offset"]))
        want = to_model_input(onset_apex_pair(frames, int(row["onset"]), apex), 24, 3, 0.0, 1.0)
        got = task._decode(casme2_root, row)
        assert got.shape == (2, 3, 24, 24) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, np.round(want * 255).astype(np.uint8))
    x, targets = task.build_datasets(recipe)["train"][0]
    assert x.shape == (2, 3, 24, 24) and targets["label"].dtype == torch.int64


def test_face_registration_crops_onset_and_apex_with_one_transform(casme2_root):
    task = create_task("micro_lsh", casme2_root, _shrunk(augment={}, **{"data.face_crop": True}))  # the paper profile's choice
    assert task.face_crop
    detector = HaarFaceDetector()
    for i in range(4):
        row = task.manifest.iloc[i]
        frames = read_clip(casme2_root, row["path"])
        onset, apex = clip_key_frames(frames, int(row["onset"]), int(row["apex"]), int(row["offset"]))
        faces = detector.detect(frames[onset]) or detector.detect(frames[apex])
        assert faces, "the synthetic faces must be found for this test to mean anything"
        # by hand: the onset's face box aligns both frames
        want = np.stack([align_face(frames[onset], faces[0], (24, 24)), align_face(frames[apex], faces[0], (24, 24))])
        want = np.round(to_model_input(want, 24, 3, 0.0, 1.0) * 255).astype(np.uint8)
        np.testing.assert_array_equal(task._decode(casme2_root, row), want)
    assert task.faces_found == 4 and task.faces_missed == 0


def test_classes_under_the_minimum_are_dropped_and_relabelled():
    manifest = pd.DataFrame({"label": [0] * 12 + [1] * 3 + [2] * 10, "subject": ["a"] * 25})
    rows, names, dropped = drop_rare_classes(manifest, ("happiness", "fear", "others"), 10)
    assert names == ("happiness", "others") and dropped == {"fear": 3}
    assert rows["label"].tolist() == [0] * 12 + [1] * 10
    same, same_names, none = drop_rare_classes(manifest, ("a", "b", "c"), 0)
    assert same is manifest and same_names == ("a", "b", "c") and none == {}
    with pytest.raises(ValueError, match="min_class_clips"):
        drop_rare_classes(manifest, ("a", "b", "c"), 11)


def test_splits_hold_out_whole_subjects(casme2_root):
    manifest = read_manifest(casme2_root)
    splits = subject_splits(manifest, val_fraction=0.25, test_fraction=0.25, seed=3)
    subjects = {k: set(v["subject"]) for k, v in splits.items()}
    assert all(subjects.values())
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
    assert not (subjects["val"] & subjects["test"])
    assert sum(len(v) for v in splits.values()) == len(manifest)
    # A manifest test split wins over the subject draw; a fold takes its subject's rows, whatever their split.
    marked = manifest.assign(split=np.where(manifest["subject"] == "sub02", "test", "train"))
    assert set(subject_splits(marked)["test"]["subject"]) == {"sub02"}
    fold = subject_splits(marked, fold="sub03")
    assert set(fold["test"]["subject"]) == {"sub03"} and "sub03" not in set(fold["train"]["subject"])
    with pytest.raises(ValueError):
        subject_splits(manifest, fold="sub99")


def test_training_lowers_the_loss_and_reports_uf1_uar(smic_root):
    torch.set_num_threads(1)
    recipe = _shrunk(epochs=4, lr=3e-3, augment={})
    task = create_task("micro_lsh", smic_root, recipe)
    result = Trainer(recipe, task, smic_root.parent / "run").fit()
    losses = [h["train/loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    for key in ("val/accuracy", "val/uar", "val/uf1", "val/loss"):
        assert key in result.history[-1]
    assert {"test/accuracy", "test/uar", "test/uf1"} <= set(result.test_metrics)
    report = result.extra["report"]
    cm = np.array(report["confusion_matrix"])
    assert report["split"] == "test" and report["labels"] == ["positive", "negative", "surprise"]
    assert cm.shape == (3, 3) and cm.sum() == len(task.splits(recipe)["test"])


def test_loso_folds_partition_subjects_and_pool_predictions(smic_root, tmp_path):
    torch.set_num_threads(1)
    recipe = _shrunk(epochs=1, augment={})
    seen: list[str] = []
    result = run_loso(recipe, smic_root, tmp_path / "loso", callbacks_factory=lambda s, d: seen.append(s) or [])
    manifest = read_manifest(smic_root)
    subjects = sorted(set(manifest["subject"]))
    assert [f.subject for f in result.folds] == subjects == seen
    for fold in result.folds:  # each fold's test set is exactly its subject's clips, in manifest order
        np.testing.assert_array_equal(fold.y_true, manifest.loc[manifest["subject"] == fold.subject, "label"])
    assert sum(len(f.y_true) for f in result.folds) == len(manifest)
    y_true = np.concatenate([f.y_true for f in result.folds])
    y_pred = np.concatenate([f.y_pred for f in result.folds])
    assert result.pooled == classification_metrics(y_true, y_pred, 3, result.label_names)
    for fold in result.folds:
        assert fold.metrics == classification_metrics(fold.y_true, fold.y_pred, 3, result.label_names)
        assert (fold.run_dir / "best.pt").is_file()
    with pytest.raises(ValueError):
        run_loso(recipe, smic_root, tmp_path / "bad", subjects=["s99"])


def test_profiles_follow_the_method_and_paper_loads_the_pretrained_magnifier(tmp_path):
    paper, quick = get_recipe("micro_lsh", "paper"), get_recipe("micro_lsh", "quick")
    assert paper.model_kwargs["shared_qk"] is False and "shared_qk" not in quick.model_kwargs  # separate W_Q, W_K
    assert paper.model_kwargs["num_mag_frames"] == 32 and paper.model_kwargs["attn_dim"] == 1024
    assert paper.data["magnifier_weights"] == "models:/fer-magnifier@champion"
    assert paper.data["face_crop"] is True and paper.data["min_class_clips"] == 10
    assert quick.data["face_crop"] is False and quick.model_kwargs["magnifier"] == "linear"
    assert paper.optimizer == "adam" and quick.model_kwargs["img_size"] <= 32
    model = create_model("micro_lsh", **paper.model_kwargs)
    assert model.attention.attn_dim == 1024 and model.attention.k_proj is not None and model.attention.n_rounds > 2


def test_freezing_an_untrained_learned_magnifier_is_refused(smic_root):
    recipe = _shrunk(**{"model_kwargs.magnifier": "learned", "model_kwargs.freeze_magnifier": True})
    task = create_task("micro_lsh", smic_root, recipe)
    with pytest.raises(UsageError, match="magnifier_weights"):
        task.build_loss(recipe, create_model("micro_lsh", **{**recipe.model_kwargs, **task.model_overrides()}))


def test_bad_recipe_options_raise_value_error(smic_root):
    task = create_task("micro_lsh", smic_root, _shrunk())
    with pytest.raises(ValueError):
        task.build_loss(_shrunk(loss_kwargs={"gamma": 2.0}), None)
    with pytest.raises(ValueError):
        task.splits(_shrunk(data={"val_fraction": 1.5}))


def test_samm_five_class_option(tmp_path):
    from fer_core.data.formats.micro import SAMM5_CLASSES

    src = get_format("samm").write_synthetic(tmp_path / "src", size=30, image_size=32)
    card = adapt("samm", src, tmp_path / "prepared", name="samm5", classes="samm5")
    manifest = read_manifest(tmp_path / "prepared")
    assert card.classes == SAMM5_CLASSES and manifest["label_name"].isin(SAMM5_CLASSES).all()
    assert set(card.provenance["dropped_emotions"]) <= {"disgust", "fear", "sadness"}
