"""ONNX export of platform models and a PyTorch-vs-ONNX-Runtime parity check.

Export uses torch's supported exporter, ``torch.onnx.export(..., dynamo=True)`` (``torch.export``
graph, translated by ``onnxscript``), opset 18, weights inside the file (``external_data=False``).
The batch axis is a ``torch.export.Dim`` named ``"batch"`` on every input and output, so Triton's
dynamic batcher can stack requests; an export whose graph came out with a fixed batch is refused.
The example batch is 2: with a batch of 1, ``torch.export`` specialises the axis.

A network whose graph ``torch.export`` cannot capture may be listed in :data:`TORCHSCRIPT_FALLBACK`
with the reason; it is then exported by the TorchScript tracer (``dynamo=False``, ``dynamic_axes``).
No network needs it today (``micro_lsh``'s ``chunk(2)`` of a ``2B`` batch raised a guard
torch.export could not prove, ``(3B - 1) // B == 2``; the model splits by an explicit ``(2, B)``
view instead). The exporter used is written into the file (``metadata_props`` key
``fer_exporter``) beside the model's :class:`~fer_core.models.catalog.ModelMetadata` (key
``fer_metadata``), so a repository can be rebuilt from the ONNX file alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from fer_core.metadata import ModelMetadata, metadata_from_json, metadata_to_json
from fer_core.models.catalog import FERModel

METADATA_KEY = "fer_metadata"
EXPORTER_KEY = "fer_exporter"
EXPORTERS = ("dynamo", "torchscript")
DYNAMO_OPSET = 18  # onnxscript's native opset: a lower one goes through the version converter
# Networks torch.export cannot capture, exported by the TorchScript tracer instead, and why.
TORCHSCRIPT_FALLBACK: dict[str, str] = {}
# Output kinds whose arg-max is a class decision (label agreement is measured on these).
_CLASSIFICATION_KINDS = ("logits", "probabilities")

__all__ = [
    "ParityReport",
    "EXPORTERS",
    "TORCHSCRIPT_FALLBACK",
    "exporter_for",
    "read_onnx_exporter",
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


def exporter_for(network: str) -> str:
    """``"torchscript"`` for a network in :data:`TORCHSCRIPT_FALLBACK`, else ``"dynamo"``."""
    return "torchscript" if network in TORCHSCRIPT_FALLBACK else "dynamo"


def read_onnx_exporter(onnx_path: str | Path) -> str:
    """The exporter :func:`export_onnx` recorded in an ONNX file (``""`` for older files)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == EXPORTER_KEY), "")


def _export_dynamo(model: FERModel, example: torch.Tensor, path: Path, names_in: list[str],
                   names_out: list[str], opset: int | None) -> None:
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model, (example,), str(path), input_names=names_in, output_names=names_out,
        dynamic_shapes=({0: batch},), opset_version=opset or DYNAMO_OPSET, dynamo=True,
        external_data=False, optimize=True, verbose=False,
    )


def _export_torchscript(model: FERModel, example: torch.Tensor, path: Path, names_in: list[str],
                        names_out: list[str], opset: int | None) -> None:
    dynamic_axes = {name: {0: "batch"} for name in names_in + names_out}
    torch.onnx.export(
        model, (example,), str(path), input_names=names_in, output_names=names_out,
        dynamic_axes=dynamic_axes, opset_version=opset or 17, dynamo=False,
    )


def export_onnx(model: FERModel, path: str | Path, opset: int | None = None, batch_size: int = 2,
                exporter: str | None = None) -> Path:
    """Export ``model`` (in eval mode) to ``path`` with a dynamic batch axis and check the graph.

    ``exporter``: ``"dynamo"`` or ``"torchscript"`` (default: :func:`exporter_for` the model's
    network); ``opset`` defaults to 18 (dynamo) / 17 (torchscript). Names of inputs/outputs come
    from ``model.metadata``; the metadata and the exporter are embedded.
    """
    import onnx

    if not isinstance(model, FERModel):
        raise ValueError(f"expected a FERModel, got {type(model).__name__}")
    if batch_size < 2:
        # A batch of 1 lets the tracer constant-fold the batch axis (torch.export specialises it).
        raise ValueError(f"batch_size must be >= 2 for a traceable dynamic batch axis, got {batch_size}")
    meta = model.metadata
    exporter = exporter or exporter_for(meta.name)
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    names_in = [s.name for s in meta.inputs]
    names_out = list(meta.output_names)
    export = _export_dynamo if exporter == "dynamo" else _export_torchscript
    try:
        with torch.no_grad():
            export(model, model.example_input(batch_size), path, names_in, names_out, opset)
    finally:
        model.train(was_training)
    onnx_model = onnx.load(str(path))
    fixed = [v.name for v in [*onnx_model.graph.input, *onnx_model.graph.output]
             if not v.type.tensor_type.shape.dim or not v.type.tensor_type.shape.dim[0].dim_param]
    if fixed:
        raise ValueError(f"{meta.name}: the {exporter} export fixed the batch axis of {fixed}; "
                         "Triton could not batch it")
    for key, value in ((METADATA_KEY, metadata_to_json(meta)), (EXPORTER_KEY, exporter)):
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value
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


def export_checkpoint(ckpt_path: str | Path, out: str | Path, opset: int | None = None, atol: float = 1e-4,
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
