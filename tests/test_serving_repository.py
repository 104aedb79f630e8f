"""Triton model repository (configs from metadata, atomic installs, repair) and the ensemble's
pre/post-processing functions. No server here: see test_serving_triton.py."""

from __future__ import annotations

import os
import shutil
import threading

import cv2
import numpy as np
import pytest
import torch

from fer_core.data.preprocess import HaarFaceDetector, to_model_input
from fer_core.data.synthfacs import SynthFACS
from fer_core.models import create_model
from serving.ensembles import processing
from serving.export import export_onnx
from serving.repository import ModelRepository, ensemble_config, network_config, preprocess_config

# The configs only read the graph's inputs, outputs and metadata: the TorchScript exporter writes the same
# in a fraction of dynamo's time (the dynamo export is checked in test_serving_export, slow lane).
FAST_EXPORTER = "torchscript"


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    ca = create_model("ca_resnet", width=4)
    au = create_model("au_cotrain", layers=(1, 1, 1, 1), width=4, stem="small", img_size=16, in_chans=3)
    mt = create_model("multitask_fer", img_size=32, width=16, num_stacks=1, hourglass_depth=2, pyramid_dim=16,
                      num_heads=2, head_hidden=32)
    return {
        "ca_resnet": (export_onnx(ca, root / "ca.onnx", exporter=FAST_EXPORTER), ca.metadata),
        "au_cotrain": (export_onnx(au, root / "au.onnx", exporter=FAST_EXPORTER), au.metadata),
        "multitask_fer": (export_onnx(mt, root / "mt.onnx", exporter=FAST_EXPORTER), mt.metadata),
    }


def test_network_config_is_generated_from_metadata(onnx_files):
    _, meta = onnx_files["ca_resnet"]
    text = network_config(meta, [7, 3], max_batch_size=16, instances=2, instance_kind="KIND_GPU")
    assert 'name: "ca_resnet"' in text and 'backend: "onnxruntime"' in text
    assert "max_batch_size: 16" in text
    assert "version_policy: { specific: { versions: [3, 7] } }" in text
    assert '{ name: "image" data_type: TYPE_FP32 dims: [1, 48, 48] }' in text  # no batch axis
    assert '{ name: "logits" data_type: TYPE_FP32 dims: [7] label_filename: "labels.txt" }' in text
    assert "dynamic_batching {" in text and "instance_group [ { kind: KIND_GPU count: 2 } ]" in text
    with pytest.raises(ValueError, match="instance_kind"):
        network_config(meta, [1], instance_kind="GPU")
    with pytest.raises(ValueError, match="positive"):
        network_config(meta, [0])
    with pytest.raises(ValueError, match="max_batch_size"):
        network_config(meta, [1], max_batch_size=0)


def test_au_and_multitask_configs(onnx_files):
    _, au = onnx_files["au_cotrain"]
    text = network_config(au, [1])
    assert '{ name: "au_logits" data_type: TYPE_FP32 dims: [14] label_filename: "labels.txt" }' in text
    assert '{ name: "au_probabilities" data_type: TYPE_FP32 dims: [14] label_filename: "labels.txt" }' in text
    ens = ensemble_config(au, 4)
    assert 'model_name: "au_cotrain" model_version: 4' in ens
    assert '{ name: "ACTIVE" data_type: TYPE_BOOL dims: [14] }' in ens
    _, mt = onnx_files["multitask_fer"]
    text = network_config(mt, [1])
    heatmap_dims = ", ".join(map(str, {s.name: s for s in mt.outputs}["heatmaps"].shape))
    assert f'{{ name: "heatmaps" data_type: TYPE_FP32 dims: [{heatmap_dims}] }}' in text
    assert "label_filename" not in text.split('"landmarks"')[1].split("}")[0]  # regression: no labels
    ens = ensemble_config(mt, 1)
    assert '{ name: "LANDMARKS" data_type: TYPE_FP32 dims: [68, 2] }' in ens
    assert '{ name: "VALENCE_AROUSAL" data_type: TYPE_FP32 dims: [2] }' in ens
    assert "raw_heatmaps" not in ens  # heatmaps are not shipped to post-processing


