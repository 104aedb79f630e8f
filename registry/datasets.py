"""Dataset versions with DVC: the workspace's DVC repository and its remote.

A version of a dataset is DVC's content hash of its prepared folder (the ``md5`` of the ``.dir``
object), so adding the same data twice yields the same version, and the hash alone is enough to
restore the data from the remote. Each version also gets a small index entry (JSON) for listing
and lineage (``parent``), e.g. the refined label tables of the AU rounds.

Layout inside the workspace (``Workspace.dvc_repo``)::

    data/.dvc/                      DVC repository (no SCM), default remote = Workspace.dvc_remote
    data/datasets/<name>/           working copy of the checked-out version
    data/datasets/<name>.dvc        DVC pointer of that version
    data/versions/<name>/<md5>.json index entry of every version ever added
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from fer_core.data.manifest import read_card
from fer_core.settings import Settings
from fer_core.workspace import Workspace

REMOTE_ENV = "FER_DVC_REMOTE"
REMOTE_NAME = "storage"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class DataVersionError(RuntimeError):
    """DVC failed; the message carries DVC's own output."""


@dataclass(frozen=True)
class DatasetVersion:
    """One version of a named dataset."""

    name: str
    version: str  # DVC md5 of the prepared folder
    task: str
    source_format: str
    num_samples: int
    size_bytes: int
    num_files: int
    created_at: str
    source: str = ""
    parent: str = ""  # "<name>@<version>" this one derives from, if any
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def short(self) -> str:
        return self.version[:12]


