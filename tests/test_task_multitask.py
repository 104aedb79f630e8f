"""multitask_fer task: landmark geometry through resize and flip, NaN masking, and an end-to-end
quick run (AffectNet-layout SynthFACS data -> adapter -> task -> Trainer -> checkpoint)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from fer_core.data import formats
from fer_core.training.tasks import create_task, get_recipe
from fer_core.training.tasks.multitask import LandmarkFaceDataset, mirror_landmarks, scale_landmarks
from fer_core.training.trainer import Trainer, load_model_from_checkpoint


@pytest.fixture(scope="module")
def affectnet_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("affectnet")
    src = formats.get_format("affectnet").write_synthetic(
        tmp / "src", seed=0, size=1400, image_size=64, num_subjects=24, difficulty=0.3,
        missing_va_fraction=0.05, missing_landmarks_fraction=0.05,
    )
    formats.adapt("affectnet", src, tmp / "prepared", name="affectnet-synth")
    return tmp / "prepared"


def _recipe(**overrides):
    return get_recipe("multitask_fer", "quick").with_overrides({"device": "cpu", **overrides})


def test_landmarks_follow_the_resize():
    # A Gaussian blob centred on a known sub-pixel point, resized the way to_model_input resizes.
    height, width, point = 96, 120, np.array([[71.3, 40.6]])
    ys, xs = np.mgrid[0:height, 0:width]
    blob = np.exp(-((xs - point[0, 0]) ** 2 + (ys - point[0, 1]) ** 2) / (2 * 6.0**2))
    small = cv2.resize(blob, (64, 64), interpolation=cv2.INTER_AREA)
    sy, sx = np.mgrid[0:64, 0:64]
    centroid = np.array([(small * sx).sum(), (small * sy).sum()]) / small.sum()
    np.testing.assert_allclose(scale_landmarks(point, (height, width), (64, 64))[0], centroid, atol=0.05)


def test_mirror_keeps_ibug_order_and_is_an_involution():
    points = torch.rand(68, 2) * 63
    points[36], points[45] = torch.tensor([20.0, 30.0]), torch.tensor([44.0, 30.0])
    mirrored = mirror_landmarks(points, 64)
    # point 36 is still the outer corner of the eye on the image's left, 45 the one on the right
    assert mirrored[36, 0] < mirrored[45, 0]
    torch.testing.assert_close(mirrored[36], torch.tensor([63.0 - 44.0, 30.0]))
    torch.testing.assert_close(mirror_landmarks(mirrored, 64), points)


def test_dataset_targets_flip_and_masking(affectnet_root):
    recipe = _recipe(augment={"hflip": True, "rotation_deg": 0.0, "crop_area": [1.0, 1.0], "gamma_max": 1.0,
                              "noise_var": 0.0, "erase_prob": 0.0})
    task = create_task("multitask_fer", affectnet_root, recipe)
    datasets = task.build_datasets(recipe)
    assert set(datasets) == {"train", "val", "test"} and all(len(d) for d in datasets.values())
    x, targets = datasets["val"][0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert targets["expression"].dtype == torch.int64 and targets["valence_arousal"].shape == (2,)
    assert targets["landmarks"].shape == (68, 2)
    # NaN targets where the annotation is missing (the loss masks them), finite elsewhere
    test = datasets["test"]
    va = torch.stack([test[i][1]["valence_arousal"] for i in range(len(test))])
    points = torch.stack([test[i][1]["landmarks"] for i in range(len(test))])
    assert torch.isnan(va).any() and torch.isfinite(va).any()
    assert torch.isnan(points).any() and torch.isfinite(points).all(dim=(1, 2)).any()
    # landmarks sit inside the 64x64 input (the 64-px face crop maps ~1:1)
    finite = points[torch.isfinite(points).all(dim=2)]
    assert finite.min() > 0 and finite.max() < 63

    # A flipped training sample is the mirror of the plain one, image and landmarks alike.
    train = datasets["train"]
    index = next(i for i in range(len(train)) if np.isfinite(train.decoded(i)[1]).all())
    plain = LandmarkFaceDataset(train.root, train.rows, task.meta)[index]
    flips = 0
    for epoch in range(8):
        train.set_epoch(epoch)
        x, targets = train[index]
        if torch.equal(x, plain[0]):
            torch.testing.assert_close(targets["landmarks"], plain[1]["landmarks"])
        else:
            flips += 1
            torch.testing.assert_close(x, plain[0].flip(-1))
            torch.testing.assert_close(targets["landmarks"], mirror_landmarks(plain[1]["landmarks"], 64))
    assert 0 < flips < 8


def test_geometric_augmentation_is_refused(affectnet_root):
    recipe = _recipe(augment={"rotation_deg": 10.0, "crop_area": [1.0, 1.0]})
    task = create_task("multitask_fer", affectnet_root, recipe)
    with pytest.raises(ValueError, match="landmarks"):
        task.build_datasets(recipe)


def test_loss_parts_and_metrics_by_hand(affectnet_root):
    recipe = _recipe()
    task = create_task("multitask_fer", affectnet_root, recipe)
    from fer_core.models import create_model

    model = create_model("multitask_fer", **{**recipe.model_kwargs, **task.model_overrides()})
    x, targets = next(iter(torch.utils.data.DataLoader(task.build_datasets(recipe)["val"], batch_size=16)))
    total, parts = task.build_loss(recipe, model)(model.forward_train(x), targets)
    assert set(parts) == {"expression", "valence_arousal", "heatmaps"} and torch.isfinite(total)
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-5)  # unit weights
    # perfect predictions score perfectly; unlabelled / unannotated rows are skipped
    targets = {"expression": torch.tensor([0, 1, 2, -1]),
               "valence_arousal": torch.tensor([[0.5, 0.1], [-0.5, 0.3], [0.2, -0.4], [math.nan, math.nan]]),
               "landmarks": torch.rand(4, 68, 2) * 60 + 2}
    targets["landmarks"][3] = math.nan
    outputs = {"logits": torch.nn.functional.one_hot(targets["expression"].clamp_min(0), 7).float(),
               "valence_arousal": targets["valence_arousal"].clone(), "landmarks": targets["landmarks"].clone()}
    metrics = task.compute_metrics(outputs, targets)
    assert metrics["accuracy"] == 1.0 and metrics["uar"] == 1.0 and metrics["nme"] == pytest.approx(0.0)
    assert metrics["ccc_valence"] == pytest.approx(1.0, abs=1e-5) and metrics["rmse_arousal"] == pytest.approx(0.0)


@pytest.mark.slow
def test_quick_training_end_to_end(affectnet_root, tmp_path):
    """5 epochs x 30 steps of the quick network on 1,400 SynthFACS faces (difficulty 0.3).

    Measured on the shared CPU (~35-45 s of fit): val NME 0.19 after epoch 1 -> 0.09 after epoch 5,
    test NME ~0.10, train loss 4.9 -> 3.8, arousal CCC ~0.2-0.3; expression accuracy is still near
    chance at this budget (the model zoo's 64-wide test needs ~150 steps of a wider net for 0.3).
    Thresholds: the loss falls by 15 %, val NME halves-ish (<= 0.65 x epoch 1), test NME <= 0.13.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = _recipe(epochs=5, max_steps_per_epoch=30, early_stopping_patience=0)
        task = create_task("multitask_fer", affectnet_root, recipe)
        result = Trainer(recipe, task, tmp_path).fit()
    finally:
        torch.set_num_threads(threads)
    history = result.history
    assert len(history) == 5 and {"train/expression", "train/valence_arousal", "train/heatmaps"} <= set(history[0])
    assert history[-1]["train/loss"] < 0.85 * history[0]["train/loss"], [h["train/loss"] for h in history]
    assert history[-1]["val/nme"] <= 0.65 * history[0]["val/nme"], [h["val/nme"] for h in history]
    test = result.test_metrics
    for key in ("accuracy", "uar", "uf1"):
        assert 0.0 <= test[f"test/{key}"] <= 1.0
    for key in ("ccc_valence", "ccc_arousal"):
        assert -1.0 <= test[f"test/{key}"] <= 1.0
    assert 0.0 < test["test/nme"] <= 0.13, test
    report = result.extra["report"]
    assert report["split"] == "test" and len(report["confusion_matrix"]) == 7 and len(report["landmark_nme"]) == 68
    assert sum(map(sum, report["confusion_matrix"])) == len(task.build_datasets(recipe)["test"])
    model, state = load_model_from_checkpoint(result.best_checkpoint)
    assert state["network"] == "multitask_fer" and model.metadata.input_size == (64, 64)
    assert model.metadata.label_names == tuple(task.label_names)
    x, _ = task.build_datasets(recipe)["test"][0]
    with torch.no_grad():
        assert model(x[None])[3].shape == (1, 68, 2)


def test_profiles_and_cli_listing(capsys):
    from fer_cli.main import main

    paper, quick = get_recipe("multitask_fer", "paper"), get_recipe("multitask_fer", "quick")
    # the method's pyramid, spelled out; the rest are the model defaults
    assert paper.model_kwargs == {"pyramid_input": "heatmaps", "encoder_placement": "lateral"}
    assert paper.optimizer == "adam" and paper.monitor == "val/loss"
    assert quick.model_kwargs["width"] < 256 and quick.max_steps_per_epoch > 0
    assert main(["train", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "multitask_fer" in listing and "c3d_ecstfl" in listing
