"""fer_core.video and ``fer annotate``: tracker, crops, table, the streamed pipeline on generated
SynthFACS videos (real MP4 files, real ONNX Runtime), bad input and atomic outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fer_core.data.preprocess import FaceBox
from fer_core.video.output import FexTableWriter, TableLayout, fex_column, partial_path
from fer_core.video.overlay import FaceAnnotation
from fer_core.video.pipeline import FrameProcessor, PipelineConfig, annotate_stream, face_crop
from fer_core.video.source import VideoSource, VideoSourceError
from fer_core.video.synthetic import truth_at, write_synthfacs_video
from fer_core.video.tracker import IoUTracker


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    from fer_core.models import create_model
    from serving.export import export_onnx

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "ca_resnet.onnx"
    return export_onnx(create_model("ca_resnet", width=4).eval(), path)


@pytest.fixture(scope="module")
def four_faces(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "four.mp4"
    # segment 2 has no face at all
    return path, write_synthfacs_video(path, num_faces=4, seconds=2.0, fps=15, segment_s=0.5, faceless_segments=(2,))


def _inside(box, tile, slack=0.1) -> bool:
    x, y, w, h = box
    tx, ty, side = tile
    return (x >= tx - slack * side and y >= ty - slack * side and x + w <= tx + side * (1 + slack)
            and y + h <= ty + side * (1 + slack))


def test_tracker_keeps_ids_and_forgets_lost_faces():
    tracker = IoUTracker(min_iou=0.3, max_missed=1)
    a, b = FaceBox(10, 10, 50, 50), FaceBox(200, 10, 50, 50)
    first = tracker.update([a, b])
    assert [t.track_id for t in first] == [1, 2]
    moved = tracker.update([FaceBox(205, 12, 50, 50), FaceBox(14, 10, 50, 50)])  # order swapped, both moved
    assert [t.track_id for t in moved] == [2, 1]
    tracker.update([])
    tracker.update([])  # missed twice > max_missed: both tracks end
    assert [t.track_id for t in tracker.update([a])] == [3]  # ids are never reused


def test_face_crop_follows_training_framing_and_pads_at_the_border():
    rgb = np.zeros((100, 100, 3), np.uint8)
    rgb[:, :50] = 200
    crop, (x0, y0) = face_crop(rgb, FaceBox(0, 0, 40, 40), framing=1.5)
    assert crop.shape == (60, 60, 3) and (x0, y0) == (-10, -10)
    assert (crop[:, :10] == 200).all()  # replicated edge, not black


def test_table_layout_uses_pyfeat_names_and_commits_atomically(tmp_path):
    assert [fex_column(n) for n in ("angry", "happy", "sad", "AU6", "AU12", "fear")] == [
        "anger", "happiness", "sadness", "AU06", "AU12", "fear"]
    layout = TableLayout(labels=("angry", "happy"), valence_arousal=True, num_landmarks=2)
    out = tmp_path / "t.parquet"
    writer = FexTableWriter(out, layout, "clip.mp4")
    face = FaceAnnotation(7, (1, 2, 30, 40), 3.0, "happy", 0.8, {"angry": 0.2, "happy": 0.8}, None, 0.5, -0.1,
                          ((1.0, 2.0), (3.0, 4.0)))
    writer.write_frame(0, 0.0, [face])
    writer.write_frame(1, 0.04, [])
    assert not out.exists() and partial_path(out).exists()
    writer.commit()
    df = pd.read_parquet(out)
    assert list(df.columns) == layout.columns()
    assert df.loc[0, "happiness"] == pytest.approx(0.8) and df.loc[0, "Identity"] == 7 and df.loc[0, "x_1"] == 3.0
    assert df.loc[1, "frame"] == 1 and pd.isna(df.loc[1, "FaceRectX"]) and pd.isna(df.loc[1, "label"])
    aborted = FexTableWriter(tmp_path / "a.csv", layout, "x")
    aborted.write_frame(0, 0.0, [face])
    aborted.abort()
    assert list(tmp_path.glob("*a.*")) == []


def test_pipeline_boxes_every_face_with_stable_ids(four_faces, tiny_onnx):
    from serving.recognizers import OnnxRecognizer

    path, truth = four_faces
    processor = FrameProcessor(OnnxRecognizer(tiny_onnx), config=PipelineConfig(batch_size=8, in_flight=2))
    seen: dict[int, list[FaceAnnotation]] = {}
    with VideoSource(str(path)) as source:
        stats = annotate_stream(source, processor, lambda frame, faces: seen.__setitem__(frame.index, faces))
    assert sorted(seen) == list(range(truth.frame_count)) and stats.frames == truth.frame_count
    ids_per_slot: dict[int, set[int]] = {}
    for index, faces in seen.items():
        expected = truth_at(truth, index)
        assert len(faces) == len(expected), f"frame {index}: {len(faces)} faces, expected {len(expected)}"
        for face in faces:
            slots = [t.slot for t in expected if _inside(face.box, t.tile)]
            assert len(slots) == 1, f"frame {index}: box {face.box} is inside no face tile"
            ids_per_slot.setdefault(slots[0], set()).add(face.track_id)
            assert face.label is not None and 0.0 <= face.confidence <= 1.0
            assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    # a face keeps its id within each run of frames it is visible in: 2 runs (before/after the gap)
    assert all(len(ids) == 2 for ids in ids_per_slot.values()), ids_per_slot


def test_local_recognizer_matches_the_serving_preprocessing(tiny_onnx):
    """The local path is the ensemble's own pre/post-processing + the same ONNX file."""
    import onnxruntime as ort

    from fer_core.data.synthfacs import SynthFACS
    from serving.ensembles import processing
    from serving.recognizers import OnnxRecognizer

    faces = SynthFACS(3, image_size=96).expression_set(4).images
    recognizer = OnnxRecognizer(tiny_onnx)
    got = recognizer.predict(list(faces))
    meta = recognizer.metadata
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    batch = np.stack([processing.prepare_image(f, meta, None).tensor for f in faces])
    probs = processing.softmax(session.run(["logits"], {"image": batch})[0])
    assert [p.label for p in got] == [meta.label_names[i] for i in probs.argmax(1)]
    assert np.allclose([[p.probabilities[n] for n in meta.label_names] for p in got], probs, atol=1e-6)


