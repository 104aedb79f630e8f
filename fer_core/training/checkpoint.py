"""Checkpoints: atomic writes, a SHA-256 sidecar, and safe loading (``weights_only=True``).

A checkpoint holds only tensors and plain Python values (no pickled classes), so it loads with
``torch.load(weights_only=True)``; the recipe inside it rebuilds the model through
``create_model``. The sidecar hash catches truncated or corrupted files before torch parses them.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or of an unknown format."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Write ``state`` atomically (temp file + rename) with ``<path>.sha256`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sidecar_tmp = path.with_name(f".{path.name}.sha256.tmp-{os.getpid()}")
    try:
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        sidecar_tmp.write_text(f"{digest}  {path.name}\n")
    except BaseException as exc:  # e.g. a full disk: leave no partial temporaries taking the space
        tmp.unlink(missing_ok=True)
        sidecar_tmp.unlink(missing_ok=True)
        # torch's zip writer reports a full disk as RuntimeError("... iostream error"): say what it is.
        if isinstance(exc, RuntimeError) and os.statvfs(path.parent).f_bavail == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
    # Hash first, then data: a crash between the renames leaves a hash that the old file fails,
    # which is reported as corruption instead of silently loading a mismatched pair.
    os.replace(sidecar_tmp, path.with_name(path.name + ".sha256"))
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify the hash, then load with ``weights_only=True``. Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path} has no {sidecar.name}; refusing an unverified file")
    expected = sidecar.read_text().split()[0]
    actual = _sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated: sha256 {actual[:12]}… != recorded {expected[:12]}…"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for bad pickles
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a format-{FORMAT_VERSION} platform checkpoint")
    return state
