"""c3d_ecstfl task: clip decoding to the model's fixed length, fold re-splitting, the CE + λ·EC-STFL
loss parts, and an end-to-end quick run (DFEW-layout SynthFACS clips -> adapter -> Trainer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fer_core.data import formats
from fer_core.data.manifest import read_manifest
from fer_core.losses.ecstfl import ec_stfl_loss
from fer_core.training.tasks import create_task, get_recipe
from fer_core.losses.ecstfl import DEFAULT_LAMBDA, EcStflLoss
from fer_core.training.tasks.dynamic import resolve_align_faces, select_fold
from fer_core.training.trainer import Trainer, load_model_from_checkpoint


@pytest.fixture(scope="module")
def dfew_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dfew")
    src = formats.get_format("dfew").write_synthetic(tmp / "src", seed=0, size=420, image_size=32, num_frames=8,
                                                     num_subjects=20)
    formats.adapt("dfew", src, tmp / "prepared", name="dfew-synth", fold=1)
    return tmp / "prepared"


def _recipe(**overrides):
    return get_recipe("c3d_ecstfl", "quick").with_overrides({"device": "cpu", **overrides})


def test_clips_decode_to_the_model_length_and_augment_per_epoch(dfew_root):
    recipe = _recipe(**{"model_kwargs.num_frames": 6})  # resampled from the stored 8 frames
    task = create_task("c3d_ecstfl", dfew_root, recipe)
    datasets = task.build_datasets(recipe)
    assert set(datasets) == {"train", "val", "test"}
    manifest = read_manifest(dfew_root)
    assert len(datasets["test"]) == int((manifest["fold"] == 1).sum())
    assert sum(map(len, datasets.values())) == len(manifest)
    raw = datasets["train"].pixels(0)
    assert raw.shape == (6, 3, 32, 32) and raw.dtype == np.uint8
    x, targets = datasets["train"][0]
    assert x.shape == (6, 3, 32, 32) and targets["label"].dtype == torch.int64
    # training clips change between epochs (augmentation), evaluation clips do not
    train, val = datasets["train"], datasets["val"]
    train.set_epoch(1)
    val.set_epoch(1)
    first_train, first_val = train[0][0], val[0][0]
    train.set_epoch(2)
    val.set_epoch(2)
    assert not torch.equal(first_train, train[0][0]) and torch.equal(first_val, val[0][0])


def test_face_alignment_option_decodes_larger_clips(tmp_path):
    src = formats.get_format("dfew").write_synthetic(tmp_path / "src", seed=1, size=3, image_size=96, num_frames=5)
    formats.adapt("dfew", src, tmp_path / "prepared", name="dfew-align", fold=1)
    recipe = _recipe(**{"data.align_faces": True, "data.val_fraction": 0.0})
    task = create_task("c3d_ecstfl", tmp_path / "prepared", recipe)
    clips = [d.pixels(i) for d in task.build_datasets(recipe).values() for i in range(len(d))]
    assert len(clips) == 3 and all(c.shape == (8, 3, 32, 32) and c.dtype == np.uint8 for c in clips)
    with pytest.raises(ValueError, match="resample"):
        create_task("c3d_ecstfl", tmp_path / "prepared", _recipe(**{"data.resample": "random"}))


def test_face_alignment_is_on_by_default_for_raw_videos_only(dfew_root):
    assert resolve_align_faces("auto", {"clips": "video"}) is True
    assert resolve_align_faces("auto", {"clips": "frames"}) is False  # DFEW's clip_224x224 face crops
    assert resolve_align_faces(True, {"clips": "frames"}) is True
    with pytest.raises(ValueError, match="align_faces"):
        resolve_align_faces("yes", {})
    task = create_task("c3d_ecstfl", dfew_root, _recipe(**{"data.align_faces": "auto"}))
    assert task.align_faces is False  # the synthetic DFEW writes frame folders


def test_one_lambda_default_for_the_class_and_the_task(dfew_root):
    assert EcStflLoss().lambda_weight == DEFAULT_LAMBDA
    recipe = get_recipe("c3d_ecstfl", "quick")
    assert recipe.loss_kwargs.get("lambda_weight", DEFAULT_LAMBDA) == DEFAULT_LAMBDA


def test_fold_option_resplits_the_manifest(dfew_root):
    manifest = read_manifest(dfew_root)
    for fold in (1, 3):
        resplit = select_fold(manifest, fold)
        assert set(resplit.loc[resplit["split"] == "test", "fold"]) == {fold}
        assert (resplit.loc[resplit["split"] == "train", "fold"] != fold).all()
    task = create_task("c3d_ecstfl", dfew_root, _recipe(**{"data.fold": 3}))
    assert (task.manifest.loc[task.manifest["split"] == "test", "fold"] == 3).all()
    with pytest.raises(ValueError, match="fold"):
        select_fold(manifest, 6)


def test_loss_is_ce_plus_lambda_ec_stfl_and_metrics(dfew_root):
    recipe = _recipe(**{"loss_kwargs.lambda_weight": 0.3})
    task = create_task("c3d_ecstfl", dfew_root, recipe)
    from fer_core.models import create_model

    model = create_model("c3d_ecstfl", **{**recipe.model_kwargs, **task.model_overrides()})
    x, targets = next(iter(torch.utils.data.DataLoader(task.build_datasets(recipe)["val"], batch_size=12)))
    outputs = model.forward_train(x)
    total, parts = task.build_loss(recipe, model)(outputs, targets)
    assert set(parts) == {"ce", "ec_stfl"}
    ce = torch.nn.functional.cross_entropy(outputs["logits"], targets["label"])
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["ec_stfl"], ec_stfl_loss(outputs["features"], targets["label"]).detach())
    torch.testing.assert_close(total, ce + 0.3 * parts["ec_stfl"])
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 0, 2, 2, 2, 2]), 7).float()
    metrics = task.compute_metrics({"logits": logits}, {"label": labels})
    assert metrics["accuracy"] == metrics["war"] == pytest.approx(7 / 8)
    assert metrics["uar"] == pytest.approx((1 + 0.5 + 1) / 3)


@pytest.mark.slow
def test_quick_training_end_to_end_learns(dfew_root, tmp_path):
    """18 epochs x 11 steps (285 training clips of 20 subjects, batch 28) of the quick C3D, Adam 1e-3
    at a constant rate, flip-only augmentation.

    C3D has no batch norm and sits on a plateau for ~100 steps before it starts to separate the
    classes. Measured on the shared CPU (~30 s CPU, 60-75 s wall of fit): train loss 2.32 -> 1.02,
    test UAR 0.39 / WAR 0.33 (chance 0.143); 25 epochs without augmentation reached UAR 0.54.
    Thresholds: the loss falls by 40 %, test UAR >= 2 x chance.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = _recipe(epochs=18, max_steps_per_epoch=40, early_stopping_patience=0, scheduler="none",
                         augment={"hflip": True, "rotation_deg": 0.0, "crop_area": [1.0, 1.0], "gamma_max": 1.0,
                                  "noise_var": 0.0, "erase_prob": 0.0})
        task = create_task("c3d_ecstfl", dfew_root, recipe)
        result = Trainer(recipe, task, tmp_path).fit()
    finally:
        torch.set_num_threads(threads)
    history = result.history
    print({k: round(v, 3) for k, v in result.test_metrics.items() if k.count("/") == 1},
          [round(h["train/loss"], 2) for h in history])
    assert {"train/ce", "train/ec_stfl", "val/uar", "val/war"} <= set(history[0])
    assert history[-1]["train/loss"] < 0.6 * history[0]["train/loss"], [round(h["train/loss"], 3) for h in history]
    test = result.test_metrics
    for key in ("accuracy", "war", "uar", "uf1"):
        assert 0.0 <= test[f"test/{key}"] <= 1.0
    assert test["test/uar"] >= 2.0 / 7, test
    report = result.extra["report"]
    assert report["split"] == "test" and np.asarray(report["confusion_matrix"]).shape == (7, 7)
    model, state = load_model_from_checkpoint(result.best_checkpoint)
    assert state["network"] == "c3d_ecstfl" and model.metadata.input.shape == (8, 3, 32, 32)
    with torch.no_grad():
        assert model(task.build_datasets(recipe)["test"][0][0][None]).shape == (1, 7)


def test_profiles():
    paper, quick = get_recipe("c3d_ecstfl", "paper"), get_recipe("c3d_ecstfl", "quick")
    assert paper.model_kwargs == {} and paper.batch_size == 32 and paper.loss_kwargs["lambda_weight"] == 0.1
    assert quick.model_kwargs["num_frames"] == 8 and quick.model_kwargs["img_size"] == 32
    assert quick.model_kwargs["fc_width"] == 128 and quick.max_steps_per_epoch > 0
