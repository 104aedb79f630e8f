"""Model versions in the MLflow Model Registry: one registered model ``fer-<network>`` per network.

Aliases, not the deprecated stages: ``champion`` (what Triton serves), ``challenger`` (a candidate),
``previous`` (the champion before the last promotion, for ``fer rollback``). Every version carries
tags that trace it: data version, git commit, recipe fingerprint, ONNX parity and key metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from registry.tracking import setup_tracking
from fer_platform.workspace import Workspace

ALIASES = ("champion", "challenger", "previous")
PREFIX = "fer-"


def registered_name(network: str) -> str:
    return f"{PREFIX}{network}"


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a network."""

    network: str
    version: int
    run_id: str
    source: str
    aliases: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{registered_name(self.network)}/{self.version}"


def _client(workspace: Workspace) -> MlflowClient:
    setup_tracking(workspace)
    return MlflowClient()


def _to_version(network: str, mv) -> ModelVersion:
    return ModelVersion(network=network, version=int(mv.version), run_id=mv.run_id or "", source=mv.source,
                        aliases=tuple(sorted(getattr(mv, "aliases", []) or [])), tags=dict(mv.tags or {}))


def register(network: str, model_uri: str, run_id: str, tags: Mapping[str, str],
             workspace: Workspace) -> ModelVersion:
    """Register ``model_uri`` (a logged model) as a new version of ``fer-<network>`` with ``tags``."""
    client = _client(workspace)
    name = registered_name(network)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"FER platform network {network!r}")
    # A logged model's URI (models:/m-<id>) must come with its model_id: an MLflow server refuses the
    # source otherwise (INVALID_PARAMETER_VALUE "must identify the resource that contains the source").
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id,
                                     tags={k: str(v) for k, v in tags.items()})
    return get_version(network, int(mv.version), workspace)


def get_version(network: str, version: int, workspace: Workspace) -> ModelVersion:
    client = _client(workspace)
    try:
        mv = client.get_model_version(registered_name(network), str(version))
    except MlflowException as exc:
        raise ValueError(f"{registered_name(network)} has no version {version}") from exc
    return _to_version(network, mv)


def get_alias(network: str, alias: str, workspace: Workspace) -> ModelVersion | None:
    """The version holding ``alias``, or None."""
    if alias not in ALIASES:
        raise ValueError(f"alias must be one of {ALIASES}, got {alias!r}")
    client = _client(workspace)
    try:
        mv = client.get_model_version_by_alias(registered_name(network), alias)
    except MlflowException:
        return None
    return _to_version(network, mv)


def set_alias(network: str, alias: str, version: int | None, workspace: Workspace) -> None:
    """Point ``alias`` at ``version`` (None removes it)."""
    if alias not in ALIASES:
        raise ValueError(f"alias must be one of {ALIASES}, got {alias!r}")
    client = _client(workspace)
    name = registered_name(network)
    if version is None:
        try:
            client.delete_registered_model_alias(name, alias)
        except MlflowException:
            pass
    else:
        client.set_registered_model_alias(name, alias, str(version))


def set_version_tags(network: str, version: int, tags: Mapping[str, str], workspace: Workspace) -> ModelVersion:
    """Add ``tags`` to a registered version and return it as it is now."""
    client = _client(workspace)
    for key, value in tags.items():
        client.set_model_version_tag(registered_name(network), str(version), key, str(value))
    return get_version(network, version, workspace)


def list_versions(network: str, workspace: Workspace) -> list[ModelVersion]:
    """All versions of a network, oldest first."""
    client = _client(workspace)
    name = registered_name(network)
    found = client.search_model_versions(f"name='{name}'")
    # search results carry no aliases; the registered model has the alias -> version map
    try:
        alias_map = dict(client.get_registered_model(name).aliases or {})
    except MlflowException:
        alias_map = {}
    by_version: dict[int, list[str]] = {}
    for alias, version in alias_map.items():
        by_version.setdefault(int(version), []).append(alias)
    versions = []
    for mv in found:
        v = _to_version(network, mv)
        versions.append(ModelVersion(v.network, v.version, v.run_id, v.source,
                                     tuple(sorted(by_version.get(v.version, []))), v.tags))
    return sorted(versions, key=lambda v: v.version)


def parse_model_uri(uri: str) -> tuple[str, int | None, str | None]:
    """``models:/fer-<network>/<version>`` or ``models:/fer-<network>@<alias>`` -> (network, version, alias)."""
    body = uri.removeprefix("models:/")
    if body == uri or not body.startswith(PREFIX):
        raise ValueError(f"{uri!r} is not a platform model URI (models:/{PREFIX}<network>/<version> or @<alias>)")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name.removeprefix(PREFIX), None, alias
    name, _, version = body.partition("/")
    if not version.isdigit():
        raise ValueError(f"{uri!r}: the version must be a number (or use @<alias>)")
    return name.removeprefix(PREFIX), int(version), None


def checkpoint_for(uri: str, workspace: Workspace) -> Path:
    """The training checkpoint (``best.pt``) of a registered version, downloaded once into the workspace.

    Used to initialise one network from another by model version (the micro network's pre-trained
    magnifier): fer_core takes the local file, this resolves the URI."""
    import mlflow

    network, version, alias = parse_model_uri(uri)
    mv = get_alias(network, alias, workspace) if alias else get_version(network, version, workspace)
    if mv is None:
        raise ValueError(f"{registered_name(network)} has no version with alias {alias!r}; "
                         f"train and register `{network}` first")
    target = workspace.runs / "_registered" / f"{network}-v{mv.version}"
    path = target / "checkpoint" / "best.pt"
    if not path.is_file():
        target.mkdir(parents=True, exist_ok=True)
        try:
            mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="checkpoint", dst_path=str(target))
        except MlflowException as exc:
            raise ValueError(f"{mv.uri}: its run {mv.run_id} has no checkpoint artifact") from exc
    if not path.is_file():
        raise ValueError(f"{mv.uri}: its run {mv.run_id} logged no checkpoint/best.pt")
    return path


def list_networks(workspace: Workspace) -> list[str]:
    """Networks that have a registered model."""
    client = _client(workspace)
    return sorted(m.name.removeprefix(PREFIX) for m in client.search_registered_models()
                  if m.name.startswith(PREFIX))
