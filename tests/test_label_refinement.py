"""AU noisy-label rounds: refinement math, frozen-trunk retraining, DVC versions and MLflow child runs."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from fer_core.data.formats import adapt, get_format
from fer_core.data.manifest import read_card, read_manifest
from fer_core.models import create_model
from fer_core.training.label_refinement import label_agreement, refine_noisy_labels, run_au_rounds
from fer_core.training.checkpoint import load_checkpoint
from fer_core.training.tasks import create_task, get_recipe
from fer_core.training.tasks.au import au_matrix


def _shrunk(**overrides):
    base = {"device": "cpu", "epochs": 2, "batch_size": 16, "max_steps_per_epoch": 0, "early_stopping_patience": 0,
            "model_kwargs.img_size": 32, "model_kwargs.width": 4, "loss_kwargs.semi_supervised": False}
    return get_recipe("au_cotrain", "quick").with_overrides({**base, **overrides})


def _write(tmp, name="au-synth"):
    source = get_format("au_table").write_synthetic(tmp / "src", seed=0, size=48, image_size=40, flip_rate=0.3)
    adapt("au_table", source, tmp / "prepared", name=name)
    return tmp / "prepared"


@pytest.fixture(scope="module")
def au_root(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("au"))


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_refinement_matches_the_formula_on_the_noisy_heads(au_root, gamma):
    recipe = _shrunk()
    task = create_task("au_cotrain", au_root, recipe)
    torch.manual_seed(0)
    model = create_model("au_cotrain", **{**recipe.model_kwargs, **task.model_overrides()}).eval()
    with torch.no_grad():  # a bias that puts the noisy probabilities on both sides of the flip points
        for v, head in enumerate(model.noisy_heads):
            head.bias.copy_(torch.linspace(-3.0, 3.0, head.bias.numel()) * (1 + v))
    manifest, refined = refine_noisy_labels(model, task, gamma)
    noisy = task.manifest["label_set"] == "noisy"
    y = au_matrix(task.manifest.loc[noisy, "aus"], len(task.au_names))
    with torch.no_grad():
        out = model.forward_train(task.images(task.manifest[noisy]))
    p = ((torch.sigmoid(out["noisy_logits_1"]) + torch.sigmoid(out["noisy_logits_2"])) / 2).numpy()
    want = np.where(y >= 0, (gamma * y + (1 - gamma) * p >= 0.5).astype(np.int64), y)
    np.testing.assert_array_equal(refined, want)
    assert (refined != y).any() and (refined[y < 0] == -1).all()
    np.testing.assert_array_equal(au_matrix(manifest.loc[noisy, "aus"], len(task.au_names)), refined)
    pd.testing.assert_series_equal(manifest.loc[~noisy, "aus"], task.manifest.loc[~noisy, "aus"])


def test_default_rounds_reach_the_shared_path_and_the_clean_heads(au_root, tmp_path):
    torch.set_num_threads(1)
    result = run_au_rounds(_shrunk(), au_root, tmp_path / "full", rounds=1, gamma=0.0, round_epochs=2)
    assert result.extra["retrain"] == "full"
    base = load_checkpoint(result.rounds[0].train_result.best_checkpoint)["model_state"]
    final = result.model.state_dict()
    for prefix in ("trunks.", "clean_heads."):  # what the served clean-head output depends on
        assert any(not torch.equal(final[k], base[k]) for k in base if k.startswith(prefix)), prefix


def test_label_agreement_counts_cells_known_in_both():
    labels, truth = np.array([[1, 0, -1], [0, 0, 1]]), np.array([[1, 1, 1], [-1, 0, 1]])
    assert label_agreement(labels, truth) == 3 / 4
    assert label_agreement(labels, np.full_like(truth, -1)) is None


def test_noisy_head_rounds_keep_trunks_and_clean_heads_and_write_refined_tables(au_root, tmp_path):
    torch.set_num_threads(1)
    result = run_au_rounds(_shrunk(), au_root, tmp_path / "runs", rounds=1, gamma=0.0, round_epochs=2,
                           retrain="noisy_heads")
    base = load_checkpoint(result.rounds[0].train_result.best_checkpoint)["model_state"]
    final = result.model.state_dict()
    for key, value in base.items():  # BatchNorm running statistics included
        if key.startswith("noisy_heads."):
            continue
        torch.testing.assert_close(final[key], value, rtol=0, atol=0, msg=key)
    assert any(not torch.equal(final[k], base[k]) for k in base if k.startswith("noisy_heads."))
    round1 = result.rounds[1]
    table = read_manifest(round1.data_root)
    noisy = table["label_set"] == "noisy"
    np.testing.assert_array_equal(au_matrix(table.loc[noisy, "aus"], 14), round1.noisy_labels)
    assert round1.labels_changed == int((round1.noisy_labels != result.rounds[0].noisy_labels).sum()) > 0
    truth = au_matrix(table.loc[noisy, "true_aus"], 14)
    assert round1.agreement_with_truth == label_agreement(round1.noisy_labels, truth)
    assert read_card(round1.data_root).provenance["refined_labels"]["round"] == 1
    assert round1.metrics["val/mean_f1"] == result.rounds[0].metrics["val/mean_f1"]  # clean heads are frozen
    with pytest.raises(ValueError):
        run_au_rounds(_shrunk(), au_root, tmp_path / "bad", rounds=1, retrain="heads")


@pytest.mark.slow
def test_cli_rounds_are_versioned_with_dvc_and_tracked_as_mlflow_child_runs(workspace, tmp_path, capsys):
    from fer_cli import au as au_cli
    from registry.datasets import DatasetStore
    from registry.tracking import setup_tracking

    torch.set_num_threads(1)
    store = DatasetStore(workspace)
    base = store.add("au-synth", _write(tmp_path))
    parser = argparse.ArgumentParser()
    au_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["au-rounds", base.ref, "--rounds", "2", "--gamma", "0.0", "--round-epochs", "1",
                              "--no-model-logging", "--set", "epochs=1", "--set", "device=cpu",
                              "--set", "model_kwargs.img_size=32", "--set", "model_kwargs.width=4"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "agree_truth" in printed and "au-synth-round2@" in printed

    round1, round2 = store.get("au-synth-round1"), store.get("au-synth-round2")
    assert round1.parent == base.ref and round2.parent == round1.ref
    # The versioned table holds the refined noisy labels and the untouched clean rows.
    before, after = read_manifest(store.pull("au-synth")), read_manifest(store.pull("au-synth-round1", round1.version))
    clean = before["label_set"] == "clean"
    pd.testing.assert_series_equal(after.loc[clean, "aus"].map(list), before.loc[clean, "aus"].map(list))
    assert (au_matrix(after["aus"], 14) != au_matrix(before["aus"], 14)).any()

    setup_tracking(workspace)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("fer-au_cotrain").experiment_id
    parents = client.search_runs([experiment], "tags.au_rounds = 'parent'")
    assert len(parents) == 1 and parents[0].data.tags["data_version"] == base.ref
    parent = parents[0].info.run_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    by_round = {int(r.data.tags["au_round"]): r for r in children}
    assert sorted(by_round) == [0, 1, 2]
    assert by_round[0].data.tags["data_version"] == base.ref
    assert by_round[1].data.tags["data_version"] == round1.ref and by_round[1].data.tags["labels_parent"] == base.ref
    assert by_round[2].data.tags["labels_parent"] == round1.ref
    assert all(r.info.status == "FINISHED" for r in children) and parents[0].info.status == "FINISHED"
    tags = client.get_run(parent).data.tags
    assert tags["round2.data_version"] == round2.ref and tags["round1.run_id"] == by_round[1].info.run_id
    history = client.get_metric_history(parent, "round/agreement_with_truth")
    assert sorted(m.step for m in history) == [0, 1, 2]
