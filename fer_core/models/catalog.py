"""Model and network registry, and the metadata every model carries.

Models are built only through :func:`create_model`. Each model carries a :class:`ModelMetadata`
(input/output tensor specs, normalisation, label names) that drives transforms, the MLflow
signature and the Triton ``config.pbtxt`` alike, so nothing downstream hard-codes shapes.

A *network* is a model family the platform trains, exports and serves. Everything about it lives in
its own file (timm's shape): the model, its factory and one :class:`NetworkSpec` (task kind,
``quick``/``paper`` profiles, default data source, primary metric, demo size, metadata) passed to
:func:`register_network`. The registry finds network files by importing every module of
``fer_core.models``, the modules of the ``fer_core.networks`` entry-point group (plugins) and the
comma-separated modules of ``FER_NETWORK_MODULES``; a module that does not import is an error,
never a silently missing network.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from fer_core.training.recipe import Recipe

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


@dataclass(frozen=True)
class NetworkSpec:
    """Everything the platform needs to know about one network, declared in the network's file.

    ``profiles`` is a zero-argument function returning ``{"quick": Recipe, "paper": Recipe}``; it is
    called once the registry is loaded, so the recipes are checked against this very spec.
    """

    name: str
    factory: Callable[..., FERModel]
    task: str  # task kind that trains it (fer_core.training.tasks): static | multitask | micro | dynamic | au
    profiles: Callable[[], Mapping[str, "Recipe"]]
    data_format: str  # default source format (fer_core.data.formats), e.g. "fer2013"
    dataset: str  # default dataset name its source is versioned under, e.g. "fer2013"
    primary_metric: str  # higher is better; what promotion compares
    demo_size: int  # samples `fer demo` generates for it
    model_class: type | None = None  # whose __init__ signature lists the valid model_kwargs
    fixed_kwargs: tuple[str, ...] = ()  # __init__ parameters the factory sets itself (not model_kwargs)
    description: str = ""
    reference: str = ""  # the source paper / method
    default: bool = True  # part of the default pipeline and demo (baselines are not)

    def model_options(self) -> dict[str, Any]:
        """Valid ``model_kwargs``: name -> annotation, from the model class (or the factory)."""
        from fer_core.training.recipe import option_types

        target = self.model_class or self.factory
        return option_types(target, exclude=self.fixed_kwargs)

    def recipe(self, profile: str) -> "Recipe":
        """The registered recipe for ``profile``."""
        from fer_core.errors import UsageError

        recipes = _profiles_of(self)
        if profile not in recipes:
            raise UsageError(f"unknown profile {profile!r} for {self.name}; choose from {sorted(recipes)}")
        return recipes[profile]

    @property
    def profile_names(self) -> tuple[str, ...]:
        return tuple(sorted(_profiles_of(self)))


_MODEL_FACTORIES: dict[str, Callable[..., FERModel]] = {}
_NETWORKS: dict[str, NetworkSpec] = {}
_PROFILES: dict[str, Mapping[str, "Recipe"]] = {}
_state = {"loaded": False, "loading": False}
NETWORK_MODULES_ENV = "FER_NETWORK_MODULES"
ENTRY_POINT_GROUP = "fer_core.networks"


def register_network(spec: NetworkSpec) -> NetworkSpec:
    """Register a network (call it at the bottom of the network's file); also registers its factory."""
    if spec.name in _NETWORKS and _NETWORKS[spec.name] != spec:
        raise ValueError(f"network {spec.name!r} is registered twice")
    if _MODEL_FACTORIES.get(spec.name, spec.factory) is not spec.factory:
        raise ValueError(f"network {spec.name!r}: another model factory has that name")
    _MODEL_FACTORIES[spec.name] = spec.factory
    _NETWORKS[spec.name] = spec
    _PROFILES.pop(spec.name, None)
    return spec


def _profiles_of(spec: NetworkSpec) -> Mapping[str, "Recipe"]:
    from fer_core.training.recipe import PROFILES

    _load_model_modules()
    if spec.name not in _PROFILES:
        recipes = dict(spec.profiles())
        missing = sorted(set(PROFILES) - set(recipes))
        if missing:
            raise ValueError(f"network {spec.name!r} lacks profiles {missing}")
        for name, recipe in recipes.items():
            if recipe.network != spec.name or recipe.profile != name:
                raise ValueError(f"network {spec.name!r}: profile {name!r} holds a recipe for "
                                 f"{recipe.network!r}/{recipe.profile!r}")
        _PROFILES[spec.name] = recipes
    return _PROFILES[spec.name]


def registry_loading() -> bool:
    """True while network modules are being imported (recipes built then are checked later)."""
    return _state["loading"]


def _network_module_names() -> list[str]:
    from importlib.metadata import entry_points

    import fer_core.models as package

    names = [f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
             if info.name != "catalog"]
    names += [ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]
    names += [m.strip() for m in os.environ.get(NETWORK_MODULES_ENV, "").split(",") if m.strip()]
    return names


def _load_model_modules() -> None:
    if _state["loaded"] or _state["loading"]:
        return
    _state["loading"] = True
    try:
        for module in _network_module_names():
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise  # the module exists but one of its imports does not: a real bug
                from fer_core.errors import UsageError

                raise UsageError(f"network module {module!r} cannot be imported (from {NETWORK_MODULES_ENV} "
                                 f"or the {ENTRY_POINT_GROUP!r} entry points): no such module") from None
        _state["loaded"] = True
    finally:
        _state["loading"] = False


def list_networks(*, default_only: bool = False) -> list[str]:
    """Names of all registered networks (trainable model families), sorted; ``default_only``: those
    in the default pipeline and demo."""
    _load_model_modules()
    return sorted(n for n, s in _NETWORKS.items() if s.default or not default_only)


def get_network(name: str, *, missing_ok: bool = False) -> NetworkSpec | None:
    """The spec of network ``name`` (``None`` when unknown and ``missing_ok``)."""
    _load_model_modules()
    if name not in _NETWORKS:
        if missing_ok:
            return None
        from fer_core.errors import UsageError

        raise UsageError(f"unknown network {name!r}; registered: {', '.join(sorted(_NETWORKS))}")
    return _NETWORKS[name]


def network_specs(*, default_only: bool = False) -> list[NetworkSpec]:
    """The registered specs, sorted by name."""
    return [_NETWORKS[n] for n in list_networks(default_only=default_only)]


def register_model(fn: Callable[..., FERModel]) -> Callable[..., FERModel]:
    """Decorator: register a model factory under its function name."""
    name = fn.__name__
    if name in _MODEL_FACTORIES and _MODEL_FACTORIES[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _MODEL_FACTORIES[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _load_model_modules()
    return sorted(_MODEL_FACTORIES)


def create_model(name: str, **kwargs: Any) -> FERModel:
    """Build a registered model. The name and kwargs are kept on the model so that a
    checkpoint can rebuild it (``create_model(m.model_name, **m.create_kwargs)``)."""
    _load_model_modules()
    if name not in _MODEL_FACTORIES:
        from fer_core.errors import UsageError

        raise UsageError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODEL_FACTORIES))}")
    model = _MODEL_FACTORIES[name](**kwargs)
    if not isinstance(model, FERModel):
        raise TypeError(f"factory {name!r} returned {type(model).__name__}, not a FERModel")
    model.model_name = name
    model.create_kwargs = dict(kwargs)
    return model
