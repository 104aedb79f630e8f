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


def check_network(name: str, tmp_path: Path, size: int | None = None) -> None:
    """Everything a registered network must do, from its spec alone: metadata, profiles, a task on
    generated data in the spec's default format, construction, forward, loss + backward, ONNX
    export with embedded metadata and PyTorch/ONNX Runtime parity."""
    from fer_core.data.formats import adapt, get_format
    from fer_core.models import create_model
    from fer_core.models.catalog import get_network
    from fer_core.training.recipe import PROFILES, Recipe
    from fer_core.training.tasks import create_task, get_task_kind
    from fer_core.training.trainer import _collate, effective_recipe
    from serving.export import check_parity, export_onnx, metadata_to_json, read_onnx_metadata

    spec = get_network(name)
    kind = get_task_kind(spec.task)
    fmt = get_format(spec.data_format)
    # metadata
    assert spec.primary_metric and spec.dataset and spec.demo_size > 0 and spec.description
    assert fmt.task == kind.data_task, f"{name}: default format {fmt.name} holds {fmt.task} data, task wants {kind.data_task}"
    assert set(spec.profile_names) == set(PROFILES)
    for profile in PROFILES:
        recipe = spec.recipe(profile)
        assert Recipe.from_dict(recipe.to_dict()) == recipe  # profiles survive a checkpoint round trip
        assert recipe.fingerprint() == Recipe.from_dict(recipe.to_dict()).fingerprint()
    # a task on a little generated data in the network's real format
    source = fmt.write_synthetic(tmp_path / "source", seed=0, size=size or max(40, spec.demo_size // 8))
    adapt(spec.data_format, source, tmp_path / "prepared", name="check")
    recipe = spec.recipe("quick").with_overrides({"device": "cpu"})
    task = create_task(name, tmp_path / "prepared", recipe)
    assert task.primary_metric == spec.primary_metric
    recipe = effective_recipe(recipe, task)
    # construction + forward
    torch.manual_seed(0)
    model = create_model(name, **recipe.model_kwargs)
    assert isinstance(model, FERModel) and model.model_name == name
    check_forward(model)
    # loss + backward on a real batch
    train = task.build_datasets(recipe)["train"]
    x, targets = _collate([train[i] for i in range(min(4, len(train)))])
    model.train()
    loss, parts = task.build_loss(recipe, model)(model.forward_train(x), targets)
    assert torch.isfinite(loss) and parts, f"{name}: loss {loss}, parts {parts}"
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # export + parity on the batch
    model.eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    assert metadata_to_json(read_onnx_metadata(path)) == metadata_to_json(model.metadata)
    report = check_parity(model, path, inputs=x.float().numpy(), atol=1e-3)
    assert report.passed, report
