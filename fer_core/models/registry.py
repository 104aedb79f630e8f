"""Model registry and the metadata every model carries.

Models are built only through :func:`create_model`. Each model carries a :class:`ModelMetadata`
(input/output tensor specs, normalisation, label names) that drives transforms, the MLflow
signature and the Triton ``config.pbtxt`` alike, so nothing downstream hard-codes shapes.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn

# The metadata is torch-free (package readers need it without torch); re-exported here.
from fer_core.metadata import OUTPUT_KINDS, TASKS, ModelMetadata, TensorSpec  # noqa: F401


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
