"""Checks every registered model must pass (used by each model family's test module)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fer_core.models import FERModel

LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def check_forward(model: FERModel, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Outputs match the metadata's specs and hold no NaN/inf."""
    model.eval()
    x = model.example_input(batch_size)
    with torch.no_grad():
        outs = model.outputs_as_dict(model(x))
    for spec in model.metadata.outputs:
        out = outs[spec.name]
        expected = (batch_size, *spec.shape)
        assert tuple(out.shape) == expected, f"{spec.name}: shape {tuple(out.shape)} != {expected}"
        assert torch.isfinite(out).all(), f"{spec.name} holds NaN or inf"
    return outs


def check_every_parameter_gets_gradient(model: FERModel, loss_fn: LossFn, batch_size: int = 4) -> None:
    """One backward pass of the model's training loss reaches every trainable parameter."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model.forward_train(model.example_input(batch_size)))
    assert torch.isfinite(loss), f"loss is {loss}"
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"parameters without a finite gradient: {missing[:10]} (+{max(len(missing) - 10, 0)})"
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() == 0]
    assert not dead, f"parameters whose gradient is exactly zero: {dead[:10]}"


def check_onnx_export(model: FERModel, tmp_path: Path, atol: float = 1e-4, opset: int = 17) -> float:
    """Export with a dynamic batch axis; ONNX Runtime matches PyTorch at batch sizes 1 and 3."""
    import onnx
    import onnxruntime as ort

    model.eval()
    path = tmp_path / f"{model.metadata.name}.onnx"
    in_name = model.metadata.input.name
    out_names = list(model.metadata.output_names)
    axes = {name: {0: "batch"} for name in [in_name, *out_names]}
    torch.onnx.export(
        model, (model.example_input(2),), str(path), input_names=[in_name], output_names=out_names,
        dynamic_axes=axes, opset_version=opset, dynamo=False,
    )
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 3):
        x = model.example_input(batch)
        with torch.no_grad():
            ref = model.outputs_as_dict(model(x))
        got = session.run(out_names, {in_name: x.numpy()})
        for name, value in zip(out_names, got):
            assert value.shape == tuple(ref[name].shape), f"{name}: ONNX shape {value.shape} at batch {batch}"
            worst = max(worst, float(np.abs(value - ref[name].numpy()).max()))
    assert worst <= atol, f"ONNX Runtime differs from PyTorch by {worst:.2e} > {atol:.0e}"
    return worst
