"""Model registry and the metadata every model carries.

Models are built only through :func:`create_model`. Each model carries a :class:`ModelMetadata`
(input/output tensor specs, normalisation, label names) that drives transforms, the MLflow
signature and the Triton ``config.pbtxt`` alike, so nothing downstream hard-codes shapes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

TASKS = ("static", "multitask", "micro", "dynamic", "au")
OUTPUT_KINDS = ("logits", "probabilities", "regression", "heatmaps", "features", "multilabel_logits")


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output tensor; ``shape`` excludes the batch axis (-1 = dynamic)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = "image"
    labels: tuple[str, ...] = ()  # per-index names for classification / multi-label outputs
    description: str = ""


@dataclass(frozen=True)
class ModelMetadata:
    """What serving, tracking and data transforms need to know about a model."""

    name: str
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: tuple[str, ...] = ()
    primary_output: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if not self.inputs or not self.outputs:
            raise ValueError("a model needs at least one input and one output spec")
        names = [s.name for s in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate output names: {names}")
        if self.primary_output and self.primary_output not in names:
            raise ValueError(f"primary_output {self.primary_output!r} is not among outputs {names}")

    @property
    def input(self) -> TensorSpec:
        """The (single) input spec."""
        return self.inputs[0]

    @property
    def in_chans(self) -> int:
        """Channels of an image or per-frame input (the axis before H, W)."""
        return self.input.shape[-3]

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the input images or frames."""
        return (self.input.shape[-2], self.input.shape[-1])

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)


class FERModel(nn.Module):
    """Common API of every platform model (timm-style).

    ``forward(x)`` returns one tensor when the model has one output, else a tuple ordered as
    ``metadata.outputs`` (this is what ONNX export sees). ``forward_train(x)`` returns a dict with
    everything the model's loss needs (by default the named outputs).
    """

    metadata: ModelMetadata

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> Any:
        raise NotImplementedError

    @property
    def num_features(self) -> int:
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Any:
        return self.forward_head(self.forward_features(x))

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.outputs_as_dict(self(x))

    def outputs_as_dict(self, out: Any) -> dict[str, torch.Tensor]:
        """Name the outputs of :meth:`forward` after ``metadata.outputs``."""
        if isinstance(out, torch.Tensor):
            out = (out,)
        names = self.metadata.output_names
        if len(out) != len(names):
            raise ValueError(f"{self.metadata.name}: got {len(out)} outputs for specs {names}")
        return dict(zip(names, out))

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """A random input of the right shape (export, smoke tests, signatures)."""
        spec = self.metadata.input
        return torch.rand((batch_size, *spec.shape), dtype=getattr(torch, spec.dtype))


_MODEL_FACTORIES: dict[str, Callable[..., FERModel]] = {}
# Model family modules; importing them fills the registry.
_MODEL_MODULES = (
    "fer_core.models.resnet",
    "fer_core.models.ca_resnet",
    "fer_core.models.multitask_fer",
    "fer_core.models.micro_lsh",
    "fer_core.models.c3d_ecstfl",
    "fer_core.models.au_cotrain",
)


def register_model(fn: Callable[..., FERModel]) -> Callable[..., FERModel]:
    """Decorator: register a model factory under its function name."""
    name = fn.__name__
    if name in _MODEL_FACTORIES and _MODEL_FACTORIES[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _MODEL_FACTORIES[name] = fn
    return fn


def _load_model_modules() -> None:
    for module in _MODEL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a family not written yet must not hide the others
            if exc.name != module:
                raise


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _load_model_modules()
    return sorted(_MODEL_FACTORIES)


def create_model(name: str, **kwargs: Any) -> FERModel:
    """Build a registered model. The name and kwargs are kept on the model so that a
    checkpoint can rebuild it (``create_model(m.model_name, **m.create_kwargs)``)."""
    _load_model_modules()
    if name not in _MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODEL_FACTORIES))}")
    model = _MODEL_FACTORIES[name](**kwargs)
    if not isinstance(model, FERModel):
        raise TypeError(f"factory {name!r} returned {type(model).__name__}, not a FERModel")
    model.model_name = name
    model.create_kwargs = dict(kwargs)
    return model