def test_write_model_layout_versions_and_policy(tmp_path, onnx_files):
    path, meta = onnx_files["ca_resnet"]
    repo = ModelRepository(tmp_path / "models")
    repo.install("ca_resnet", 3, path)
    assert repo.versions("ca_resnet") == [3] and repo.served_versions("ca_resnet") == [3]
    assert (repo.root / "ca_resnet" / "3" / "model.onnx").read_bytes() == path.read_bytes()
    assert (repo.root / "ca_resnet" / "labels.txt").read_text().split() == list(meta.label_names)
    assert repo.champion("ca_resnet") == 3
    # The CPU default layout: one fused step with its own copy of the champion's ONNX.
    assert (repo.root / "ca_resnet_pipeline" / "1" / "model.py").is_file()
    assert (repo.root / "ca_resnet_pipeline" / "1" / "model.onnx").read_bytes() == path.read_bytes()
    assert (repo.root / "ca_resnet_ensemble" / "1").is_dir()
    repo.write_model("ca_resnet", 8, path, keep_versions=[3])
    assert repo.served_versions("ca_resnet") == [3, 8]
    assert repo.load_order() == ["ca_resnet", "ca_resnet_ensemble"]
    with pytest.raises(ValueError, match="immutable"):
        repo.write_model("ca_resnet", 8, path)
    with pytest.raises(ValueError, match="not in the repository"):
        repo.write_model("ca_resnet", 9, path, keep_versions=[4])
    with pytest.raises(ValueError, match="not 'resnet18'"):
        repo.write_model("resnet18", 1, path)
    with pytest.raises(ValueError, match="positive"):
        repo.write_model("ca_resnet", 0, path)
    # Promotion on disk: pin 8, retire 3, delete it.
    repo.set_champion("ca_resnet", 8)
    assert repo.champion("ca_resnet") == 8
    assert 'key: "champion_version" value: { string_value: "8" }' in (repo.root / "ca_resnet_ensemble" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="is served"):
        repo.remove_version("ca_resnet", 3)
    repo.set_served_versions("ca_resnet", [8])
    assert repo.served_versions("ca_resnet") == [8]
    repo.remove_version("ca_resnet", 3)
    assert repo.versions("ca_resnet") == [8]
    with pytest.raises(ValueError, match="not served"):
        repo.set_champion("ca_resnet", 3)
    with pytest.raises(ValueError, match="no versions"):
        repo.set_served_versions("ca_resnet", [3])
    assert not list(repo.staging_dir.iterdir())  # nothing left behind
    assert repo.describe() == {"ca_resnet": {"versions": [8], "served": [8], "champion": 8}}


def test_ensemble_layouts_write_their_steps_and_a_switch_removes_the_other(tmp_path, onnx_files):
    """``FER_TRITON_ENSEMBLE``: ``steps`` writes pre/post-processing around the pinned network,
    ``fused`` one pipeline holding the champion's ONNX; switching leaves no step of the old layout."""
    path, _ = onnx_files["ca_resnet"]
    steps = ModelRepository(tmp_path / "models", tuning_env={"FER_TRITON_ENSEMBLE": "steps"})
    steps.install("ca_resnet", 1, path)
    assert steps.step_models("ca_resnet") == ["ca_resnet_preprocess", "ca_resnet_postprocess"]
    assert sorted(steps.models()) == ["ca_resnet", "ca_resnet_ensemble", "ca_resnet_postprocess", "ca_resnet_preprocess"]
    ensemble = (steps.root / "ca_resnet_ensemble" / "config.pbtxt").read_text()
    assert 'model_name: "ca_resnet" model_version: 1' in ensemble and 'string_value: "steps"' in ensemble
    fused = ModelRepository(tmp_path / "models", tuning_env={"FER_TRITON_ENSEMBLE": "fused"})
    fused.write_model("ca_resnet", 2, path, keep_versions=[1])
    assert fused.write_ensemble("ca_resnet", 2) == ["ca_resnet_pipeline", "ca_resnet_ensemble"]
    assert sorted(fused.models()) == ["ca_resnet", "ca_resnet_ensemble", "ca_resnet_pipeline"]
    assert fused.step_models("ca_resnet") == ["ca_resnet_pipeline"] and fused.champion("ca_resnet") == 2
    pipeline = (fused.root / "ca_resnet_pipeline" / "config.pbtxt").read_text()
    assert 'key: "champion_version" value: { string_value: "2" }' in pipeline
    assert 'key: "intra_op_thread_count" value: { string_value: "1" }' in pipeline
    assert fused.write_ensemble("ca_resnet", 2) == []  # nothing changed, nothing to reload
    assert fused.load_order() == ["ca_resnet", "ca_resnet_ensemble"]
    steps.write_ensemble("ca_resnet", 1)  # and back
    assert sorted(steps.models()) == ["ca_resnet", "ca_resnet_ensemble", "ca_resnet_postprocess", "ca_resnet_preprocess"]
    assert steps.champion("ca_resnet") == 1
    with pytest.raises(ValueError, match="FER_TRITON_ENSEMBLE must be one of fused, steps"):
        ModelRepository(tmp_path / "models", tuning_env={"FER_TRITON_ENSEMBLE": "chained"}).write_ensemble("ca_resnet", 1)


