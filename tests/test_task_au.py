"""The au_cotrain training task: label-set targets, splits, pseudo labels, metrics and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fer_core.data.formats import adapt, get_format
from fer_core.metrics.classification import multilabel_f1
from fer_core.models import create_model
from fer_core.models.au_cotrain import pseudo_labels
from fer_core.training.tasks import create_task, get_recipe
from fer_core.training.tasks.au import au_matrix, smoothed_frequencies
from fer_core.training.trainer import Trainer


def _shrunk(**overrides):
    base = {"device": "cpu", "epochs": 3, "batch_size": 16, "max_steps_per_epoch": 0, "early_stopping_patience": 0,
            "model_kwargs.img_size": 32, "model_kwargs.width": 4}
    return get_recipe("au_cotrain", "quick").with_overrides({**base, **overrides})


@pytest.fixture(scope="module")
def au_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("au")
    source = get_format("au_table").write_synthetic(tmp / "src", seed=0, size=64, image_size=40, flip_rate=0.3)
    adapt("au_table", source, tmp / "prepared", name="au-synth")
    return tmp / "prepared"


def test_label_sets_become_accurate_inaccurate_or_no_targets(au_root):
    task = create_task("au_cotrain", au_root, _shrunk())
    manifest = task.manifest
    for label_set in ("clean", "noisy", "unlabelled"):
        row = manifest[manifest["label_set"] == label_set].iloc[0]
        t = task._targets(row)
        aus = np.asarray(row["aus"])
        np.testing.assert_array_equal(t["accurate"], aus if label_set == "clean" else -1)
        np.testing.assert_array_equal(t["inaccurate"], aus if label_set == "noisy" else -1)
        assert t["has_accurate"] == (label_set == "clean") and t["has_inaccurate"] == (label_set == "noisy")
        if label_set == "noisy":
            np.testing.assert_array_equal(t["true_aus"], np.asarray(row["true_aus"]))
            assert (t["true_aus"] != t["inaccurate"]).any(), "flip rate 0.3 must have flipped something"
        else:
            assert (t["true_aus"] == -1).all()


def test_val_holds_clean_and_noisy_rows_and_training_keeps_unlabelled(au_root):
    recipe = _shrunk()
    task = create_task("au_cotrain", au_root, recipe)
    splits = task.splits(recipe)
    assert set(splits["val"]["label_set"]) == {"clean", "noisy"}
    assert set(splits["train"]["label_set"]) == {"clean", "noisy", "unlabelled"}
    assert not set(splits["val"]["id"]) & set(splits["train"]["id"])
    assert len(splits["val"]) + len(splits["train"]) == len(task.manifest)
    assert task.splits(recipe)["val"]["id"].tolist() == splits["val"]["id"].tolist()  # deterministic


def test_metrics_split_clean_noisy_and_truth_rows():
    from fer_core.training.tasks.au import AUCoTrainTask

    task = object.__new__(AUCoTrainTask)  # the metric code only needs AU names and a threshold
    task.au_names, task.threshold = ("AU1", "AU2"), 0.5
    logits = torch.tensor([[2.0, -2.0], [2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -1.0]])
    labels = torch.tensor([[1, 0], [1, 0], [1, 1], [0, -1], [-1, -1]])
    truth = torch.tensor([[-1, -1], [-1, -1], [0, 1], [0, 1], [-1, -1]])
    label_set = torch.tensor([0, 0, 1, 1, 2])
    metrics = task.compute_metrics({"au_logits": logits}, {"labels": labels, "true_aus": truth, "label_set": label_set})
    pred = (logits > 0).long().numpy()
    clean = multilabel_f1(labels[:2].numpy(), pred[:2], task.au_names)
    noisy = multilabel_f1(labels[2:4].numpy(), pred[2:4], task.au_names)
    true = multilabel_f1(truth[2:4].numpy(), pred[2:4], task.au_names)
    assert metrics["mean_f1"] == clean["mean_f1"] and metrics["f1/AU1"] == clean["f1/AU1"]
    assert metrics["mean_f1_noisy_labels"] == noisy["mean_f1"] and metrics["f1_noisy_labels/AU2"] == noisy["f1/AU2"]
    assert metrics["mean_f1_truth"] == true["mean_f1"] and metrics["f1_truth/AU1"] == true["f1/AU1"]
    assert metrics["mean_f1_truth"] != metrics["mean_f1_noisy_labels"]  # the case tells them apart


def test_pseudo_labels_are_refreshed_from_the_model_each_epoch(au_root):
    torch.set_num_threads(1)
    recipe = _shrunk(loss_kwargs={"semi_supervised": True, "pseudo_threshold": 0.5, "pseudo_start_epoch": 1})
    task = create_task("au_cotrain", au_root, recipe)
    train = task.build_datasets(recipe)["train"]
    torch.manual_seed(0)
    model = create_model("au_cotrain", **{**recipe.model_kwargs, **task.model_overrides()})
    task.build_loss(recipe, model)
    unlabelled = (train.rows["label_set"] == "unlabelled").to_numpy()
    train.set_epoch(0)
    assert (train.pseudo == -1).all()  # before pseudo_start_epoch
    train.set_epoch(1)
    images = torch.stack([train.clean_input(i) for i in np.flatnonzero(unlabelled)])
    np.testing.assert_array_equal(train.pseudo[unlabelled], pseudo_labels(model, images, 0.5).numpy())
    assert (train.pseudo[~unlabelled] == -1).all() and (train.pseudo[unlabelled] >= 0).all()
    _, targets = train[int(np.flatnonzero(unlabelled)[0])]
    assert bool(targets["has_pseudo"]) and (targets["pseudo"] >= 0).all()
    with torch.no_grad():  # new weights -> new pseudo labels at the next epoch
        for head in model.clean_heads:
            head.bias.fill_(-5.0)
    train.set_epoch(2)
    assert (train.pseudo[unlabelled] == 0).all()


def test_training_lowers_the_loss_and_reports_f1_vs_labels_and_truth(au_root):
    torch.set_num_threads(1)
    recipe = _shrunk(epochs=4, lr=3e-3, augment={})
    task = create_task("au_cotrain", au_root, recipe)
    result = Trainer(recipe, task, au_root.parent / "run").fit()
    losses = [h["train/loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    last = result.history[-1]
    for key in ("val/mean_f1", "val/mean_f1_noisy_labels", "val/mean_f1_truth", "val/f1/AU12", "val/f1_truth/AU12",
                "train/clean", "train/noisy", "train/pseudo", "train/orthogonality", "train/consistency"):
        assert key in last, key
    assert recipe.monitor == "val/mean_f1" and recipe.monitor_mode == "max" and task.primary_metric == "mean_f1"
    assert result.best_value == max(h["val/mean_f1"] for h in result.history)
    report = result.extra["report"]
    assert set(report["per_au"]) == set(task.au_names) and "f1_truth" in report["per_au"]["AU1"]


def test_label_frequencies_and_bad_options(au_root):
    labels = np.array([[1, 0, -1], [1, -1, -1], [0, 0, -1]])
    np.testing.assert_allclose(smoothed_frequencies(labels), [3 / 5, 1 / 4, 1 / 2])
    assert au_matrix(np.array([None, [1, 0, -1]], dtype=object), 3).tolist() == [[-1, -1, -1], [1, 0, -1]]
    with pytest.raises(ValueError):
        create_task("au_cotrain", au_root, _shrunk(loss_kwargs={"gama": 0.3}))
    with pytest.raises(ValueError):
        create_task("au_cotrain", au_root, _shrunk(loss_kwargs={"label_frequencies": "dataset"}))
