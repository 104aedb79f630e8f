"""The live ``fer serve`` of a workspace: its state file, and reconciling Triton with the repository.

``fer serve`` writes ``<repository parent>/serve.json`` (mode 0600, atomic) with its pid, its
``tritonserver``'s pid and ports, and the alerts of its reconciliation loop; it removes the file when
it stops. :func:`find_live` is how ``fer promote``, ``fer rollback`` and ``fer models`` find the
server they must act on instead of starting a private one. A server counts as *this workspace's*
only when the recorded ``fer serve`` process is alive and the recorded ``tritonserver`` process
itself holds the listening gRPC socket (so a stale file, or another server that took the port, is
never mistaken for it).

:func:`reconcile` compares what Triton reports (its repository index and the ensemble configs it
loaded) with the repository's files and reloads what differs: a model unloaded behind the
platform's back is loaded again, a version the repository does not serve is dropped, an ensemble
pinned to another version is reloaded from the repository. It never follows the registry's
``champion`` alias on its own: aliases can be moved over MLflow's REST API without any gate, so a
disagreement is reported as an alert, and only a gated promotion (or its journal) changes what is served.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from serving.repository import ModelRepository
from serving.server import ServingError, TritonEndpoint, _listens_on, _pid_alive, control_key

__all__ = ["LiveServer", "STATE_FILE", "write_live", "clear_live", "find_live", "reconcile", "add_alerts"]

STATE_FILE = "serve.json"
MAX_ALERTS = 20


@dataclass(frozen=True)
class LiveServer:
    """What ``fer serve`` records about itself."""

    pid: int
    triton_pid: int
    host: str
    grpc_port: int
    http_port: int  # 0 when HTTP is off
    metrics_port: int
    repository: str
    started: float
    alerts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def endpoint(self) -> TritonEndpoint:
        """A keyed gRPC endpoint of this server."""
        return TritonEndpoint(self.grpc_url, "grpc", key=control_key(Path(self.repository).parent))


def _state_path(repository: ModelRepository) -> Path:
    return repository.root.parent / STATE_FILE


def write_live(repository: ModelRepository, server, alerts: tuple[str, ...] = ()) -> LiveServer:
    """Record the running :class:`serving.server.EmbeddedTriton` ``server`` as this workspace's."""
    state = LiveServer(os.getpid(), server.process.pid, server.host, server.grpc_port,
                       server.http_port if server.allow_http else 0, server.metrics_port,
                       str(repository.root), time.time(), tuple(alerts[-MAX_ALERTS:]))
    path = _state_path(repository)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(state), handle)
    os.replace(tmp, path)
    return state


def add_alerts(repository: ModelRepository, server, alerts: list[str], new: list[str]) -> None:
    """Append ``new`` alerts (timestamped) and rewrite the state file."""
    stamp = time.strftime("%H:%M:%S")
    alerts.extend(f"{stamp} {a}" for a in new)
    del alerts[:-MAX_ALERTS]
    write_live(repository, server, tuple(alerts))


def clear_live(repository: ModelRepository) -> None:
    """Remove the state file if it is this process's."""
    path = _state_path(repository)
    with contextlib.suppress(OSError, ValueError, KeyError):
        if json.loads(path.read_text())["pid"] == os.getpid():
            path.unlink()


def find_live(repository: ModelRepository) -> tuple[LiveServer | None, str]:
    """``(server, "")`` for the running ``fer serve`` of this repository; ``(None, why)`` otherwise.

    ``why`` is ``""`` when no ``fer serve`` runs (a stale file is removed), or a one-line reason when
    one runs but its Triton cannot be used right now (it is restarting): callers must refuse then.
    """
    path = _state_path(repository)
    try:
        raw = json.loads(path.read_text())
        raw["alerts"] = tuple(raw.get("alerts", ()))
        state = LiveServer(**raw)
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError, TypeError) as exc:
        return None, f"{path} is unreadable ({exc}); if no `fer serve` runs, delete it"
    if not _pid_alive(state.pid):
        with contextlib.suppress(OSError):
            path.unlink()
        return None, ""
    if not _listens_on(state.triton_pid, state.grpc_port):
        return None, (f"`fer serve` (pid {state.pid}) runs but its Triton is not listening on {state.grpc_url} "
                      "(restarting?); nothing was changed, try again in a few seconds")
    return state, ""


