"""The workspace: one folder that holds all local state of the embedded default.

``FER_HOME`` (or the settings file's ``home``, see :mod:`fer_core.settings`) selects it (default
``./.fer``). Everything the embedded stack writes lives below it,
so deleting the folder resets the platform.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path



# What the platform writes is its owner's only: `fer` and the flows set this umask at start.
PRIVATE_UMASK = 0o077


class WorkspaceNotWritable(PermissionError):
    """The workspace folder cannot be created or written by this process (``filename``: the folder)."""


@dataclass(frozen=True)
class Workspace:
    """Paths of the embedded default's state below one root folder."""

    root: Path

    @classmethod
    def from_env(cls) -> "Workspace":
        """The workspace of the platform settings: ``$FER_HOME``, else the settings file's ``home``,
        else ``./.fer`` (see :mod:`fer_core.settings`)."""
        from fer_core.settings import Settings

        return cls(Settings.load().home)

    @property
    def datasets(self) -> Path:
        """Prepared datasets (manifest + card + files), tracked by DVC."""
        return self.root / "data" / "datasets"

    @property
    def dvc_repo(self) -> Path:
        """The workspace's DVC repository (``dvc init --no-scm``)."""
        return self.root / "data"

    @property
    def dvc_remote(self) -> Path:
        """Default local DVC remote."""
        return self.root / "dvc-remote"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow" / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlflow" / "artifacts"

    @property
    def gx_docs(self) -> Path:
        """Great Expectations project with its Data Docs."""
        return self.root / "gx"

    @property
    def triton_repository(self) -> Path:
        return self.root / "triton" / "models"

    @property
    def runs(self) -> Path:
        """Training checkpoints and scratch outputs."""
        return self.root / "runs"

    def ensure(self) -> "Workspace":
        """Create the root folder (sub-folders are created by their owners); the caller will write
        into it, so a workspace this process cannot write raises :class:`WorkspaceNotWritable`."""
        hint = "set FER_HOME to a folder you can write"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceNotWritable(errno.EACCES, f"{exc.strerror}; {hint}", str(self.root)) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise WorkspaceNotWritable(errno.EACCES, f"the workspace is read-only or not yours; {hint}",
                                       str(self.root))
        return self
