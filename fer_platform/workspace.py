"""The platform context: the settings of one run of the platform and the workspace folder they name.

A :class:`Workspace` is built once at each entry point (a ``fer`` command, a flow run, a script)
with :meth:`Workspace.load` — the one place that reads the environment and ``$FER_CONFIG`` — and
is passed down; library functions take it as an argument and never read the environment
themselves. ``Workspace(root)`` alone is the embedded default at ``root`` (no environment read).

``FER_HOME`` (or the settings file's ``home``, see :mod:`fer_platform.settings`) selects the folder
(default ``./.fer``). Everything the embedded stack writes lives below it, so deleting the folder
resets the platform. The Triton model repository is ``FER_MODEL_REPOSITORY``: a local folder (by
default ``$FER_HOME/triton/models``), or ``s3://bucket/prefix``, for which the workspace keeps the
local working copy at the default place and :mod:`serving.s3_repository` publishes it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from fer_platform.settings import ENV_PREFIX, Settings, is_remote


# What the platform writes is its owner's only: `fer` and the flows set this umask at start.
PRIVATE_UMASK = 0o077


class WorkspaceNotWritable(PermissionError):
    """The workspace folder cannot be created or written by this process (``filename``: the folder)."""


@dataclass(frozen=True)
class Workspace:
    """The platform context: :attr:`settings` and the paths of the state below :attr:`root`."""

    root: Path
    settings: Settings = field(default=None, repr=False)  # type: ignore[assignment]  # None: defaults at root

    def __post_init__(self) -> None:
        root = Path(self.root).expanduser().resolve()
        object.__setattr__(self, "root", root)
        if self.settings is None:  # the embedded default at this folder, whatever the environment says
            object.__setattr__(self, "settings", Settings.load(env={ENV_PREFIX + "HOME": str(root)}))
        elif Path(self.settings.home) != root:
            raise ValueError(f"workspace root {root} differs from the settings' home {self.settings.home}")

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, config_file: str | Path | None = None) -> "Workspace":
        """The context of an entry point: :meth:`Settings.load` (``env``, default ``os.environ``, over
        the ``$FER_CONFIG`` file over defaults) and the workspace it names."""
        return cls.from_settings(Settings.load(env, config_file))

    @classmethod
    def from_settings(cls, settings: Settings) -> "Workspace":
        return cls(Path(settings.home), settings)

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
        """The local folder of the Triton model repository: ``FER_MODEL_REPOSITORY`` when it is a
        local path, else (an ``s3://`` repository) the working copy that is published to it."""
        location = self.settings.model_repository
        return self.root / "triton" / "models" if is_remote(location) else Path(location.removeprefix("file://"))

    @property
    def model_repository(self) -> str:
        """Where Triton reads the repository (``FER_MODEL_REPOSITORY``): a local path or ``s3://...``."""
        return self.settings.model_repository

    @property
    def face_detection_override(self) -> str | None:
        """``FER_FACE_DETECTION`` when set explicitly (a deployment-wide override of each model
        version's own face handling), else None."""
        return self.settings.face_detection if self.settings.is_set("face_detection") else None

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
