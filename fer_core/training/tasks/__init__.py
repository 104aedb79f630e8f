"""Per-network tasks and their recipe profiles, looked up by network (model) name.

Each module registers a :class:`TaskSpec`: which manifest task it consumes, how to build the
:class:`~fer_core.training.task.Task` from a prepared dataset, and its ``quick`` (CPU, minutes) and
``paper`` (the source method's hyper-parameters, for a GPU) recipes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from fer_core.training.recipe import PROFILES, Recipe
from fer_core.training.task import Task


@dataclass(frozen=True)
class TaskSpec:
    network: str
    data_task: str  # the manifest task it trains on: static | micro | dynamic | au
    build: Callable[[Path, Recipe], Task]
    profiles: Mapping[str, Recipe]


_TASKS: dict[str, TaskSpec] = {}
_TASK_MODULES = (
    "fer_core.training.tasks.static",
    "fer_core.training.tasks.multitask",
    "fer_core.training.tasks.micro",
    "fer_core.training.tasks.dynamic",
    "fer_core.training.tasks.au",
    "fer_core.training.tasks.magnifier",
)


def register_task(spec: TaskSpec) -> TaskSpec:
    missing = set(PROFILES) - set(spec.profiles)
    if missing:
        raise ValueError(f"task {spec.network!r} lacks profiles {sorted(missing)}")
    _TASKS[spec.network] = spec
    return spec


def _load() -> None:
    for module in _TASK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def list_networks() -> list[str]:
    """Networks the trainer can train."""
    _load()
    return sorted(_TASKS)


def get_task_spec(network: str) -> TaskSpec:
    _load()
    if network not in _TASKS:
        raise ValueError(f"no training task for network {network!r}; trainable: {', '.join(sorted(_TASKS))}")
    return _TASKS[network]


def get_recipe(network: str, profile: str = "quick") -> Recipe:
    """The registered recipe of ``network`` for ``profile`` ("quick" or "paper")."""
    spec = get_task_spec(network)
    if profile not in spec.profiles:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(spec.profiles)}")
    return spec.profiles[profile]


def create_task(network: str, data_root: Path, recipe: Recipe) -> Task:
    """The task that trains ``network`` on the prepared dataset at ``data_root``."""
    from fer_core.data.manifest import read_card

    spec = get_task_spec(network)
    card = read_card(data_root)
    if card.task != spec.data_task:
        raise ValueError(f"network {network!r} trains on {spec.data_task!r} data, but {data_root} holds "
                         f"{card.task!r} data ({card.source_format})")
    return spec.build(Path(data_root), recipe)