def check_dataset_name(name: str) -> str:
    if not name or not set(name) <= _NAME_CHARS or name[0] in "._-":
        raise ValueError(
            f"dataset name {name!r} must be lower-case letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name@version`` (version may be a unique prefix) or ``name`` (latest)."""
    name, _, version = ref.partition("@")
    return check_dataset_name(name), (version or None)


class DatasetStore:
    """The workspace's DVC-backed dataset store."""

    def __init__(self, workspace: Workspace | None = None, remote_url: str | None = None) -> None:
        settings = Settings.load()  # FER_DVC_REMOTE / $FER_CONFIG; credentials stay in the environment
        self.workspace = workspace or Workspace(settings.home)
        self.repo = self.workspace.dvc_repo
        configured = settings.dvc_remote if settings.is_set("dvc_remote") else None
        self.remote_url = remote_url or configured or str(self.workspace.dvc_remote)
        self.s3_endpoint_url = settings.s3_endpoint_url

    # -- DVC plumbing -------------------------------------------------------------------------
    def _dvc(self, *args: str) -> str:
        exe = Path(sys.executable).with_name("dvc")
        cmd = [str(exe) if exe.exists() else "dvc", *args]
        env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(self.repo / ".dvc-site")}
        proc = subprocess.run(cmd, cwd=self.repo, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise DataVersionError(f"`dvc {' '.join(args)}` failed: {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def init(self) -> None:
        """Create the DVC repository and point its default remote at ``remote_url`` (idempotent)."""
        self.repo.mkdir(parents=True, exist_ok=True)
        if not (self.repo / ".dvc").is_dir():
            self._dvc("init", "--no-scm", "-q")
            self._dvc("config", "core.analytics", "false")
            self._dvc("config", "core.autostage", "false")
        remote = self.remote_url
        if "://" not in remote:
            Path(remote).mkdir(parents=True, exist_ok=True)
            remote = str(Path(remote).resolve())
        self._dvc("remote", "add", "--force", "--default", REMOTE_NAME, remote)
        if remote.startswith("s3://") and self.s3_endpoint_url:  # MinIO or another S3-compatible store
            self._dvc("remote", "modify", REMOTE_NAME, "endpointurl", self.s3_endpoint_url)
        (self.repo / "datasets").mkdir(exist_ok=True)

    def _pointer(self, name: str) -> Path:
        return self.repo / "datasets" / f"{name}.dvc"

    def _index_dir(self, name: str) -> Path:
        return self.repo / "versions" / name

    # -- public API ---------------------------------------------------------------------------
    def add(self, name: str, prepared: Path, *, source: str = "", parent: str = "",
            extra: Mapping[str, Any] | None = None, push: bool = True) -> DatasetVersion:
        """Version a prepared (already validated) dataset folder under ``name`` and push it.

        ``prepared`` is moved into the store's working copy. Returns the version; adding identical
        content again returns the same version. ``push=False`` leaves the upload to :meth:`push`
        (so an orchestrator can retry the network part alone).
        """
        check_dataset_name(name)
        prepared = Path(prepared)
        card = read_card(prepared)
        self.init()
        target = self.repo / "datasets" / name
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(prepared), str(target))
        self._dvc("add", "-q", f"datasets/{name}")
        if push:
            self.push(name)
        out = yaml.safe_load(self._pointer(name).read_text())["outs"][0]
        version = DatasetVersion(
            name=name, version=str(out["md5"]).removesuffix(".dir"), task=card.task,
            source_format=card.source_format, num_samples=card.num_samples,
            size_bytes=int(out.get("size", 0)), num_files=int(out.get("nfiles", 0)),
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source=source,
            parent=parent, extra=dict(extra or {}),
        )
        index = self._index_dir(name) / f"{version.version}.json"
        if not index.exists():  # keep the first creation time of a re-added version
            index.parent.mkdir(parents=True, exist_ok=True)
            index.write_text(json.dumps(asdict(version), indent=2) + "\n")
        return self.get(name, version.version)

    def push(self, name: str) -> None:
        """Upload the checked-out version of ``name`` to the remote (idempotent)."""
        self._dvc("push", "-q", f"datasets/{check_dataset_name(name)}.dvc")

    def list(self, name: str | None = None) -> list[DatasetVersion]:
        """All known versions (of one dataset, or of all), oldest first."""
        root = self.repo / "versions"
        folders = [root / name] if name else sorted(p for p in root.glob("*") if p.is_dir())
        versions = [
            DatasetVersion(**json.loads(f.read_text())) for d in folders if d.is_dir() for f in d.glob("*.json")
        ]
        return sorted(versions, key=lambda v: (v.name, v.created_at, v.version))

    def get(self, name: str, version: str | None = None) -> DatasetVersion:
        """A version by full hash or unique prefix; ``None`` = the newest."""
        versions = self.list(check_dataset_name(name))
        if not versions:
            raise ValueError(f"no versions of dataset {name!r} in {self.repo}")
        if version is None:
            return versions[-1]
        hits = [v for v in versions if v.version.startswith(version)]
        if len(hits) != 1:
            known = ", ".join(v.short for v in versions)
            raise ValueError(
                f"{'ambiguous' if hits else 'unknown'} version {version!r} of {name!r}; known: {known}"
            )
        return hits[0]

    def checked_out(self, name: str) -> str | None:
        """The version currently in the working copy, if any."""
        pointer = self._pointer(check_dataset_name(name))
        if not pointer.is_file() or not (self.repo / "datasets" / name).is_dir():
            return None
        return str(yaml.safe_load(pointer.read_text())["outs"][0]["md5"]).removesuffix(".dir")

    def pull(self, name: str, version: str | None = None) -> Path:
        """Restore ``name@version`` into the working copy from the cache or the remote; returns its folder.

        A full hash works without any local index (a clean workspace with only the remote); a
        prefix or ``None`` needs the index.
        """
        check_dataset_name(name)
        if version is None or len(version) < 32:
            version = self.get(name, version).version
        self.init()
        target = self.repo / "datasets" / name
        if self.checked_out(name) != version and target.exists():
            shutil.rmtree(target)
        pointer = {"outs": [{"md5": f"{version}.dir", "hash": "md5", "path": name}]}
        self._pointer(name).write_text(yaml.safe_dump(pointer, sort_keys=False))
        self._dvc("pull", "-q", f"datasets/{name}.dvc")
        return target

    def path(self, name: str) -> Path:
        return self.repo / "datasets" / check_dataset_name(name)
