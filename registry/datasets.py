"""Dataset versions with DVC in a git-backed data repository: every version is a git commit and tag.

A version of a dataset is DVC's content hash of its prepared folder (the ``md5`` of the ``.dir``
object), so adding the same data twice yields the same version, and the hash alone is enough to
restore the data from the remote. Each version is the git tag ``<name>@<md5>`` on the commit that
holds its ``datasets/<name>.dvc`` pointer (written by ``dvc add``); the annotated tag's message is
the version's metadata (JSON: counts, source, lineage ``parent``, creation time). DVC's own clients
therefore work on it from any folder::

    dvc get  <workspace>/data datasets/fer --rev fer@<md5>
    dvc import <workspace>/data datasets/fer --rev fer@<md5>
    dvc.api.open("datasets/fer/card.json", repo="<workspace>/data", rev="fer@<md5>")

Layout inside the workspace (``Workspace.dvc_repo``)::

    data/.git/                      the version index (commits + tags)
    data/.dvc/config                DVC settings (committed; no remote: that is per machine)
    data/.dvc/config.local          the default remote, written from the settings at every use;
                                    a local path is stored relative to .dvc/, so a moved or
                                    copied workspace keeps using its own remote
    data/datasets/<name>.dvc        DVC pointer of the checked-out version (committed)
    data/datasets/<name>/           working copy of the checked-out version (git-ignored)
    data/staging/                   adapters write here before the gate (git-ignored, cleaned)
    data/.pending/<name>            journal of an add/pull in progress (git-ignored)

Checked out = the pointer in git ``HEAD``. An add or pull changes the working copy first and moves
``HEAD`` (one ``git commit``) last, so a crash (``kill -9`` mid ``dvc add``) leaves a journal; the
next operation on the name puts the pointer and folder back to ``HEAD``'s version from the cache.
A per-name lock serialises operations on one dataset, a repository lock the git/DVC steps.

Choices: the index lives in the data repository's git, not in the DVC remote; a workspace whose
``data/`` was deleted can still restore a version by its full hash from the remote (the pointer is
then rebuilt from the hash and the version re-tagged from its card).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml
from filelock import FileLock, Timeout

from fer_core.atomic import atomic_write_text
from fer_core.data.manifest import read_card
from fer_platform.workspace import Workspace

REMOTE_ENV = "FER_DVC_REMOTE"
REMOTE_NAME = "storage"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_FULL_HASH = re.compile(r"[0-9a-f]{32}")
# How long an operation waits for another one on the same dataset (or repository) to finish.
LOCK_TIMEOUT_S = 900.0
_GIT_IDENTITY = {"GIT_AUTHOR_NAME": "fer", "GIT_AUTHOR_EMAIL": "fer@localhost",
                 "GIT_COMMITTER_NAME": "fer", "GIT_COMMITTER_EMAIL": "fer@localhost"}
_IGNORED = ("/staging/", "/.pending/", "/.dvc-site/", "/.locks/")


class DataVersionError(RuntimeError):
    """DVC or git failed; the message carries their own output."""


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

    @property
    def tag(self) -> str:
        """The git tag of this version in the data repository (``dvc get --rev <tag>``)."""
        return self.ref


def check_dataset_name(name: str) -> str:
    if not name or not set(name) <= _NAME_CHARS or name[0] in "._-" or ".." in name or name.endswith(".lock"):
        raise ValueError(
            f"dataset name {name!r} must be lower-case letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name@version`` (version may be a unique prefix) or ``name`` (latest)."""
    name, _, version = ref.partition("@")
    return check_dataset_name(name), (version or None)


def content_version(folder: Path) -> str:
    """The version ``folder`` would get: DVC's own md5 of the directory, computed without storing it."""
    import tempfile

    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(Path(folder).resolve()), fs, "md5", dry_run=True)
    return str(obj.hash_info.value).removesuffix(".dir")


_LOCKS: dict[str, FileLock] = {}


def _file_lock(path: Path) -> FileLock:
    """One FileLock per path and process, so nested ``with`` blocks re-enter instead of deadlocking."""
    key = str(path)
    if key not in _LOCKS:
        path.parent.mkdir(parents=True, exist_ok=True)
        _LOCKS[key] = FileLock(key, timeout=LOCK_TIMEOUT_S, thread_local=False)
    return _LOCKS[key]