def _ensemble_pin(config: Mapping, network: str) -> int | None:
    for step in config.get("ensemble_scheduling", {}).get("step", []):
        if step.get("model_name") == network:
            with contextlib.suppress(TypeError, ValueError):
                return int(step.get("model_version", -1))
    # The fused layout: the one step holds the champion; the ensemble records it as a parameter.
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        return int(config["parameters"]["champion_version"]["string_value"])
    return None


def _reload_from_files(endpoint: TritonEndpoint, repository: ModelRepository, model: str) -> None:
    """Reload ``model`` from its files. Triton keeps a model loaded with an override config when its
    files look unchanged, so the config's mtime is bumped first (content untouched); the loaded
    version keeps answering until the reloaded one is ready."""
    config = repository.root / model / "config.pbtxt"
    with contextlib.suppress(OSError):
        os.utime(config)
    endpoint.load(model)


def reconcile(endpoint: TritonEndpoint, repository: ModelRepository,
              registry_champions: Mapping[str, int | None] | None = None,
              skip: Sequence[str] = ()) -> list[str]:
    """Make Triton serve exactly what the repository says; returns one line per repair or alert.

    ``skip``: networks being promoted right now (their lock is held): left alone this round."""
    messages: list[str] = []
    index = endpoint.index()
    ready: dict[str, set[str]] = {}
    for entry in index:
        if entry.get("state") == "READY":
            ready.setdefault(entry.get("name", ""), set()).add(str(entry.get("version", "")))
    known = set(repository.models())
    for name in sorted(n for n in set(ready) - known if not any(n.startswith(s) for s in skip)):
        messages.append(f"ALERT foreign model {name!r} is loaded but not in the repository: unloading it")
        with contextlib.suppress(ServingError):
            endpoint.unload(name)
    for network in [n for n in repository.networks() if n not in skip]:
        want = {str(v) for v in repository.served_versions(network)}
        have = ready.get(network, set())
        if have != want:
            what = (f"versions {sorted(have)} loaded, repository serves {sorted(want)}" if have
                    else "not loaded")
            if have - want:
                messages.append(f"ALERT {network}: foreign version(s) {sorted(have - want)} served: reloading "
                                "from the repository")
            else:
                messages.append(f"{network}: {what}: reloading")
            try:
                _reload_from_files(endpoint, repository, network)
            except ServingError as exc:
                messages.append(f"ALERT {network}: reload failed: {exc}")
        champion = repository.champion(network)
        for step in repository.step_models(network):
            if step in known and step not in ready:
                messages.append(f"{step}: not loaded: reloading")
                with contextlib.suppress(ServingError):
                    endpoint.load(step)
        ensemble = f"{network}_ensemble"
        if ensemble in known:
            pin = None
            if ensemble in ready:
                with contextlib.suppress(ServingError):
                    pin = _ensemble_pin(endpoint.model_config(ensemble), network)
            if ensemble not in ready or pin != champion:
                reason = "not loaded" if ensemble not in ready else f"pinned to v{pin}, repository says v{champion}"
                messages.append(("" if ensemble not in ready else "ALERT ") + f"{ensemble}: {reason}: reloading")
                try:
                    _reload_from_files(endpoint, repository, ensemble)
                except ServingError as exc:
                    messages.append(f"ALERT {ensemble}: reload failed: {exc}")
        wanted = (registry_champions or {}).get(network)
        if wanted is not None and champion is not None and wanted != champion:
            messages.append(f"ALERT {network}: the registry's champion is v{wanted} but the served (gated) "
                            f"champion is v{champion}; not following an alias no promotion moved")
    return messages
