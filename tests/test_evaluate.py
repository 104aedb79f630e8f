"""Cross-dataset evaluation: evaluation-only test sets, ``fer evaluate``, ``fer infer`` on folders.

The end-to-end test follows a user: a CK+48-like folder (no neutral class, a ``contempt`` folder) is
refused as a training set, added as a test set with an explicit label map, evaluated in-process,
then evaluated through a running Triton; every sample's prediction must equal ``fer infer``'s and the
in-process one, and the MLflow evaluation run must carry the metrics, PNG and predictions table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fer_core.data.formats import adapt
from fer_core.data.formats.image_folder import parse_label_map, write_synthetic
from fer_core.data.manifest import read_card, read_manifest
from fer_core.metrics.classification import classification_metrics
from fer_core.metrics.evaluation import score_labels

NETWORK = "ca_resnet"
LABEL_MAP = "anger:angry,sadness:sad,happiness:happy"


def _ck48_like(root: Path) -> Path:
    """CK+48 layout: class folders, CK+ spellings, no neutral, plus contempt (no expression of ours)."""
    src = write_synthetic(root, seed=7, size=84, with_splits=False)
    shutil.rmtree(src / "neutral")
    (src / "contempt").mkdir()
    for i, f in enumerate(sorted((src / "happiness").iterdir())[:4]):
        shutil.copy(f, src / "contempt" / f"S099_001_{i:08d}.png")
    return src


def test_score_labels_leaves_unknown_rows_and_absent_classes_out():
    classes = ("angry", "happy", "neutral")
    true = ["angry", "angry", "happy", "happy", "unknown", "unknown"]
    pred = ["angry", "neutral", "happy", "angry", "happy", "happy"]
    score = score_labels(true, pred, classes)
    assert score.num_scored == 4 and score.num_unscored == 2 and score.unscored_predictions == {"happy": 2}
    expected = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 0]), 3, classes)
    assert score.metrics["accuracy"] == pytest.approx(0.5) and score.metrics["uar"] == pytest.approx(expected["uar"])
    assert "recall/neutral" not in score.metrics and score.classes_present == ("angry", "happy")
    assert score.confusion.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="none of the network's classes"):
        score_labels(["angry"], ["contempt"], classes)


def test_score_aus_skips_unknown_cells_and_aus_the_set_never_labels():
    from fer_core.metrics.evaluation import score_aus

    true = np.array([[1, 0, -1], [1, -1, -1], [0, 1, -1], [-1, 1, -1]])  # AU3: never labelled
    predicted = [("AU1",), ("AU1", "AU2"), ("AU2", "AU3"), ()]
    score = score_aus(true, ("AU1", "AU2", "AU3"), predicted, ("AU1", "AU2", "AU3", "AU4"))
    assert score.au_names == ("AU1", "AU2") and score.network_only == ("AU3", "AU4")
    # AU1: rows 0-2 known: tp 2, fp 0, fn 0 -> 1.0; AU2: rows 0, 2, 3 known: tp 1 (row 2), fp 0, fn 1 (row 3) -> 2/3
    assert score.metrics["f1/AU1"] == pytest.approx(1.0) and score.metrics["f1/AU2"] == pytest.approx(2 / 3)
    assert score.metrics["mean_f1"] == pytest.approx(5 / 6) and score.metrics["support/AU2"] == 2
    with pytest.raises(ValueError, match="share none"):
        score_aus(true[:, 2:], ("AU3",), predicted, ("AU1",))


def test_label_map_parsing_refuses_bad_targets():
    assert parse_label_map(LABEL_MAP) == {"anger": "angry", "sadness": "sad", "happiness": "happy"}
    assert parse_label_map({"Furious": "anger"}) == {"Furious": "angry"}
    with pytest.raises(ValueError, match="FOLDER:CLASS"):
        parse_label_map("anger=angry")
    with pytest.raises(ValueError, match="none of"):
        parse_label_map("contempt:disdain")


def test_test_set_gate_accepts_missing_classes_but_refuses_broken_files(tmp_path):
    from data_checks import validate_dataset

    src = _ck48_like(tmp_path / "ck48")
    train = adapt("image_folder", src, tmp_path / "as-train", name="ck48")
    assert "every_class_in_train" in validate_dataset(tmp_path / "as-train").failed_checks

    card = adapt("image_folder", src, tmp_path / "as-test", name="ck48", role="test", label_map=LABEL_MAP,
                 unknown_classes="drop")
    assert card.splits == ("test",) and card.provenance["role"] == "test" and train.provenance["role"] == "train"
    assert card.classes[:7] == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert card.provenance["dropped_images"] == {"contempt": 4}
    report = validate_dataset(tmp_path / "as-test")
    assert report.success, report.failed_checks
    assert "test_set_only_test_split" in {r.name for r in report.results}
    assert "every_class_in_train" not in {r.name for r in report.results}

    kept = adapt("image_folder", src, tmp_path / "kept", name="ck48", role="test", unknown_classes="unknown")
    assert kept.classes[-1] == "unknown" and kept.counts["test"]["unknown"] == 4

    # A broken file in a test set is still refused.
    broken = tmp_path / "broken-src"
    shutil.copytree(src, broken)
    victim = sorted((broken / "anger").iterdir())[0]
    victim.write_bytes(b"not a png")
    adapt("image_folder", broken, tmp_path / "broken", name="ck48", role="test", unknown_classes="drop")
    assert "file_decodes" in validate_dataset(tmp_path / "broken").failed_checks

    with pytest.raises(ValueError, match="split folders"):
        adapt("image_folder", write_synthetic(tmp_path / "kaggle", size=20), tmp_path / "x", name="k", role="test")
    with pytest.raises(ValueError, match="role=test"):
        adapt("image_folder", src, tmp_path / "y", name="ck48", unknown_classes="unknown")


@pytest.mark.integration
def test_cross_dataset_evaluation_in_process_and_through_triton(workspace, tmp_path, capsys):
    pytest.importorskip("pytriton")
    import torch
    from mlflow.tracking import MlflowClient

    from fer_cli.main import EXIT_ERROR, main
    from registry.datasets import DatasetStore
    from registry.export import export_and_register
    from registry.training import resolve_recipe, train_tracked
    from serving.repository import ModelRepository
    from serving.server import EmbeddedTriton

    torch.set_num_threads(1)
    src = _ck48_like(tmp_path / "ck48")
    assert main(["data", "add", "ck48", str(src), "--format", "image_folder"]) == 1  # no neutral: refused
    assert "every_class_in_train" in capsys.readouterr().err
    assert main(["data", "add", "ck48", str(src), "--format", "image_folder", "-o", "role=test",
                 "-o", f"label_map={LABEL_MAP}", "-o", "unknown_classes=unknown"]) == 0
    capsys.readouterr()

    fer_src = write_synthetic(tmp_path / "fer", seed=1, size=140)
    adapt("image_folder", fer_src, tmp_path / "fer-prep", name="fer")
    data = DatasetStore(workspace).add("fer", tmp_path / "fer-prep")
    recipe = resolve_recipe(NETWORK, "quick", None, {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16,
                                                     "model_kwargs.width": 8})
    version = export_and_register(train_tracked(NETWORK, data.ref, recipe, progress=False, workspace=workspace),
                                  workspace=workspace)

    assert main(["evaluate", NETWORK, "--data", "ck48", "--json", "--predictions"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert local["version"] == version.version and local["backend"] == "onnxruntime"
    assert local["num_samples"] == 76 and local["num_scored"] == 72 and local["num_unscored"] == 4
    assert "neutral" not in local["classes_present"]
    rows = local["predictions"]
    true = [r["true"] for r in rows]
    recomputed = score_labels(true, [r["predicted"] for r in rows], local["classes"])
    assert recomputed.metrics == pytest.approx(local["metrics"])

    run = MlflowClient().get_run(local["mlflow_run"])
    assert run.data.tags["model_version"] == str(version.version) and run.data.tags["model_run_id"] == version.run_id
    assert run.data.tags["data_version"].startswith("ck48@") and run.data.tags["fer.evaluation"] == "true"
    assert run.data.metrics["eval/uar"] == pytest.approx(local["metrics"]["uar"])
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/predictions.json", "evaluation/evaluation.json"} <= artifacts

    # Through Triton: promote (gates open), serve, evaluate with --url, and ask `fer infer` too.
    assert main(["promote", NETWORK, "--floor", "0", "--margin", "1", "--latency-budget-ms", "10000",
                 "--smoke-samples", "4", "--latency-requests", "5"]) == 0
    capsys.readouterr()
    repo = ModelRepository(workspace.triton_repository)
    server = EmbeddedTriton(repo, workspace.root / "triton-eval", models=repo.load_order()).start()
    try:
        assert main(["evaluate", NETWORK, "--data", "ck48", "--url", server.grpc_url, "--json", "--predictions"]) == 0
        served = json.loads(capsys.readouterr().out)
        images = DatasetStore(workspace).path("ck48") / "images"
        assert main(["infer", str(images), "--url", server.grpc_url, "--network", NETWORK, "--json",
                     "--chunk", "16"]) == 0
        inferred = {r["file"]: r for r in json.loads(capsys.readouterr().out)}
        # A file that fails mid-way (an empty PNG in the second chunk): what was printed stays valid
        # JSON, and the exit code and stderr say it is partial.
        partial = tmp_path / "partial"
        partial.mkdir()
        for f in sorted(images.rglob("*.png"))[:3]:
            shutil.copy(f, partial / f.name)
        (partial / "zz_empty.png").write_bytes(b"")
        assert main(["infer", str(partial), "--url", server.grpc_url, "--network", NETWORK, "--json",
                     "--chunk", "2"]) == EXIT_ERROR
        captured = capsys.readouterr()
        assert len(json.loads(captured.out)) == 2 and "stopped after 2 of 4 inputs" in captured.err
    finally:
        server.stop()
    assert served["backend"] != "onnxruntime" and served["metrics"] == pytest.approx(local["metrics"])
    assert len(inferred) == len(served["predictions"]) == len(rows) == 76
    for here, there in zip(rows, served["predictions"]):
        assert here["file"] == there["file"] and here["predicted"] == there["predicted"], here["file"]
        assert here["confidence"] == pytest.approx(there["confidence"], abs=1e-5)
        infer = inferred[there["file"]]
        assert infer["label"] == there["predicted"]
        assert max(infer["probabilities"].values()) == pytest.approx(there["confidence"], abs=1e-5)


def test_measured_on_names_fer2013_splits_honestly():
    from registry.training import measured_on

    assert measured_on("fer2013", {"test/accuracy": 0.5}) == "test (PrivateTest)"
    assert measured_on("fer2013", {"val/accuracy": 0.5}).startswith("val (PublicTest; no test split")
    assert measured_on("image_folder", {"val/accuracy": 0.5}) == "val (no test split, and val also chose the best epoch)"


def _register_tiny(network: str, fmt: str, size: int, tmp_path: Path, workspace, **overrides):
    import torch

    from fer_core.data.formats import get_format
    from registry.datasets import DatasetStore
    from registry.export import export_and_register
    from registry.training import resolve_recipe, train_tracked

    torch.set_num_threads(1)
    src = get_format(fmt).write_synthetic(tmp_path / f"{network}-src", seed=0, size=size)
    adapt(fmt, src, tmp_path / f"{network}-prep", name=network)
    data = DatasetStore(workspace).add(network, tmp_path / f"{network}-prep")
    recipe = resolve_recipe(network, "quick", None, {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16,
                                                     **overrides})
    return export_and_register(train_tracked(network, data.ref, recipe, progress=False, workspace=workspace),
                               workspace=workspace), data


@pytest.mark.slow
def test_au_network_is_scored_per_au_on_an_evaluation_only_au_table(workspace, tmp_path, capsys):
    """An AU table (DISFA-like: image + AU columns, 9 = unknown) added with ``-o role=test`` is a test
    set; ``fer evaluate au_cotrain`` scores F1 per AU, equal to recomputing it from the per-sample table."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from fer_cli.main import main
    from fer_core.data.formats.au_table import write_synthetic as write_au
    from fer_core.metrics.classification import multilabel_f1

    version, _ = _register_tiny("au_cotrain", "au_table", 64, tmp_path, workspace)
    folder = write_au(tmp_path / "disfa-src", seed=3, size=24)
    table = pd.read_csv(folder / "clean.csv").drop(columns=["AU26"])  # a set that does not label every AU
    table.to_csv(folder / "disfa.csv", index=False)
    for name in ("clean.csv", "noisy.csv", "noisy_truth.csv"):
        (folder / name).unlink()
    assert main(["data", "add", "disfa", str(folder / "disfa.csv"), "--format", "au_table", "-o", "role=test"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "au_cotrain", "--data", "disfa", "--json", "--predictions"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == version.version and out["num_samples"] == len(table)
    assert "AU26" in out["network_only_aus"] and "AU26" not in out["au_names"]
    rows = [r for r in out["predictions"] if r["scored"]]
    names = out["au_names"]
    manifest = read_manifest(_prepared(workspace, "disfa"))
    card_names = list(read_card(_prepared(workspace, "disfa")).au_names)
    truth = {row_id: aus for row_id, aus in zip(manifest["id"], manifest["aus"])}
    y_true = np.array([[truth[r["id"]][card_names.index(a)] for a in names] for r in rows])
    y_pred = np.array([[int(a in r["predicted"].split("+")) for a in names] for r in rows])
    assert multilabel_f1(y_true, y_pred, names) == pytest.approx({k: v for k, v in out["metrics"].items()
                                                                  if not k.startswith("support/")})
    run = MlflowClient().get_run(out["mlflow_run"])
    assert run.data.metrics["eval/mean_f1"] == pytest.approx(out["metrics"]["mean_f1"])
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/au_f1.png" in artifacts and "evaluation/confusion_matrix.png" not in artifacts
    assert main(["evaluate", "au_cotrain", "--data", "disfa", "--no-track"]) == 0
    assert "mean F1" in capsys.readouterr().out


@pytest.mark.slow
def test_multitask_is_scored_on_valence_arousal_and_landmarks_too(workspace, tmp_path, capsys):
    """AffectNet's layout annotates valence/arousal and 68 landmarks: ``fer evaluate multitask_fer``
    reports their CCC/RMSE (recomputed here from the per-sample table) and the inter-ocular NME."""
    from fer_cli.main import main
    from fer_core.metrics.evaluation import score_affect

    _register_tiny("multitask_fer", "affectnet", 60, tmp_path, workspace)
    assert main(["evaluate", "multitask_fer", "--data", "multitask_fer", "--json", "--predictions"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["metrics"]
    assert {"accuracy", "uar", "ccc/valence", "ccc/arousal", "rmse/valence", "nme"} <= set(m)
    manifest = read_manifest(_prepared(workspace, "multitask_fer"))
    truth = manifest.set_index("id")
    rows = out["predictions"]
    true_va = np.array([[truth.loc[r["id"], "valence"], truth.loc[r["id"], "arousal"]] for r in rows])
    pred_va = np.array([[r["valence"], r["arousal"]] for r in rows])
    assert score_affect(true_va, pred_va)["ccc/valence"] == pytest.approx(m["ccc/valence"], abs=1e-5)
    assert 0 < m["nme"] < 10 and m["annotated/landmarks"] == len(rows)
    assert main(["evaluate", "multitask_fer", "--data", "multitask_fer", "--no-track"]) == 0
    text = capsys.readouterr().out
    assert "valence" in text and "landmarks NME" in text


def _prepared(workspace, name: str) -> Path:
    """The checked-out prepared folder of dataset `name` (manifest, card, files)."""
    from registry.datasets import DatasetStore

    return DatasetStore(workspace).path(name)