def test_a_version_is_never_visible_half_written(tmp_path, onnx_files, monkeypatch):
    path, _ = onnx_files["ca_resnet"]
    big = tmp_path / "big.onnx"  # a larger file makes a non-atomic copy observable
    big.write_bytes(path.read_bytes() * 20)
    repo = ModelRepository(tmp_path / "models")
    repo.install("ca_resnet", 1, path)
    size = big.stat().st_size
    seen_bad, stop = [], threading.Event()

    def observe():
        folder = repo.root / "ca_resnet"
        while not stop.is_set():
            for entry in folder.iterdir():
                if entry.is_dir() and entry.name != "1":
                    model = entry / "model.onnx"
                    if not model.is_file() or model.stat().st_size != size:
                        seen_bad.append(entry.name)

    monkeypatch.setattr("serving.repository.read_onnx_metadata", lambda p: onnx_files["ca_resnet"][1])
    thread = threading.Thread(target=observe)
    thread.start()
    try:
        for version in range(2, 12):
            repo.write_model("ca_resnet", version, big, keep_versions=[1])
    finally:
        stop.set()
        thread.join()
    assert not seen_bad
    assert repo.versions("ca_resnet") == list(range(1, 12))
    assert not any(p.name.startswith(".") for p in (repo.root / "ca_resnet").iterdir())  # no temp configs


