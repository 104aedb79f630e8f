"""ONNX export and PyTorch-vs-ONNX Runtime parity of every model family (tiny configurations)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from fer_core.models import create_model
from fer_core.models.catalog import list_networks
from serving.export import (
    TORCHSCRIPT_FALLBACK, check_parity, export_checkpoint, export_onnx, exporter_for, metadata_to_json,
    read_onnx_exporter, read_onnx_metadata,
)

pytestmark = pytest.mark.slow  # torch.export (dynamo) of every network: seconds each

TINY = {
    "ca_resnet": dict(width=8, img_size=24),
    "resnet18": dict(width=4),
    "resnet34": dict(width=4),
    "multitask_fer": dict(img_size=32, width=16, num_stacks=1, hourglass_depth=2, pyramid_dim=16, num_heads=2,
                          head_hidden=32),
    "micro_lsh": dict(img_size=16, width=4, stem="small", magnifier_width=4, num_mag_frames=8, head_hidden=16),
    "c3d_ecstfl": dict(num_frames=8, img_size=32, width=4, fc_width=32),
    "au_cotrain": dict(layers=(1, 1, 1, 1), width=4, stem="small", img_size=16, in_chans=3),
    "magnifier": dict(img_size=16, magnifier_width=4),
}


def test_every_registered_network_has_a_tiny_export_configuration():
    assert sorted(TINY) == list_networks()


def test_which_exporter_each_network_uses():
    """Every network goes through torch's dynamo exporter; a fallback to the TorchScript tracer
    would be listed by name with its reason (none is needed today)."""
    assert TORCHSCRIPT_FALLBACK == {}
    assert {name: exporter_for(name) for name in list_networks()} == {name: "dynamo" for name in list_networks()}


@pytest.mark.parametrize("name", sorted(TINY))
def test_export_dynamic_batch_and_parity(name, tmp_path):
    torch.set_num_threads(1)
    model = create_model(name, **TINY[name]).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    assert read_onnx_exporter(path) == exporter_for(name)
    assert not list(tmp_path.glob("*.data")), "weights must sit inside the ONNX file (one file per version)"
    graph = onnx.load(str(path)).graph
    meta = model.metadata
    assert [i.name for i in graph.input] == [s.name for s in meta.inputs]
    assert [o.name for o in graph.output] == list(meta.output_names)
    for value in list(graph.input) + list(graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert metadata_to_json(read_onnx_metadata(path)) == metadata_to_json(meta)
    # A batch size other than the traced one (2) must work: the batch axis is really dynamic.
    inputs = np.random.default_rng(0).standard_normal((3, *meta.input.shape)).astype(np.float32)
    # Landmarks are decoded from heatmaps in pixels; on random inputs the heatmaps are flat and the
    # decoding amplifies float noise (measured 4e-4 px with heatmaps within 3e-7): 1e-3 px there.
    report = check_parity(model, path, inputs, atol=1e-4, output_atol={"landmarks": 1e-3})
    assert report.passed, report
    assert all(d <= 1e-4 for name, d in report.per_output.items() if name != "landmarks"), report
    assert report.num_samples == 3 and report.label_agreement == 1.0
    assert set(report.per_output) == set(meta.output_names)


def test_the_torchscript_fallback_exports_with_parity_too(tmp_path):
    torch.set_num_threads(1)
    model = create_model("ca_resnet", **TINY["ca_resnet"]).eval()
    path = export_onnx(model, tmp_path / "ts.onnx", exporter="torchscript")
    assert read_onnx_exporter(path) == "torchscript"
    assert check_parity(model, path, num_samples=3).passed
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, tmp_path / "x.onnx", exporter="tflite")


def test_parity_detects_a_different_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("ca_resnet", **TINY["ca_resnet"]).eval()
    path = export_onnx(model, tmp_path / "a.onnx")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    report = check_parity(model, path, num_samples=4)
    assert not report.passed and report.max_abs_diff > 1e-3


def test_bad_parity_inputs_are_rejected(tmp_path):
    model = create_model("ca_resnet", **TINY["ca_resnet"])
    path = export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="float32"):
        check_parity(model, path, np.zeros((2, 1, 24, 24), np.float64))
    with pytest.raises(ValueError, match="shape"):
        check_parity(model, path, np.zeros((2, 3, 24, 24), np.float32))
    with pytest.raises(ValueError, match="FERModel"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")


def test_export_checkpoint(tmp_path):
    from fer_core.training.checkpoint import save_checkpoint

    model = create_model("ca_resnet", **TINY["ca_resnet"]).eval()
    ckpt = save_checkpoint({"network": "ca_resnet", "model_kwargs": TINY["ca_resnet"],
                            "model_state": model.state_dict()}, tmp_path / "model.pt")
    out = export_checkpoint(ckpt, tmp_path / "model.onnx")
    assert check_parity(model, out).passed
    assert read_onnx_metadata(out).name == "ca_resnet"
