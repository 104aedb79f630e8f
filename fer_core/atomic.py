"""Atomic file writes: a temporary file in the same folder, ``fsync``, then ``os.replace``.

A crash or a full disk mid-write leaves the previous file intact (or no file), never a truncated
one: the replacement is one rename, and the temporary file is removed when the write fails.
"""

from __future__ import annotations

import builtins
import io
import os
import tempfile
from pathlib import Path
from typing import IO, Any


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (the folder is created if needed)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


class _AtomicFile(io.IOBase):
    """A write handle whose ``close`` publishes the file; a failed write or an exception inside
    ``with`` discards it."""

    def __init__(self, path: Path, mode: str, encoding: str | None) -> None:
        super().__init__()
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        binary = "b" in mode
        self._handle: IO[Any] = os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else (encoding or "utf-8"))
        self._failed = False

    def write(self, data: Any) -> int:  # type: ignore[override]
        try:
            return self._handle.write(data)
        except BaseException:
            self._failed = True
            raise

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        if not self._handle.closed:
            self._handle.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._failed:
                raise OSError("write failed")
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self._tmp, self._path)
        except BaseException:
            self.discard()
            if not self._failed:
                raise
        finally:
            super().close()

    def discard(self) -> None:
        try:
            self._handle.close()
        except OSError:
            pass  # a full disk can fail the final flush too
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._failed = True
            self.discard()
            super().close()
            return None
        self.close()
        return None


def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = None) -> IO[Any]:
    """``open(path, mode)`` for writing whole files (``w``/``wb``): the file appears on close, fully
    written and synced, or not at all. Other modes are passed to :func:`open` unchanged."""
    if mode not in ("w", "wb", "wt"):
        return builtins.open(path, mode, encoding=encoding)
    return _AtomicFile(Path(path), mode, encoding)  # type: ignore[return-value]


def open_writes_atomically(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
    """A drop-in for the builtin ``open`` whose whole-file writes are atomic (see :func:`atomic_open`);
    installed into third-party modules whose config writes would otherwise truncate on a full disk."""
    if mode in ("w", "wb", "wt") and not args:
        return atomic_open(path, mode, kwargs.get("encoding"))
    return builtins.open(path, mode, *args, **kwargs)
