"""The platform tier: configuration and the workspace, below ``flows``, ``registry``, ``serving``
and ``fer_cli`` and above nothing but the standard library and PyYAML.

``fer_core`` (the pure ML library) never uses it; a test enforces that. Entry points build one
:class:`~fer_platform.workspace.Workspace` with ``Workspace.load()`` and pass it down.
"""

from fer_platform.settings import Settings
from fer_platform.workspace import Workspace

__all__ = ["Settings", "Workspace"]
