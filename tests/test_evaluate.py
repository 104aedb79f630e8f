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

    from fer_cli.main import main
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
