"""ONNX export of platform models and a PyTorch-vs-ONNX-Runtime parity check.

Export uses the TorchScript exporter (``dynamo=False``): with torch 2.13 the dynamo exporter needs
``onnxscript`` (not installed) and mishandles a dynamic batch axis exported from a batch of 1. Every
input and output gets a dynamic batch axis ``"batch"`` so Triton's dynamic batcher can stack requests.
The model's :class:`~fer_core.models.registry.ModelMetadata` is stored in the ONNX file's
``metadata_props`` (key ``fer_metadata``) so a repository can be rebuilt from the ONNX file alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from fer_core.metadata import ModelMetadata, metadata_from_json, metadata_to_json
from fer_core.models.registry import FERModel

METADATA_KEY = "fer_metadata"
# Output kinds whose arg-max is a class decision (label agreement is measured on these).
_CLASSIFICATION_KINDS = ("logits", "probabilities")

__all__ = [
    "ParityReport",
    "export_onnx",
    "check_parity",
    "export_checkpoint",
    "metadata_to_json",
    "metadata_from_json",
    "read_onnx_metadata",
]


def read_onnx_metadata(onnx_path: str | Path) -> ModelMetadata:
    """The metadata :func:`export_onnx` stored in an ONNX file."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return metadata_from_json(prop.value)
    raise ValueError(f"{onnx_path} carries no {METADATA_KEY!r} metadata; export it with serving.export.export_onnx")


def export_onnx(model: FERModel, path: str | Path, opset: int = 17, batch_size: int = 2) -> Path:
    """Export ``model`` (in eval mode) to ``path`` with a dynamic batch axis and check the graph.

    Names of inputs/outputs come from ``model.metadata``; the metadata itself is embedded.
    """
    import onnx

    if not isinstance(model, FERModel):
        raise ValueError(f"expected a FERModel, got {type(model).__name__}")
    if batch_size < 2:
        # A batch of 1 lets the tracer constant-fold the batch axis in some reshapes.
        raise ValueError(f"batch_size must be >= 2 for a traceable dynamic batch axis, got {batch_size}")
    meta = model.metadata
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    names_in = [s.name for s in meta.inputs]
    names_out = list(meta.output_names)
    dynamic_axes = {name: {0: "batch"} for name in names_in + names_out}
    try:
        with torch.no_grad():
            torch.onnx.export(
                model, (model.example_input(batch_size),), str(path), input_names=names_in,
                output_names=names_out, dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
            )
    finally:
        model.train(was_training)
    onnx_model = onnx.load(str(path))
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata_to_json(meta)
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))
    return path


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime vs PyTorch on the same inputs.

    ``max_abs_diff`` is the largest difference over all outputs; ``per_output`` has it per output;
    ``passed`` means every output is within its tolerance and all labels agree.
    ``label_agreement`` is the fraction of samples whose arg-max agrees on every classification
    output (1.0 when the model has none).
    """

    max_abs_diff: float
    label_agreement: float
    passed: bool
    num_samples: int
    per_output: dict[str, float]


def _onnx_session(onnx_path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def check_parity(
    model: FERModel,
    onnx_path: str | Path,
    inputs: np.ndarray | None = None,
    atol: float = 1e-4,
    num_samples: int = 8,
    seed: int = 0,
    output_atol: Mapping[str, float] | None = None,
) -> ParityReport:
    """Run ``inputs`` (or ``num_samples`` random ones) through PyTorch and ONNX Runtime and compare.

    ``inputs`` must be float32 with the model's input shape plus a leading batch axis; held-out
    preprocessed samples are the meaningful choice, random inputs only catch export bugs.
    ``output_atol`` overrides ``atol`` per output, for outputs in other units (e.g. landmarks
    decoded from heatmaps, in pixels, amplify float noise of flat random-input heatmaps).
    """
    meta = model.metadata
    spec = meta.input
    if inputs is None:
        rng = np.random.default_rng(seed)
        inputs = rng.standard_normal((num_samples, *spec.shape)).astype(np.float32)
    inputs = np.asarray(inputs)
    if inputs.dtype != np.float32:
        raise ValueError(f"inputs must be float32, got {inputs.dtype}")
    if inputs.shape[1:] != tuple(spec.shape) or len(inputs) == 0:
        raise ValueError(f"inputs must have shape (N, {', '.join(map(str, spec.shape))}), got {inputs.shape}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch_out = model.outputs_as_dict(model(torch.from_numpy(inputs)))
    finally:
        model.train(was_training)
    session = _onnx_session(onnx_path)
    onnx_out = dict(zip(meta.output_names, session.run(list(meta.output_names), {spec.name: inputs})))
    per_output: dict[str, float] = {}
    agree = np.ones(len(inputs), dtype=bool)
    for out_spec in meta.outputs:
        expected = torch_out[out_spec.name].numpy()
        got = onnx_out[out_spec.name]
        if got.shape != expected.shape:
            raise ValueError(f"output {out_spec.name!r}: ONNX shape {got.shape} != PyTorch {expected.shape}")
        per_output[out_spec.name] = float(np.max(np.abs(got.astype(np.float64) - expected)))
        if out_spec.kind in _CLASSIFICATION_KINDS and got.ndim == 2:
            agree &= got.argmax(1) == expected.argmax(1)
    tolerances = {name: (output_atol or {}).get(name, atol) for name in per_output}
    within = all(per_output[name] <= tolerances[name] for name in per_output)
    return ParityReport(max_abs_diff=max(per_output.values()), label_agreement=float(agree.mean()),
                        passed=bool(within and agree.all()), num_samples=len(inputs), per_output=per_output)


def export_checkpoint(ckpt_path: str | Path, out: str | Path, opset: int = 17, atol: float = 1e-4,
                      output_atol: Mapping[str, float] | None = None) -> Path:
    """Rebuild the model of a training checkpoint, export it to ``out`` and check parity.

    ``ValueError`` when ONNX Runtime disagrees with PyTorch beyond ``atol``.
    """
    from fer_core.training.trainer import load_model_from_checkpoint

    model, _ = load_model_from_checkpoint(Path(ckpt_path))
    path = export_onnx(model, out, opset=opset)
    report = check_parity(model, path, atol=atol, output_atol=output_atol)
    if not report.passed:
        raise ValueError(f"exported {path} fails parity: |diff| per output {report.per_output} (atol {atol:.0e}), "
                         f"label agreement {report.label_agreement:.3f}")
    return path
