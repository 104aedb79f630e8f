"""Code fingerprint of a network: its model, loss, task and preprocessing source files.

Part of the retrain cache key (with the data version and the recipe fingerprint) and of every
training run's tags (``code_fingerprint``) and model package, so a fix to any of those modules
retrains that network and leaves the others cached.

Which files: the model factory's module and the task's module, every ``fer_core.models`` /
``fer_core.losses`` / ``fer_core.training.tasks`` module they reference (followed transitively
through module globals), and the shared decode and model plumbing every network goes through
(:data:`SHARED_MODULES`). Trainer, metrics and tracking code are not included: they do not change
what a given model computes from given pixels and weights (a deliberate choice; widen
:data:`SHARED_MODULES` if that changes).
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from pathlib import Path
from types import ModuleType

SHARED_MODULES = (
    "fer_core.metadata",
    "fer_core.models.catalog",
    "fer_core.data.pipeline",
    "fer_core.data.preprocess",
    "fer_core.data.samples",
    "fer_core.data.transforms",
    "fer_core.training.task",
    "fer_core.training.datasets",
)
_FOLLOWED = ("fer_core.models.", "fer_core.losses.", "fer_core.training.tasks.")
_ROOT = Path(__file__).resolve().parents[2]

__all__ = ["SHARED_MODULES", "code_modules", "code_fingerprint"]


def _module_of(value: object) -> str | None:
    if isinstance(value, ModuleType):
        return value.__name__
    return getattr(value, "__module__", None) if inspect.isclass(value) or inspect.isfunction(value) else None


def code_modules(network: str) -> list[str]:
    """Names of the modules whose source makes up the fingerprint of ``network``, sorted."""
    import importlib

    from fer_core.models.catalog import get_network
    from fer_core.training.tasks import get_task_kind

    spec = get_network(network)  # the network's own file: model, profiles, metadata
    todo = [spec.factory.__module__, get_task_kind(spec.task).build.__module__, *SHARED_MODULES]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        module = sys.modules.get(name) or importlib.import_module(name)
        for value in vars(module).values():
            other = _module_of(value)
            if other and other.startswith(_FOLLOWED) and other not in seen:
                todo.append(other)
    return sorted(seen)


def _read_source(module_name: str) -> bytes:
    module = sys.modules[module_name]
    return Path(module.__file__).read_bytes()


def code_fingerprint(network: str) -> str:
    """sha256 (first 16 hex digits) over the sources of :func:`code_modules` (name + content)."""
    digest = hashlib.sha256()
    for name in code_modules(network):
        source = _read_source(name)
        digest.update(name.encode() + b"\0" + hashlib.sha256(source).digest())
    return digest.hexdigest()[:16]
