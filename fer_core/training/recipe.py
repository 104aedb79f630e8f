"""Training recipes: frozen dataclasses, overridable from YAML or ``key=value`` pairs.

A recipe fully describes a training run (model + kwargs, loss, optimiser, schedule, data options,
augmentation, seed, device). It is logged as flat params, stored in every checkpoint, and hashed
(:meth:`Recipe.fingerprint`) so an unchanged recipe on an unchanged data version can be skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

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
    max_steps_per_epoch: int = 0  # 0 = full epochs; >0 caps steps (quick profiles, tests)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got {self.monitor_mode!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")

    # -- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (what checkpoints store)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown recipe keys: {unknown}; known: {sorted(names)}")
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
                raise ValueError(f"unknown recipe key {head!r}")
            if rest:
                if not isinstance(raw[head], dict):
                    raise ValueError(f"recipe key {head!r} is not a mapping; cannot set {key!r}")
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
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ValueError(f"cannot read recipe file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:  # one line: the problem and where, not the parser's traceback
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ValueError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a recipe file must hold a mapping")
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, Mapping) and key in ("model_kwargs", "loss_kwargs", "data", "augment"):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return self.with_overrides(flat)


def parse_set_options(pairs: list[str]) -> dict[str, Any]:
    """``["lr=0.01", "model_kwargs.width=16"]`` → overrides, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r} must look like KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out
