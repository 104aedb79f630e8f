"""A Triton model repository on S3 (``FER_MODEL_REPOSITORY=s3://bucket/prefix``).

Triton reads ``s3://`` repositories itself (its S3 filesystem; credentials from ``AWS_ACCESS_KEY_ID``
/ ``AWS_SECRET_ACCESS_KEY``, region from ``AWS_DEFAULT_REGION``). The platform still writes the
repository as a local folder, because its writes rely on ``os.rename`` / ``os.replace`` (a version
or config appears whole or not at all, see :mod:`serving.repository`), which object stores do not
offer. So the workspace keeps the *working copy* (``$FER_HOME/triton/models``) and
:class:`S3Mirror` publishes it before Triton is pointed at it or asked to (re)load a model:

1. upload what is new or changed (compared by MD5 = the ETag of a single-part upload), version
   folders first and ``config.pbtxt`` files last, so a config never names a version file that is
   not there yet;
2. delete the objects the working copy no longer has (removed versions, models).

Triton in explicit model-control mode reads the repository only when it loads a model, and every
load the platform makes goes through :meth:`serving.server.TritonEndpoint.load`, which publishes
first (``before_load``); a Triton never sees a half-published state of a model it is loading.
Ambiguity: a concurrent reader of the bucket (another Triton polling it) can see a partial
publish between steps 1 and 2; the platform runs Triton with ``--model-control-mode=explicit``.

Triton's own URL for a non-AWS endpoint (MinIO, moto, ...) is ``s3://http://host:port/bucket/prefix``
(:func:`triton_location`); boto3 gets the endpoint as ``endpoint_url`` (``FER_S3_ENDPOINT_URL``).
Hidden entries (``.deployment.json``, staging and trash folders) stay local: they are the
platform's state, not Triton's. An empty folder (an ensemble's version folder) becomes an empty
``folder/`` object, because S3 has no folders and Triton needs the version to exist.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

CONFIG_FILE = "config.pbtxt"
_EMPTY_MD5 = hashlib.md5(b"", usedforsecurity=False).hexdigest()


def split_location(location: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → ``("bucket", "prefix")`` (prefix without slashes at the ends)."""
    parts = urlsplit(location)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"model repository {location!r} is not an s3://bucket/prefix location")
    return parts.netloc, parts.path.strip("/")


def triton_location(location: str, endpoint_url: str = "") -> str:
    """The ``--model-repository`` value Triton understands for ``location``: a local path as it is,
    ``s3://bucket/prefix`` on AWS, ``s3://http://host:port/bucket/prefix`` on another S3 endpoint."""
    if urlsplit(location).scheme != "s3":
        return location
    if not endpoint_url:
        return location
    bucket, prefix = split_location(location)
    endpoint = urlsplit(endpoint_url)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    return f"s3://{endpoint.scheme}://{endpoint.hostname}:{port}/{bucket}" + (f"/{prefix}" if prefix else "")


def _md5(path: Path) -> str:
    if path.is_dir():  # a folder marker: an empty object
        return _EMPTY_MD5
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PublishReport:
    uploaded: tuple[str, ...]
    deleted: tuple[str, ...]
    unchanged: int


class S3Mirror:
    """Publishes a local repository folder to ``s3://bucket/prefix`` (see the module docstring)."""

    def __init__(self, root: str | Path, location: str, endpoint_url: str = "") -> None:
        self.root = Path(root).resolve()
        self.location = location
        self.bucket, self.prefix = split_location(location)
        self.endpoint_url = endpoint_url
        self._client = None

    @property
    def triton_location(self) -> str:
        return triton_location(self.location, self.endpoint_url)

    def _s3(self):
        if self._client is None:
            try:
                import boto3
            except ImportError:  # pragma: no cover - boto3 is in the platform's deploy requirements
                raise RuntimeError("an s3:// model repository needs boto3 (pip install boto3)") from None
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url or None)
        return self._client

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def local_files(self) -> dict[str, Path]:
        """Relative POSIX path → file, for every file Triton may read (no hidden entries). An empty
        folder (an ensemble's version folder) is a ``"folder/"`` key: S3 has no folders, and Triton
        needs the version folder to exist."""
        if not self.root.is_dir():
            return {}
        files = {}
        for path in self.root.rglob("*"):
            relative = path.relative_to(self.root)
            if any(part.startswith(".") for part in relative.parts):
                continue
            if path.is_file():
                files[relative.as_posix()] = path
            elif path.is_dir() and not any(path.iterdir()):
                files[relative.as_posix() + "/"] = path
        return files

    def remote_etags(self) -> dict[str, str]:
        """Relative key → ETag (MD5 for single-part uploads) of the objects under the prefix."""
        start = f"{self.prefix}/" if self.prefix else ""
        out = {}
        for page in self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(start):]] = obj["ETag"].strip('"')
        return out

    def publish(self) -> PublishReport:
        """Make the bucket's prefix equal to the working copy (uploads first, configs last, then deletes)."""
        local, remote = self.local_files(), self.remote_etags()
        changed = [rel for rel, path in local.items() if remote.get(rel) != _md5(path)]
        # Version files before labels and configs: a config must never name what is not uploaded yet.
        changed.sort(key=lambda rel: (rel.endswith(CONFIG_FILE), rel.count("/") == 1, rel))
        client = self._s3()
        for rel in changed:
            if local[rel].is_dir():
                client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=b"")
                continue
            with open(local[rel], "rb") as body:  # put_object: single part, so the ETag is the MD5
                client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=body)
        stale = sorted(set(remote) - set(local))
        for start in range(0, len(stale), 1000):  # delete_objects takes at most 1000 keys
            batch = stale[start:start + 1000]
            client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": self._key(r)} for r in batch],
                                                               "Quiet": True})
        return PublishReport(tuple(changed), tuple(stale), len(local) - len(changed))

    def __repr__(self) -> str:
        return f"S3Mirror({str(self.root)!r} -> {self.location!r})"