def _annotate(*argv: str) -> int:
    from fer_cli.main import main

    return main(["annotate", *argv])


def test_fer_annotate_writes_video_and_table(four_faces, tiny_onnx, tmp_path):
    path, truth = four_faces
    out = tmp_path / "out" / "annotated.mp4"
    assert _annotate(str(path), "-o", str(out), "--model", str(tiny_onnx)) == 0
    with VideoSource(str(out)) as video:
        frames = list(video)
    assert len(frames) == truth.frame_count and frames[0].pixels.shape == (480, 640, 3)
    # the overlay is there: pure green box pixels on the first frame
    green = (frames[0].pixels[..., 1] > 200) & (frames[0].pixels[..., 0] < 80) & (frames[0].pixels[..., 2] < 80)
    assert green.sum() > 500
    table = pd.read_csv(out.with_suffix(".csv"))
    assert set(table["frame"]) == set(range(truth.frame_count))
    assert {"FaceRectX", "FaceRectWidth", "anger", "happiness", "neutral", "approx_time", "Identity"} <= set(table.columns)
    faceless = [i for i in range(truth.frame_count) if not truth_at(truth, i)]
    assert faceless and table[table["frame"].isin(faceless)]["FaceRectX"].isna().all()
    assert sorted(p.name for p in out.parent.iterdir()) == ["annotated.csv", "annotated.mp4"]


def test_fer_annotate_bad_input_exits_with_one_line_and_leaves_nothing(tmp_path, tiny_onnx, capsys):
    out = tmp_path / "o.mp4"
    assert _annotate(str(tmp_path / "missing.mp4"), "-o", str(out), "--model", str(tiny_onnx)) == 2
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    assert _annotate(str(broken), "-o", str(out), "--model", str(tiny_onnx)) == 2
    assert _annotate(str(broken), "-o", str(tmp_path / "o.avi"), "--model", str(tiny_onnx)) == 2
    assert _annotate(str(broken), "-o", str(out), "--model", str(tmp_path / "none.onnx")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("fer: error: ") for line in err), err
    assert "broken.mp4" in err[1] and "Traceback" not in "".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.mp4"]


def test_fer_annotate_failure_mid_run_removes_partial_outputs(four_faces, tiny_onnx, tmp_path, monkeypatch, capsys):
    from serving.client import ServingError
    from serving.recognizers import OnnxRecognizer

    calls = {"n": 0}
    original = OnnxRecognizer.predict

    def flaky(self, samples):
        calls["n"] += 1
        if calls["n"] > 3:
            raise ServingError("ca_resnet: Triton went away")
        return original(self, samples)

    monkeypatch.setattr(OnnxRecognizer, "predict", flaky)
    path, _ = four_faces
    out = tmp_path / "x.mp4"
    assert _annotate(str(path), "-o", str(out), "--model", str(tiny_onnx)) == 1
    assert "Triton went away" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sources_that_cannot_open_say_why():
    with pytest.raises(VideoSourceError, match="cannot open camera 9"):
        VideoSource("9")
    from serving.server import free_port

    with pytest.raises(VideoSourceError, match="cannot open stream"):
        VideoSource(f"http://127.0.0.1:{free_port()}/live.mjpg", reconnects=0)
