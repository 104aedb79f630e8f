"""Task kinds (one per modality) and the per-network views over them.

A *task kind* (``static``, ``multitask``, ``micro``, ``dynamic``, ``au``; one module each in this
package, found by scanning it) says which manifest task it consumes, how to build the
:class:`~fer_core.training.task.Task` from a prepared dataset, and the typed options it reads:
frozen dataclasses for ``data.*``, ``loss_kwargs.*`` and ``augment.*``. Which kind trains a network,
and the network's ``quick``/``paper`` profiles, live in the network's own file
(:class:`fer_core.models.catalog.NetworkSpec`); this module joins the two.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fer_core.errors import UsageError
from fer_core.models.catalog import NetworkSpec, get_network, list_networks, registry_loading

if TYPE_CHECKING:
    from fer_core.training.recipe import Recipe
    from fer_core.training.task import Task

__all__ = ["TaskKind", "register_task_kind", "get_task_kind", "list_task_kinds", "list_networks",
           "get_network", "get_recipe", "create_task", "check_options", "task_kind_of"]


@dataclass(frozen=True)
class TaskKind:
    """One modality's task: data it trains on, how it is built, and its typed options."""

    name: str
    data_task: str  # the manifest task it trains on: static | multitask | micro | dynamic | au
    build: Callable[[Path, "Recipe", str], "Task"]  # (data root, recipe, network name)
    data_options: type  # frozen dataclass of the ``data.*`` keys
    loss_options: type  # frozen dataclass of the ``loss_kwargs.*`` keys
    augment_options: type | None  # frozen dataclass of the ``augment.*`` keys; None = no augmentation


_KINDS: dict[str, TaskKind] = {}
_loaded = False


def register_task_kind(kind: TaskKind) -> TaskKind:
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"task kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def _load() -> None:
    # Every module of this package is a task kind; an import error is a bug and propagates.
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def list_task_kinds() -> list[str]:
    _load()
    return sorted(_KINDS)


def get_task_kind(name: str) -> TaskKind:
    _load()
    if name not in _KINDS:
        raise UsageError(f"unknown task kind {name!r}; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def task_kind_of(network: str) -> TaskKind:
    """The task kind that trains ``network``."""
    return get_task_kind(get_network(network).task)


def get_recipe(network: str, profile: str = "quick") -> "Recipe":
    """The registered recipe of ``network`` for ``profile`` ("quick" or "paper")."""
    return get_network(network).recipe(profile)


def create_task(network: str, data_root: Path, recipe: "Recipe") -> "Task":
    """The task that trains ``network`` on the prepared dataset at ``data_root``."""
    from fer_core.data.manifest import read_card

    kind = task_kind_of(network)
    card = read_card(data_root)
    if card.task != kind.data_task:
        raise UsageError(f"network {network!r} trains on {kind.data_task!r} data, but {data_root} holds "
                         f"{card.task!r} data ({card.source_format})")
    task = kind.build(Path(data_root), recipe, network)
    task.primary_metric = get_network(network).primary_metric  # the spec is the one source of it
    return task


def check_options(recipe: "Recipe") -> dict[str, Any] | None:
    """The recipe's option mappings coerced by the network's typed options, or ``None`` when the
    network has no spec (a bare :func:`~fer_core.models.register_model` toy) or while the
    registries are still loading."""
    from fer_core.training.recipe import coerce_options, option_types

    if registry_loading():
        return None
    _load()
    spec: NetworkSpec | None = get_network(recipe.network, missing_ok=True)
    if spec is None:
        return None
    kind = get_task_kind(spec.task)
    out = {
        "model_kwargs": coerce_options(recipe.model_kwargs, spec.model_options(), "model_kwargs"),
        "data": coerce_options(recipe.data, option_types(kind.data_options), "data"),
        "loss_kwargs": coerce_options(recipe.loss_kwargs, option_types(kind.loss_options), "loss_kwargs"),
    }
    if kind.augment_options is None:
        if recipe.augment:
            raise UsageError(f"{recipe.network}'s task ({kind.name}) takes no augment options, "
                             f"got {dict(recipe.augment)}")
        out["augment"] = {}
    else:
        out["augment"] = coerce_options(recipe.augment, option_types(kind.augment_options), "augment")
    return out