def test_crash_mid_write_leaves_nothing_visible_and_repair_cleans(tmp_path, onnx_files, monkeypatch):
    path, _ = onnx_files["ca_resnet"]
    repo = ModelRepository(tmp_path / "models")
    repo.install("ca_resnet", 1, path)
    config_before = (repo.root / "ca_resnet" / "config.pbtxt").read_text()

    def crash(src, dst, *args, **kwargs):
        with open(dst, "wb") as handle:  # half the file, then the "power cut"
            handle.write(open(src, "rb").read()[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", crash)
    with pytest.raises(KeyboardInterrupt):
        repo.write_model("ca_resnet", 2, path)
    monkeypatch.undo()
    assert repo.versions("ca_resnet") == [1]
    assert not (repo.root / "ca_resnet" / "2").exists()
    assert (repo.root / "ca_resnet" / "config.pbtxt").read_text() == config_before
    leftovers = list(repo.staging_dir.iterdir())
    assert leftovers  # the half-written version is in staging only
    # Other kinds of leftovers: a temp config and an incomplete version written by other means.
    (repo.root / "ca_resnet" / ".config.pbtxt.abc.tmp").write_text("partial")
    (repo.root / "ca_resnet" / "7").mkdir()
    removed = repo.repair()
    assert set(leftovers) <= set(removed)
    assert repo.root / "ca_resnet" / "7" in removed and not (repo.root / "ca_resnet" / "7").exists()
    assert not list(repo.staging_dir.iterdir())
    assert (repo.root / "ca_resnet" / "1" / "model.onnx").is_file()  # complete versions untouched
    assert (repo.root / "ca_resnet_pipeline" / "1" / "model.py").is_file()
    repo.write_model("ca_resnet", 2, path, keep_versions=[1])  # and the write can be retried
    assert repo.versions("ca_resnet") == [1, 2]


def test_staging_is_beside_the_repository_on_the_same_filesystem(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    assert repo.staging_dir.parent == repo.root.parent and repo.staging_dir.name.startswith(".")
    repo.root.mkdir()
    repo.staging_dir.mkdir()
    assert os.stat(repo.root).st_dev == os.stat(repo.staging_dir).st_dev
    with pytest.raises(ValueError, match="network name"):
        repo.versions("../etc")


# --- pre/post-processing ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def face():
    return SynthFACS(0, image_size=96).expression_set(1).images[0]


def test_header_sizes_and_decode_errors(face):
    png = cv2.imencode(".png", face)[1].tobytes()
    jpg = cv2.imencode(".jpg", face)[1].tobytes()
    progressive = cv2.imencode(".jpg", face, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert processing.encoded_image_size(png) == (96, 96)
    assert processing.encoded_image_size(jpg) == (96, 96)
    assert processing.encoded_image_size(progressive) == (96, 96)
    assert processing.encoded_image_size(b"garbage") is None
    wide = cv2.imencode(".png", np.zeros((10, 30), np.uint8))[1].tobytes()
    assert processing.encoded_image_size(wide) == (30, 10)
    with pytest.raises(ValueError, match="empty"):
        processing.decode_image_bytes(b"")
    with pytest.raises(ValueError, match="cannot decode"):
        processing.decode_image_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="exceeds the limit of 100 bytes"):
        processing.decode_image_bytes(png, max_bytes=100)
    with pytest.raises(ValueError, match="96x96 pixels exceeds"):
        processing.decode_image_bytes(png, max_pixels=50 * 50)
    # Colours come back RGB like fer_core.data.samples.decode_image_file.
    rgb = processing.decode_image_bytes(cv2.imencode(".png", cv2.cvtColor(face, cv2.COLOR_RGB2BGR))[1].tobytes())
    assert np.array_equal(rgb, face)


def test_prepare_image_uses_the_training_transform(onnx_files, face):
    _, meta = onnx_files["ca_resnet"]
    detector = HaarFaceDetector()
    prepared = processing.prepare_image(face, meta, detector)
    assert prepared.face_found and prepared.tensor.shape == (1, 48, 48) and prepared.tensor.dtype == np.float32
    # No face (a flat picture): the whole image, resized, and the flag says so.
    flat = np.full((60, 80, 3), 128, np.uint8)
    fallback = processing.prepare_image(flat, meta, detector)
    assert not fallback.face_found
    np.testing.assert_allclose(fallback.tensor, to_model_input(flat, (48, 48), 1, 0.5, 0.5), atol=1e-6)
    # to_input maps image corners' pixel centres to the model input's under cv2.resize's convention.
    corner = fallback.to_input @ np.array([79.0, 59.0, 1.0])
    np.testing.assert_allclose(corner, [79.5 * 48 / 80 - 0.5, 59.5 * 48 / 60 - 0.5], atol=1e-5)


def test_landmarks_map_back_to_the_sent_picture(onnx_files, face):
    _, meta = onnx_files["multitask_fer"]
    prepared = processing.prepare_image(face, meta, HaarFaceDetector())
    # Points in model-input pixels go back through the inverse of to_input.
    points_in = np.array([[[0.0, 0.0], [31.0, 31.0], [15.5, 10.0]] + [[1.0, 1.0]] * 65], np.float32)
    out = processing.postprocess(
        {"logits": np.zeros((1, 7), np.float32), "valence_arousal": np.zeros((1, 2), np.float32),
         "landmarks": points_in}, meta, prepared.to_input[None])
    mapped = out["LANDMARKS"][0]
    again = mapped @ prepared.to_input[:, :2].T + prepared.to_input[:, 2]
    np.testing.assert_allclose(again, points_in[0], atol=1e-3)
    assert out["LABEL"].shape == (1, 1) and out["PROBABILITIES"].shape == (1, 7)
    np.testing.assert_allclose(out["PROBABILITIES"].sum(), 1.0, atol=1e-6)


def test_au_postprocess_thresholds(onnx_files):
    _, meta = onnx_files["au_cotrain"]
    probs = np.zeros((2, 14), np.float32)
    probs[0, [4, 7]] = 0.9  # AU6 + AU12
    out = processing.postprocess({"au_probabilities": probs}, meta, np.zeros((2, 2, 3), np.float32))
    assert out["LABEL"].ravel().tolist() == [b"AU6+AU12", b""]
    assert out["ACTIVE"].sum() == 2


def test_clip_preparation(face):
    meta = create_model("c3d_ecstfl", num_frames=8, img_size=32, width=4, fc_width=32).metadata
    detector = HaarFaceDetector()
    clip = processing.prepare_clip([face] * 5, meta, detector)
    assert clip.tensor.shape == (8, 3, 32, 32) and clip.face_found
    with pytest.raises(ValueError, match="same size"):
        processing.prepare_clip([face, face[:50]], meta, detector)
    micro = create_model("micro_lsh", img_size=16, width=4, stem="small", magnifier_width=4, num_mag_frames=8,
                         head_hidden=16).metadata
    assert processing.prepare_clip([face] * 4, micro, detector).tensor.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="onset and apex"):
        processing.prepare_clip([face], micro, detector)
    with pytest.raises(ValueError, match="clip"):
        processing.prepare_image(face, meta, detector)


def test_face_detection_off_uses_the_whole_image_like_training(onnx_files, face):
    """The default serving mode builds exactly the tensor the training tasks build from a face crop."""
    _, meta = onnx_files["ca_resnet"]
    prepared = processing.prepare_image(face, meta, None)
    # Training's decode: resize at model size, round to uint8 (the cached pixels), then /255 and normalise.
    pixels = np.round(to_model_input(face, meta.input_size, meta.in_chans, 0.0, 1.0) * np.float32(255.0))
    x = pixels.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(meta.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(meta.std, np.float32).reshape(-1, 1, 1)
    expected = (x - mean) / std
    assert not prepared.face_found and np.array_equal(prepared.tensor, expected)
    assert 'key: "face_detection"' in preprocess_config(meta) and '"off"' in preprocess_config(meta)
    with pytest.raises(ValueError, match="face_detection"):
        preprocess_config(meta, face_detection="dlib")

