"""``fer annotate --url``: the video pipeline asking a real ``tritonserver`` for the champion's answers.

As a user gets there: a tiny ca_resnet is trained and registered through the registry, promoted by
``fer promote`` (gates open), and the workspace's repository is served by the embedded Triton. The
same generated video is then annotated twice -- locally (ONNX Runtime on the champion fetched from
the registry) and through Triton's ensemble over gRPC -- and the two tables must agree face by face.
Inference needs no control key; only loading models does (EmbeddedTriton holds it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fer_core.video.synthetic import truth_at, write_synthfacs_video

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # trains, promotes, starts tritonserver

NETWORK = "ca_resnet"


def _inside(row, tile, slack: float = 0.1) -> bool:
    tx, ty, side = tile
    return (row.FaceRectX >= tx - slack * side and row.FaceRectY >= ty - slack * side
            and row.FaceRectX + row.FaceRectWidth <= tx + side * (1 + slack)
            and row.FaceRectY + row.FaceRectHeight <= ty + side * (1 + slack))


def test_fer_annotate_through_triton_equals_the_local_champion(workspace, tmp_path, capsys):
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.grpc")
    import torch

    from fer_cli.main import main
    from fer_core.data.formats import adapt
    from fer_core.data.formats.image_folder import write_synthetic
    from registry.datasets import DatasetStore
    from registry.export import export_and_register
    from registry.training import resolve_recipe, train_tracked
    from serving.repository import ModelRepository
    from serving.server import EmbeddedTriton, free_port

    torch.set_num_threads(1)
    adapt("image_folder", write_synthetic(tmp_path / "fer", seed=1, size=140), tmp_path / "fer-prep", name="fer")
    data = DatasetStore(workspace).add("fer", tmp_path / "fer-prep")
    recipe = resolve_recipe(NETWORK, "quick", None, {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16,
                                                     "model_kwargs.width": 8})
    version = export_and_register(train_tracked(NETWORK, data.ref, recipe, progress=False, workspace=workspace),
                                  workspace=workspace)
    assert main(["promote", NETWORK, "--floor", "0", "--margin", "1", "--latency-budget-ms", "10000",
                 "--smoke-samples", "4", "--latency-requests", "5"]) == 0
    capsys.readouterr()

    video = tmp_path / "faces.mp4"
    truth = write_synthfacs_video(video, num_faces=4, seconds=2.0, fps=10, segment_s=0.5, faceless_segments=(2,))
    local = tmp_path / "local" / "annotated.mp4"
    assert main(["annotate", str(video), "-o", str(local), "--network", NETWORK]) == 0
    assert f"with {NETWORK} via ONNX Runtime ({NETWORK}-v{version.version}.onnx)" in capsys.readouterr().out

    repo = ModelRepository(workspace.triton_repository)
    server = EmbeddedTriton(repo, workspace.root / "triton-annotate", models=repo.load_order()).start()
    served = tmp_path / "served" / "annotated.mp4"
    try:
        assert main(["annotate", str(video), "-o", str(served), "--url", server.grpc_url, "--network", NETWORK,
                     "--table", str(served.with_suffix(".parquet"))]) == 0
        out = capsys.readouterr().out
        # a network the server does not serve: one line, exit 1, nothing written
        refused = tmp_path / "refused" / "x.mp4"
        assert main(["annotate", str(video), "-o", str(refused), "--url", server.grpc_url,
                     "--network", "c3d_ecstfl"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
    finally:
        server.stop()
    assert f"with {NETWORK} via Triton" in out and f"annotated {truth.frame_count} frames" in out
    assert len(err) == 1 and err[0].startswith("fer: error: ") and "c3d_ecstfl" in err[0], err
    assert not refused.exists() and not (refused.parent.exists() and any(refused.parent.iterdir()))

    here = pd.read_csv(local.with_suffix(".csv"))
    there = pd.read_parquet(served.with_suffix(".parquet"))
    assert list(here.columns) == list(there.columns)
    assert len(here) == len(there) and (here["frame"].to_numpy() == there["frame"].to_numpy()).all()
    boxes = ["FaceRectX", "FaceRectY", "FaceRectWidth", "FaceRectHeight", "Identity"]
    assert here[boxes].fillna(-1).to_numpy().tolist() == there[boxes].fillna(-1).to_numpy().tolist()
    assert here["label"].fillna("").tolist() == there["label"].fillna("").tolist()
    probabilities = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
    assert np.allclose(here[probabilities].to_numpy(float), there[probabilities].to_numpy(float), atol=1e-5,
                       equal_nan=True)
    faces = there.dropna(subset=["FaceRectX"])
    assert len(faces) >= 0.85 * sum(len(truth_at(truth, i)) for i in range(truth.frame_count))
    for row in faces.itertuples():
        assert sum(_inside(row, t.tile) for t in truth_at(truth, int(row.frame))) == 1, row
    faceless = [i for i in range(truth.frame_count) if not truth_at(truth, i)]
    assert there[there["frame"].isin(faceless)]["FaceRectX"].isna().all()

    # Triton gone: one line, non-zero, no output under the final name.
    gone = tmp_path / "gone.mp4"
    assert main(["annotate", str(video), "-o", str(gone), "--url", f"grpc://127.0.0.1:{free_port()}",
                 "--network", NETWORK]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fer: error: ") and "Traceback" not in err[0], err
    assert not gone.exists() and not gone.with_suffix(".csv").exists()
