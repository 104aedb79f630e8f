"""Pinned requirement lines from the platform's lock (``requirements/constraints.txt``).

What a logged MLflow model declares (``pip_requirements=``), so ``mlflow models serve`` or a
``pip install -r requirements.txt`` of the model rebuilds the environment it was trained and
exported in. The lock is read from the source tree (a checkout, an editable install, the image's
``/opt/fer``); a wheel install has no lock beside it and pins what is installed instead, which is
what the lock installed (``pip install -c requirements/constraints.txt .``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "constraints.txt"
# What a logged model of the platform needs at inference: the PyTorch flavour (torch, numpy) and
# the ONNX flavour (onnx, onnxruntime); MLflow adds itself.
MODEL_PACKAGES = ("torch", "numpy", "onnx", "onnxruntime")


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@lru_cache(maxsize=4)
def lock_pins(lock: Path = LOCK) -> dict[str, str]:
    """Canonical name → exact version of every ``name==version`` line of ``lock`` ({} without one)."""
    pins: dict[str, str] = {}
    try:
        text = Path(lock).read_text()
    except FileNotFoundError:
        return pins
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name.split("[", 1)[0])] = version.strip()
    return pins


def pinned_requirements(packages: tuple[str, ...] | list[str] = MODEL_PACKAGES, lock: Path = LOCK) -> list[str]:
    """``name==version`` for each of ``packages``: the lock's pin, else the installed version.

    Raises ``LookupError`` for a package that is neither in the lock nor installed.
    """
    pins = lock_pins(Path(lock))
    lines = []
    for package in packages:
        version = pins.get(canonical(package))
        if version is None:
            try:
                version = metadata.version(package).split("+", 1)[0]
            except metadata.PackageNotFoundError:
                raise LookupError(f"{package} is neither pinned in {lock} nor installed") from None
        lines.append(f"{package}=={version}")
    return lines