class DatasetStore:
    """The workspace's git + DVC dataset store."""

    def __init__(self, workspace: Workspace, remote_url: str | None = None) -> None:
        settings = workspace.settings  # FER_DVC_REMOTE / $FER_CONFIG; credentials stay in the environment
        self.workspace = workspace
        self.repo = self.workspace.dvc_repo
        configured = settings.dvc_remote if settings.is_set("dvc_remote") else None
        self.remote_url = remote_url or configured or str(self.workspace.dvc_remote)
        self.s3_endpoint_url = settings.s3_endpoint_url

    # -- locks --------------------------------------------------------------------------------
    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the per-dataset lock (re-entrant in this process): one add or pull per name at a time."""
        lock = _file_lock(self.workspace.root / "locks" / f"dataset-{check_dataset_name(name)}.lock")
        try:
            with lock:
                yield
        except Timeout:
            raise DataVersionError(
                f"dataset {name!r} is busy: another `fer data` command holds {lock.lock_file} "
                f"for over {LOCK_TIMEOUT_S:.0f}s"
            ) from None

    @contextmanager
    def _repo_lock(self) -> Iterator[None]:
        lock = _file_lock(self.workspace.root / "locks" / "data-repository.lock")
        try:
            with lock:
                yield
        except Timeout:
            raise DataVersionError(f"the data repository is busy ({lock.lock_file})") from None

    # -- git / DVC plumbing -------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        return {**os.environ, **_GIT_IDENTITY, "DVC_NO_ANALYTICS": "1",
                "DVC_SITE_CACHE_DIR": str(self.repo / ".dvc-site")}

    def _run(self, cmd: list[str], what: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=self.repo, capture_output=True, text=True, env=self._env())
        if check and proc.returncode != 0:
            reason = (proc.stderr or proc.stdout).strip().splitlines()
            reason = [line for line in reason if line.strip()] or [f"exit code {proc.returncode}"]
            raise DataVersionError(f"`{what}` failed: {reason[0] if len(reason) == 1 else ' '.join(reason[:3])}")
        return proc

    def _dvc(self, *args: str, check: bool = True) -> str:
        exe = Path(sys.executable).with_name("dvc")
        return self._run([str(exe) if exe.exists() else "dvc", *args], f"dvc {' '.join(args)}", check).stdout

    def _git(self, *args: str, check: bool = True) -> str:
        return self._run(["git", *args], f"git {' '.join(args)}", check).stdout

    def init(self) -> None:
        """Create the git + DVC repository (idempotent) and point its default remote at ``remote_url``."""
        with self._repo_lock():
            self._init()

    def _init(self) -> None:
        self.repo.mkdir(parents=True, exist_ok=True)
        if not (self.repo / ".git").is_dir():
            self._git("init", "-q", "-b", "main")
        if not (self.repo / ".dvc" / "config").is_file():
            self._dvc("init", "-q", "--force")
            self._dvc("config", "core.analytics", "false")
            self._dvc("config", "core.autostage", "false")
            (self.repo / "datasets").mkdir(exist_ok=True)
            atomic_write_text(self.repo / ".gitignore", "".join(f"{p}\n" for p in _IGNORED))
            self._git("add", ".gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore")
            self._git("commit", "-q", "--no-verify", "-m", "data repository (git + DVC)")
        self._configure_remote()
        (self.repo / "datasets").mkdir(exist_ok=True)
        (self.repo / "staging").mkdir(exist_ok=True)

    def _configure_remote(self) -> None:
        """Write the default remote from the settings into ``.dvc/config.local`` (only when it changed).

        A local remote is written relative to ``.dvc/`` (DVC resolves it from there), so copying or
        moving the workspace together with its remote keeps pushing into the copy's own remote.
        """
        remote = self.remote_url
        if "://" not in remote:
            Path(remote).mkdir(parents=True, exist_ok=True)
            remote = os.path.relpath(Path(remote).resolve(), (self.repo / ".dvc").resolve())
        lines = ["[core]", f"    remote = {REMOTE_NAME}", f"['remote \"{REMOTE_NAME}\"']", f"    url = {remote}"]
        if remote.startswith("s3://") and self.s3_endpoint_url:  # MinIO or another S3-compatible store
            lines.append(f"    endpointurl = {self.s3_endpoint_url}")
        text = "\n".join(lines) + "\n"
        path = self.repo / ".dvc" / "config.local"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)

    def _pointer(self, name: str) -> Path:
        return self.repo / "datasets" / f"{name}.dvc"

    def _journal(self, name: str) -> Path:
        return self.repo / ".pending" / name

    def _head_pointer(self, name: str) -> str | None:
        proc = self._run(["git", "show", f"HEAD:datasets/{name}.dvc"], "git show", check=False)
        return proc.stdout if proc.returncode == 0 else None

    def _begin(self, name: str, op: str, version: str = "") -> None:
        atomic_write_text(self._journal(name), json.dumps({"op": op, "version": version, "pid": os.getpid()}) + "\n")

    def _end(self, name: str) -> None:
        self._journal(name).unlink(missing_ok=True)

    def _recover(self, name: str) -> None:
        """Undo an add or pull that died midway: pointer and folder back to ``HEAD``'s version.

        Caller holds the name and repository locks. The cache holds every committed version (it is
        written before the commit), so the checkout needs no remote.
        """
        if not self._journal(name).is_file():
            return
        target, pointer = self.repo / "datasets" / name, self._pointer(name)
        committed = self._head_pointer(name)
        if target.exists():
            shutil.rmtree(target)
        if committed is None:
            pointer.unlink(missing_ok=True)
        else:
            atomic_write_text(pointer, committed)
            self._dvc("checkout", "-q", "--force", f"datasets/{name}.dvc")
        self._end(name)

    def _restore_pointer(self, name: str) -> None:
        committed = self._head_pointer(name)
        if committed is None:
            self._pointer(name).unlink(missing_ok=True)
        else:
            atomic_write_text(self._pointer(name), committed)

    def recover(self, name: str) -> None:
        """Finish off (roll back) an interrupted add or pull of ``name``; a no-op when none was."""
        with self.lock(name), self._repo_lock():
            self._init()
            self._recover(name)

    def staging(self, name: str) -> Path:
        """A clean staging folder for ``name``'s next candidate (leftovers of crashed adds removed).

        Hold :meth:`lock` while using it.
        """
        folder = self.repo / "staging" / check_dataset_name(name)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder

    # -- version index (git tags) ---------------------------------------------------------------
    def _tags(self, name: str | None) -> dict[str, dict[str, Any]]:
        if not (self.repo / ".git").is_dir():
            return {}
        pattern = f"refs/tags/{name}@*" if name else "refs/tags/"
        out = self._git("for-each-ref", "--format=%(refname:strip=2)%00%(contents)%00", pattern)
        tags: dict[str, dict[str, Any]] = {}
        parts = out.split("\0")
        for tag, body in zip(parts[0::2], parts[1::2]):
            tag = tag.strip()
            if "@" not in tag:
                continue
            try:
                tags[tag] = json.loads(body)
            except json.JSONDecodeError:
                continue  # a tag someone else made by hand is not a dataset version
        return tags

    def _tag(self, version: DatasetVersion) -> None:
        self._git("tag", "-a", version.tag, "-m", json.dumps(asdict(version), indent=2))

    def _commit_pointer(self, name: str, message: str) -> None:
        """Move ``HEAD`` to the working pointer of ``name`` (no commit when it is already there)."""
        paths = [f"datasets/{name}.dvc", "datasets/.gitignore"]
        self._git("add", "--", *[p for p in paths if (self.repo / p).is_file()])
        if self._run(["git", "diff", "--cached", "--quiet"], "git diff", check=False).returncode != 0:
            self._git("commit", "-q", "--no-verify", "-m", message)

    # -- public API ---------------------------------------------------------------------------
    def add(self, name: str, prepared: Path, *, source: str = "", parent: str = "",
            extra: Mapping[str, Any] | None = None, push: bool = True) -> DatasetVersion:
        """Version a prepared (already validated) dataset folder under ``name``; push it unless ``push=False``.

        ``prepared`` is moved into the store's working copy. Returns the version; adding identical
        content again returns the same version. ``push=False`` leaves the upload to :meth:`push`
        (so an orchestrator can retry the network part alone). The version is committed and tagged
        after its data is in the cache (and pushed, when pushing): nothing half-added is listed.
        """
        check_dataset_name(name)
        prepared = Path(prepared)
        card = read_card(prepared)
        with self.lock(name), self._repo_lock():
            self._init()
            self._recover(name)
            target = self.repo / "datasets" / name
            self._begin(name, "add")
            if target.exists():
                shutil.rmtree(target)  # the checked-out version is committed, so its data is in the cache
            shutil.move(str(prepared), str(target))
            self._dvc("add", "-q", f"datasets/{name}")
            out = yaml.safe_load(self._pointer(name).read_text())["outs"][0]
            md5 = str(out["md5"]).removesuffix(".dir")
            if push:
                self._push(name)
            known = self._tags(name).get(f"{name}@{md5}")
            if known is None:
                version = DatasetVersion(
                    name=name, version=md5, task=card.task, source_format=card.source_format,
                    num_samples=card.num_samples, size_bytes=int(out.get("size", 0)),
                    num_files=int(out.get("nfiles", 0)), created_at=_now(), source=source,
                    parent=parent, extra=dict(extra or {}),
                )
                self._commit_pointer(name, f"add {version.ref}")
                self._tag(version)
            else:  # same data again: same version, keep its first creation time
                version = DatasetVersion(**known)
                self._commit_pointer(name, f"check out {version.ref}")
            self._end(name)
        return version

    def push(self, name: str) -> None:
        """Upload the checked-out version of ``name`` to the remote (idempotent)."""
        with self.lock(name), self._repo_lock():
            self._init()
            self._recover(name)
            self._push(name)

    def _push(self, name: str) -> None:
        self._dvc("push", "-q", f"datasets/{check_dataset_name(name)}.dvc")

    def list(self, name: str | None = None) -> list[DatasetVersion]:
        """All known versions (of one dataset, or of all), oldest first."""
        if name is not None:
            check_dataset_name(name)
        versions = [DatasetVersion(**meta) for meta in self._tags(name).values()]
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
                f"{'ambiguous' if hits else 'unknown'} version {version!r} of {name!r}; known: {known}; "
                "nothing changed"
            )
        return hits[0]

    def checked_out(self, name: str) -> str | None:
        """The version currently in the working copy, if any (``HEAD``'s, while an operation is pending)."""
        check_dataset_name(name)
        if not (self.repo / "datasets" / name).is_dir():
            return None
        if self._journal(name).is_file():
            text = self._head_pointer(name)
        else:
            pointer = self._pointer(name)
            text = pointer.read_text() if pointer.is_file() else None
        if not text:
            return None
        return str(yaml.safe_load(text)["outs"][0]["md5"]).removesuffix(".dir")

    def pull(self, name: str, version: str | None = None) -> Path:
        """Restore ``name@version`` into the working copy from the cache or the remote; returns its folder.

        A full hash works without the index (e.g. a workspace whose ``data/`` was lost: only the
        remote survives); a prefix or ``None`` needs it. An unknown version, or one the remote does
        not hold, raises ``ValueError`` and leaves the checked-out data as it was.
        """
        check_dataset_name(name)
        with self.lock(name), self._repo_lock():
            self._init()
            self._recover(name)
            tags = self._tags(name)
            if version is None or not _FULL_HASH.fullmatch(version):
                version = self.get(name, version).version
            meta = tags.get(f"{name}@{version}")
            if meta is not None:
                pointer_text = self._git("show", f"{name}@{version}:datasets/{name}.dvc")
            else:  # restore by hash alone: DVC's pointer for a directory output of that hash
                pointer_text = yaml.safe_dump(
                    {"outs": [{"md5": f"{version}.dir", "hash": "md5", "path": name}]}, sort_keys=False
                )
            self._begin(name, "pull", version)
            atomic_write_text(self._pointer(name), pointer_text)
            try:
                # Into the cache first: a version the remote lacks fails here, before the working copy moves.
                self._dvc("fetch", "-q", f"datasets/{name}.dvc")
                # dvc fetch exits 0 for an object the remote lacks: check the cache holds it.
                if not (self.repo / ".dvc" / "cache" / "files" / "md5" / version[:2] / f"{version[2:]}.dir").is_file():
                    raise DataVersionError(f"the remote has no object {version}.dir")
            except DataVersionError as exc:
                self._restore_pointer(name)  # the folder was not touched yet
                self._end(name)
                if meta is None:
                    raise ValueError(
                        f"unknown version {version!r} of {name!r}: not in the index and not in the remote; "
                        "nothing changed"
                    ) from None
                raise DataVersionError(f"cannot fetch {name}@{version[:12]}; nothing changed: {exc}") from None
            self._dvc("checkout", "-q", "--force", f"datasets/{name}.dvc")
            target = self.repo / "datasets" / name
            self._ensure_gitignored(name)
            self._commit_pointer(name, f"check out {name}@{version}")
            if meta is None:  # re-index a version restored by hash
                card = read_card(target)
                out = yaml.safe_load(pointer_text)["outs"][0]
                files = [p for p in target.rglob("*") if p.is_file()]
                self._tag(DatasetVersion(
                    name=name, version=version, task=card.task, source_format=card.source_format,
                    num_samples=card.num_samples, size_bytes=int(out.get("size") or sum(p.stat().st_size for p in files)),
                    num_files=int(out.get("nfiles") or len(files)), created_at=_now(),
                    extra={"restored_by_hash": True},
                ))
            self._end(name)
        return target

    def _ensure_gitignored(self, name: str) -> None:
        ignore = self.repo / "datasets" / ".gitignore"
        lines = ignore.read_text().splitlines() if ignore.is_file() else []
        if f"/{name}" not in lines:
            atomic_write_text(ignore, "\n".join([*lines, f"/{name}"]) + "\n")

    def path(self, name: str) -> Path:
        return self.repo / "datasets" / check_dataset_name(name)


def _now() -> str:
    """UTC with microseconds: versions added within one second still sort in creation order."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
