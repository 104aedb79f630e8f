"""Model metadata without torch: tensor specs, :class:`ModelMetadata` and its JSON form.

Everything that reads a model package (serving's Triton stubs, the MLflow pyfunc, promotion) needs
the metadata but not torch, so the metadata lives here and :mod:`fer_core.models.catalog`
re-exports it for the model zoo.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

TASKS = ("static", "multitask", "micro", "dynamic", "au")
OUTPUT_KINDS = ("logits", "probabilities", "regression", "heatmaps", "features", "multilabel_logits")

__all__ = ["TASKS", "OUTPUT_KINDS", "TensorSpec", "ModelMetadata", "metadata_to_json", "metadata_from_json",
           "metadata_to_dict", "metadata_from_dict"]


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


def metadata_to_dict(metadata: ModelMetadata) -> dict[str, Any]:
    """A JSON-able dict (tuples become lists; ``extra`` must be JSON-able)."""
    return json.loads(json.dumps(asdict(metadata), sort_keys=True, default=list))


def metadata_from_dict(raw: Mapping[str, Any]) -> ModelMetadata:
    """Inverse of :func:`metadata_to_dict`."""

    def spec(d: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(name=d["name"], shape=tuple(d["shape"]), dtype=d["dtype"], kind=d["kind"],
                          labels=tuple(d["labels"]), description=d.get("description", ""))

    return ModelMetadata(
        name=raw["name"], task=raw["task"], inputs=tuple(spec(s) for s in raw["inputs"]),
        outputs=tuple(spec(s) for s in raw["outputs"]), mean=tuple(raw["mean"]), std=tuple(raw["std"]),
        label_names=tuple(raw["label_names"]), primary_output=raw["primary_output"], extra=raw["extra"],
    )


def metadata_to_json(metadata: ModelMetadata) -> str:
    """Serialise metadata (tuples become lists; ``extra`` must be JSON-able)."""
    return json.dumps(asdict(metadata), sort_keys=True, default=list)


def metadata_from_json(text: str) -> ModelMetadata:
    """Inverse of :func:`metadata_to_json`."""
    return metadata_from_dict(json.loads(text))
