"""Training recipes: frozen dataclasses, overridable from YAML or ``key=value`` pairs.

A recipe fully describes a training run (model + kwargs, loss, optimiser, schedule, data options,
augmentation, seed, device). It is logged as flat params, stored in every checkpoint, and hashed
(:meth:`Recipe.fingerprint`) so an unchanged recipe on an unchanged data version can be skipped.

Values are *typed*: every top-level field is coerced by its annotation (``lr=3e-4`` from YAML 1.1,
which reads it as a string, becomes the float 0.0003; ``epochs=abc`` or ``batch_size=true`` is
refused). The four option mappings are checked against the network's spec
(:mod:`fer_core.models.catalog`): ``model_kwargs`` against the model class's signature, ``data``,
``loss_kwargs`` and ``augment`` against its task's frozen option dataclasses
(:class:`fer_core.training.tasks.TaskKind`). Only keys that are set are stored (defaults live in the
option dataclasses), so a no-op override (setting a value to what it already is) keeps the
fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from fer_core.errors import UsageError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "step", "hold_decay_cosine", "none")
PROFILES = ("quick", "paper")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a training run."""

    network: str  # registered model name
    profile: str = "quick"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    loss_kwargs: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)  # task data options (image size, frames, fold, ...)
    augment: Mapping[str, Any] = field(default_factory=dict)  # task augmentation options
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    warmup_epochs: int = 0
    epochs: int = 10
    batch_size: int = 32  # global batch (split across DDP ranks)
    eval_batch_size: int = 64
    early_stopping_patience: int = 0  # 0 = off
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision, used on CUDA only
    grad_clip: float = 0.0  # max gradient norm, 0 = off
    num_workers: int = 0
    max_steps_per_epoch: int = 0  # 0 = no limit (full epochs); >0 caps steps (quick profiles, tests)

    def __post_init__(self) -> None:
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"recipe key 'optimizer' must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise UsageError(f"recipe key 'scheduler' must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.monitor_mode not in ("min", "max"):
            raise UsageError(f"recipe key 'monitor_mode' must be 'min' or 'max', got {self.monitor_mode!r}")
        if self.profile not in PROFILES:
            raise UsageError(f"recipe key 'profile' must be one of {PROFILES}, got {self.profile!r}")
        for key, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("step_size", 1),
                         ("warmup_epochs", 0), ("early_stopping_patience", 0), ("num_workers", 0),
                         ("max_steps_per_epoch", 0)):
            if getattr(self, key) < low:
                hint = " (0 = no limit)" if key == "max_steps_per_epoch" else ""
                raise UsageError(f"recipe key {key!r} must be >= {low}{hint}, got {getattr(self, key)}")
        for key in ("lr",):
            if not getattr(self, key) > 0:
                raise UsageError(f"recipe key {key!r} must be > 0, got {getattr(self, key)}")
        for key in ("weight_decay", "momentum", "grad_clip", "gamma"):
            if getattr(self, key) < 0:
                raise UsageError(f"recipe key {key!r} must be >= 0, got {getattr(self, key)}")
        # The option mappings, against the network's spec (skipped for models without one, e.g. test toys).
        from fer_core.training.tasks import check_options

        checked = check_options(self)
        if checked is not None:
            for name, value in checked.items():
                object.__setattr__(self, name, value)

    # -- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (what checkpoints store)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise UsageError(f"unknown recipe keys {unknown}; known: {', '.join(sorted(names))}")
        if "network" not in raw:
            raise UsageError("a recipe needs a 'network'")
        return cls(**raw)

    def to_params(self) -> dict[str, str]:
        """Flat ``a.b -> value`` strings (MLflow params)."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                flat[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

        walk("", self.to_dict())
        return flat

    def fingerprint(self) -> str:
        """Stable hash of the recipe's content (device excluded: it does not change the result's meaning)."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("device", "num_workers")}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    # -- overrides ---------------------------------------------------------------------------
    def with_overrides(self, overrides: Mapping[str, Any]) -> "Recipe":
        """Apply ``{"lr": 0.01, "model_kwargs.width": 16}``-style overrides (dotted keys go into mappings)."""
        raw = self.to_dict()
        for key, value in overrides.items():
            head, _, rest = key.partition(".")
            if head not in raw:
                raise UsageError(f"unknown recipe key {head!r}; known: {', '.join(sorted(raw))}")
            if rest:
                if not isinstance(raw[head], dict):
                    raise UsageError(f"recipe key {head!r} is not a mapping; cannot set {key!r}")
                node = raw[head]
                *parents, leaf = rest.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = value
            else:
                raw[head] = value
        return Recipe.from_dict(raw)

    def with_yaml(self, path: Path) -> "Recipe":
        """Overrides from a YAML file (nested mappings or dotted keys)."""
        data = yaml.safe_load(read_recipe_text(Path(path))) or {}
        if not isinstance(data, Mapping):
            raise UsageError(f"{path}: a recipe file must hold a mapping")
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, Mapping) and key in ("model_kwargs", "loss_kwargs", "data", "augment"):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return self.with_overrides(flat)


def parse_set_options(pairs: list[str]) -> dict[str, Any]:
    """``["lr=0.01", "model_kwargs.width=16"]`` → overrides, values parsed as YAML scalars
    (then coerced by the recipe's field types, so ``lr=3e-4`` is a float)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {pair!r} must look like KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {key.strip()}: {value!r} is not a YAML value "
                             f"({getattr(exc, 'problem', None) or 'syntax error'})") from None
    return out


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; refuse devices and huge files before reading


def read_recipe_text(path: Path) -> str:
    """The text of a recipe YAML file, refused in one line when it is not a small regular file or not YAML."""
    try:
        if not path.is_file():
            raise UsageError(f"recipe file {path} is not a regular file")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UsageError(f"recipe file {path} is larger than {MAX_RECIPE_BYTES} bytes")
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read recipe file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"recipe file {path} is not UTF-8 text") from None
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exc:  # one line: the problem and where, not the parser's traceback
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UsageError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return text


# -- typed values ----------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", None) or str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, key: str, what: str = "recipe key") -> Any:
    """``value`` as the annotation ``tp`` asks (JSON-safe: sequences become lists), or a
    :class:`UsageError` naming ``key``. Booleans are never numbers and numbers never booleans."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, what)
            except UsageError:
                continue
        raise UsageError(f"{what} {key!r} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UsageError(f"{what} {key!r} must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a subject id written as 17
    elif origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise UsageError(f"{what} {key!r} must hold {len(args)} values, got {list(value)!r}")
                return [coerce(v, a, f"{key}[{i}]", what) for i, (v, a) in enumerate(zip(value, args))]
            inner = args[0] if args else Any
            return [coerce(v, inner, f"{key}[{i}]", what) for i, v in enumerate(value)]
    elif origin in (dict, Mapping, typing.Mapping) or tp in (dict, Mapping):
        if isinstance(value, Mapping):
            return dict(value)
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value  # an annotation we do not interpret (e.g. a Callable): passed through
    raise UsageError(f"{what} {key!r} must be {_type_name(tp)}, got {value!r}")


def option_types(target: Any, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Name -> annotation of the options ``target`` accepts: a dataclass's fields, or the typed
    keyword parameters of a class's ``__init__`` / a function (``self``, ``*args``, ``**kw`` and
    ``exclude`` left out). Unannotated parameters map to ``Any``."""
    import inspect

    if dataclasses.is_dataclass(target):
        hints = _field_types(target)
        return {f.name: hints[f.name] for f in dataclasses.fields(target) if f.name not in exclude}
    fn = target.__init__ if isinstance(target, type) else target
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to untyped
        hints = {}
    out = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name == "self" or name in exclude or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        out[name] = hints.get(name, Any)
    return out


def coerce_options(raw: Mapping[str, Any], types_: Mapping[str, Any], where: str,
                   what: str = "recipe key") -> dict[str, Any]:
    """``raw`` with each value coerced by ``types_``; unknown keys refused, naming the known ones.
    ``where`` prefixes the key names in messages (``model_kwargs`` → ``model_kwargs.width``)."""
    if not isinstance(raw, Mapping):
        raise UsageError(f"{what} {where!r} must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        known = ", ".join(sorted(types_)) or "none"
        raise UsageError(f"unknown {what}{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(f'{where}.{k}' for k in unknown)}; known {where} keys: {known}")
    return {k: coerce(v, types_[k], f"{where}.{k}", what) for k, v in raw.items()}
