"""Gated promotion of a registered version into Triton, rollback, and what is served where.

A promotion of ``network`` to version N, under a per-network lock (a second concurrent promotion or
rollback of the same network is refused with :class:`PromotionBusy`):

1. registry gates, read from the version's tags: ``data_gate`` (its training data passed the data
   gate), ``onnx_parity`` (ONNX Runtime matched PyTorch) and ``metric_vs_champion`` (its primary
   metric is not worse than the champion's by more than a margin; the first version must reach a
   floor). Any failure stops here, before the repository is touched.
2. N's ONNX file (the training run's ``onnx/model.onnx``) is installed atomically as
   ``<network>/<N>/model.onnx`` and served *beside* the current champion, which keeps answering
   through the ensemble.
3. Triton gates on version N itself: ``triton_smoke`` (the held-out samples of the version's smoke
   set go through Triton; outputs must match PyTorch's within ``atol`` and labels agree) and
   ``latency_p95`` (p95 of single-sample requests within the budget).
4. Only then the ensemble is switched to N (:meth:`ModelRepository.set_champion`), aliases move
   (``previous`` ← old champion, ``champion`` ← N, ``challenger`` dropped if it was N) and the
   served and on-disk versions are trimmed by the :class:`RetentionPolicy`.

A refusal at step 3 (or a failed switch) restores the repository files byte for byte (the new
version folder is removed, configs are rewritten as they were) and reloads what changed, so
aliases, repository and the served model are exactly as before. :func:`rollback` makes
``previous`` the champion again (reinstalling its ONNX from the registry if its folder is gone).

The ensemble switch and the alias moves are one recoverable operation: a journal written just
before the switch is replayed by the next promote/rollback (and ``fer serve`` at start) when a
process dies in between (:func:`replay_journal`). Model control on the server needs the
repository's control key (:func:`serving.server.control_key`); a URL given as ``triton`` gets it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from fer_core.workspace import Workspace
from registry import models as reg
from registry.export import ONNX_ARTIFACT, SMOKE_ARTIFACT
from serving.repository import ModelRepository, atomic_write_bytes
from serving.server import ServingError, TritonEndpoint, control_key

__all__ = ["PromotionGates", "RetentionPolicy", "GateResult", "PromotionResult", "RollbackResult",
           "NetworkStatus", "PromotionBusy", "promotion_lock", "registry_gates", "promote", "rollback",
           "models", "replay_journal"]

_NETWORK_NAME = re.compile(r"[a-z][a-z0-9_]*")
GATE_NAMES = ("data_gate", "onnx_parity", "metric_vs_champion", "triton_smoke", "latency_p95")


class PromotionBusy(RuntimeError):
    """Another promotion or rollback of the same network holds its lock."""


@dataclass(frozen=True)
class PromotionGates:
    """Thresholds of a promotion.

    ``margin``: how much worse than the champion's primary metric the candidate may be.
    ``floor``: the primary metric the first version (no champion) must reach.
    ``latency_budget_ms``: the p95 of single-sample requests on the new version must stay under it.
    ``smoke_samples``: held-out samples sent through Triton; ``latency_requests``: requests timed.
    ``atol``: Triton vs PyTorch tolerance of the smoke test.
    """

    margin: float = 0.02
    floor: float = 0.2
    latency_budget_ms: float = 100.0
    smoke_samples: int = 16
    latency_requests: int = 50
    atol: float = 1e-4

    def __post_init__(self) -> None:
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if not self.latency_budget_ms > 0:
            raise ValueError(f"latency_budget_ms must be > 0, got {self.latency_budget_ms}")
        if self.smoke_samples < 1 or self.latency_requests < 1:
            raise ValueError(f"smoke_samples and latency_requests must be >= 1, got "
                             f"{self.smoke_samples} and {self.latency_requests}")
        if not self.atol > 0:
            raise ValueError(f"atol must be > 0, got {self.atol}")


@dataclass(frozen=True)
class RetentionPolicy:
    """What stays after a promotion or rollback: Triton serves the champion (and ``previous`` with
    ``serve_previous``); the disk keeps the champion (and ``previous`` with ``keep_previous_on_disk``,
    so a rollback needs no download). Other version folders are deleted."""

    serve_previous: bool = False
    keep_previous_on_disk: bool = True


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict, with the numbers it was decided on."""

    name: str
    passed: bool
    detail: str
    numbers: Mapping[str, float] = field(default_factory=dict)

    def line(self) -> str:
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in self.numbers.items())
        return f"{self.name:20s} {'PASS' if self.passed else 'FAIL'}  {self.detail}" + (f" [{numbers}]" if numbers else "")


@dataclass(frozen=True)
class PromotionResult:
    """Outcome of :func:`promote`; ``promoted`` is False when any gate refused (nothing changed then)."""

    network: str
    version: int
    promoted: bool
    champion_before: int | None
    gates: tuple[GateResult, ...]
    seconds: float
    served_versions: tuple[int, ...] = ()

    @property
    def failed(self) -> tuple[GateResult, ...]:
        return tuple(g for g in self.gates if not g.passed)

    def summary(self) -> str:
        lines = [g.line() for g in self.gates]
        if self.promoted:
            lines.append(f"promoted {self.network} v{self.version} to champion in {self.seconds:.1f}s "
                         f"(previous: {f'v{self.champion_before}' if self.champion_before else 'none'})")
        else:
            names = ", ".join(g.name for g in self.failed)
            lines.append(f"refused {self.network} v{self.version}: failed {names}; nothing changed "
                         f"(champion: {f'v{self.champion_before}' if self.champion_before else 'none'})")
        return "\n".join(lines)


@dataclass(frozen=True)
class RollbackResult:
    network: str
    champion: int
    demoted: int
    seconds: float


@dataclass(frozen=True)
class NetworkStatus:
    """One network: its registered versions, the repository's files and, with an endpoint, Triton's view."""

    network: str
    versions: tuple[reg.ModelVersion, ...]
    repository_versions: tuple[int, ...] = ()
    repository_served: tuple[int, ...] = ()
    repository_champion: int | None = None
    triton_served: tuple[int, ...] | None = None  # loaded and ready, None without an endpoint
    ensemble_ready: bool | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "network": self.network,
            "versions": [{"version": v.version, "aliases": list(v.aliases), "run_id": v.run_id,
                          "tags": dict(v.tags)} for v in self.versions],
            "repository": {"versions": list(self.repository_versions), "served": list(self.repository_served),
                           "champion": self.repository_champion},
            "triton": None if self.triton_served is None else {"served": list(self.triton_served),
                                                                "ensemble_ready": self.ensemble_ready},
        }


# -- lock ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def promotion_lock(network: str, workspace: Workspace | None = None) -> Iterator[Path]:
    """Hold the network's promotion lock (``<workspace>/locks/promote-<network>.lock``), non-blocking.

    ``flock`` locks belong to the open file, so two threads of one process exclude each other too,
    and the kernel drops the lock of a crashed process.
    """
    if not _NETWORK_NAME.fullmatch(network or ""):
        raise ValueError(f"network name {network!r} must be lower-case letters, digits and _")
    workspace = (workspace or Workspace.from_env()).ensure()
    path = workspace.root / "locks" / f"promote-{network}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise PromotionBusy(f"another promotion or rollback of {network} is in progress ({holder}); "
                                f"nothing was changed, try again when it finishes (lock {path})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


# -- journal -------------------------------------------------------------------------------------
#
# The ensemble switch (repository + Triton) and the alias moves (MLflow) cannot be one transaction.
# Just before the switch, the alias moves it implies are written to
# ``<workspace>/locks/promote-<network>.journal``; they are removed once the aliases moved and the
# old version was retired. A process killed in between leaves the journal, and
# :func:`replay_journal` (run by the next promote/rollback under the lock, and by ``fer serve`` at
# start) finishes the operation if the switch landed (the repository pins the new version) or
# discards it if it did not (the old champion still serves), so registry and Triton agree again.

def _journal_path(network: str, workspace: Workspace) -> Path:
    return workspace.root / "locks" / f"promote-{network}.journal"


def _write_journal(network: str, workspace: Workspace, op: str, champion: int, previous: int | None,
                   drop_challenger: bool) -> Path:
    import json

    path = _journal_path(network, workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"op": op, "network": network, "champion": champion, "previous": previous,
                                         "drop_challenger": drop_challenger, "pid": os.getpid()}).encode())
    return path


def replay_journal(network: str, *, workspace: Workspace | None = None, repository: ModelRepository | None = None,
                   endpoint: TritonEndpoint | None = None, retention: RetentionPolicy | None = None) -> str:
    """Finish or discard an interrupted promotion/rollback of ``network`` (call with its lock held).

    Returns a one-line account ("" when there was no journal). With ``endpoint`` the live Triton is
    brought in line too (the network and its ensemble are reloaded from the repository).
    """
    import json

    workspace = workspace or Workspace.from_env()
    repository = repository or ModelRepository(workspace.triton_repository)
    path = _journal_path(network, workspace)
    if not path.is_file():
        return ""
    try:
        entry = json.loads(path.read_text())
        champion, previous = int(entry["champion"]), entry.get("previous")
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink()
        return f"{network}: discarded an unreadable promotion journal"
    pinned = repository.champion(network) if network in repository.networks() else None
    if pinned == champion:
        reg.set_alias(network, "champion", champion, workspace)
        reg.set_alias(network, "previous", previous, workspace)
        if entry.get("drop_challenger"):
            challenger = reg.get_alias(network, "challenger", workspace)
            if challenger is not None and challenger.version == champion:
                reg.set_alias(network, "challenger", None, workspace)
        outcome = f"{network}: finished an interrupted {entry.get('op', 'promotion')} (champion v{champion})"
    else:
        champion = pinned
        outcome = (f"{network}: discarded an interrupted {entry.get('op', 'promotion')} to v{entry['champion']} "
                   f"(its ensemble switch never landed; champion stays v{pinned})")
    if champion is not None:
        retention = retention or RetentionPolicy()
        serve = [champion] + ([previous] if retention.serve_previous and previous in repository.versions(network)
                              else [])
        repository.set_served_versions(network, serve)
        if endpoint is not None:
            endpoint.load(network)
            endpoint.load(f"{network}_ensemble")
    path.unlink()
    return outcome


# -- registry gates --------------------------------------------------------------------------------

def _float_tag(tags: Mapping[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def registry_gates(candidate: reg.ModelVersion, champion: reg.ModelVersion | None,
                   gates: PromotionGates) -> list[GateResult]:
    """``data_gate``, ``onnx_parity`` and ``metric_vs_champion``, decided from the versions' tags."""
    tags = candidate.tags
    data = tags.get("data_version", "?")
    results = [GateResult("data_gate", tags.get("data_gate") == "passed",
                          f"training data {data} gate: {tags.get('data_gate', 'unknown')}")]
    diff = _float_tag(tags, "parity_max_abs_diff")
    agreement = _float_tag(tags, "parity_label_agreement")
    numbers = {k: v for k, v in (("max_abs_diff", diff), ("label_agreement", agreement)) if v is not None}
    results.append(GateResult("onnx_parity", tags.get("parity_passed") == "true",
                              f"ONNX vs PyTorch parity tag: {tags.get('parity_passed', 'missing')}", numbers))
    metric = tags.get("primary_metric", "")
    value = _float_tag(tags, "primary_metric_value")
    if value is None:
        results.append(GateResult("metric_vs_champion", False, f"v{candidate.version} has no primary metric value"))
    elif champion is None:
        results.append(GateResult("metric_vs_champion", value >= gates.floor,
                                  f"first version: {metric} {value:.4f} vs floor {gates.floor:.4f}",
                                  {"candidate": value, "floor": gates.floor}))
    else:
        champion_value = _float_tag(champion.tags, "primary_metric_value")
        if champion_value is None or champion.tags.get("primary_metric") != metric:
            results.append(GateResult("metric_vs_champion", False,
                                      f"champion v{champion.version} has no {metric or 'primary metric'} to compare"))
        else:
            note = "" if champion.tags.get("data_version") == data else " (different data versions)"
            results.append(GateResult(
                "metric_vs_champion", value >= champion_value - gates.margin,
                f"{metric} {value:.4f} vs champion v{champion.version} {champion_value:.4f} - margin "
                f"{gates.margin:.4f}{note}",
                {"candidate": value, "champion": champion_value, "margin": gates.margin}))
    return results


# -- artifacts -------------------------------------------------------------------------------------

def _download(version: reg.ModelVersion, artifact: str, dst: Path, workspace: Workspace | None) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking

    setup_tracking(workspace)
    try:
        return Path(MlflowClient().download_artifacts(version.run_id, artifact, str(dst)))
    except (MlflowException, OSError) as exc:
        raise ValueError(f"{reg.registered_name(version.network)} v{version.version}: run {version.run_id} has no "
                         f"{artifact} ({exc}); register it with registry.export.export_and_register") from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- Triton gates ----------------------------------------------------------------------------------

def _infer(endpoint: TritonEndpoint, network: str, version: int, input_name: str, batch: np.ndarray,
           outputs: list[str]) -> dict[str, np.ndarray]:
    module = endpoint.module
    tensor = module.InferInput(input_name, list(batch.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    requested = [module.InferRequestedOutput(name) for name in outputs]
    try:
        result = endpoint.client.infer(network, [tensor], model_version=str(version), outputs=requested,
                                       headers=endpoint.headers)
    except Exception as exc:  # noqa: BLE001 -- tritonclient raises InferenceServerException or gRPC errors
        message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
        first_line = (str(message).strip().splitlines() or [type(exc).__name__])[0]
        raise ServingError(f"{network} v{version} at {endpoint.url}: {first_line}") from None
    return {name: result.as_numpy(name) for name in outputs}


def _smoke_gate(endpoint: TritonEndpoint, network: str, version: int, metadata, smoke: Mapping[str, np.ndarray],
                gates: PromotionGates) -> GateResult:
    inputs = smoke["input"][: gates.smoke_samples]
    names = list(metadata.output_names)
    try:
        got: dict[str, list[np.ndarray]] = {n: [] for n in names}
        step = 8  # well under any max_batch_size the repository writes
        for start in range(0, len(inputs), step):
            for name, array in _infer(endpoint, network, version, metadata.input.name,
                                      inputs[start : start + step], names).items():
                got[name].append(array)
    except ServingError as exc:
        return GateResult("triton_smoke", False, str(exc))
    diffs, agree = {}, np.ones(len(inputs), dtype=bool)
    for spec in metadata.outputs:
        expected = smoke[f"output:{spec.name}"][: len(inputs)]
        answer = np.concatenate(got[spec.name])
        if answer.shape != expected.shape:
            return GateResult("triton_smoke", False, f"output {spec.name!r}: Triton shape {answer.shape} != "
                                                     f"PyTorch {expected.shape}")
        diffs[spec.name] = float(np.abs(answer.astype(np.float64) - expected).max())
        if spec.kind in ("logits", "probabilities") and answer.ndim == 2:
            agree &= answer.argmax(1) == expected.argmax(1)
    max_diff, agreement = max(diffs.values()), float(agree.mean())
    passed = max_diff <= gates.atol and bool(agree.all())
    return GateResult("triton_smoke", passed,
                      f"{len(inputs)} held-out samples through Triton v{version}: max |diff| {max_diff:.2e} "
                      f"(atol {gates.atol:.0e}), label agreement {agreement:.3f}",
                      {"max_abs_diff": max_diff, "label_agreement": agreement, "samples": float(len(inputs))})


def _latency_gate(endpoint: TritonEndpoint, network: str, version: int, metadata, sample: np.ndarray,
                  gates: PromotionGates) -> GateResult:
    names = [metadata.primary_output or metadata.outputs[0].name]
    times = []
    try:
        for i in range(gates.latency_requests + 3):
            start = time.perf_counter()
            _infer(endpoint, network, version, metadata.input.name, sample[None], names)
            if i >= 3:  # the first requests warm up the session and the connection
                times.append((time.perf_counter() - start) * 1e3)
    except ServingError as exc:
        return GateResult("latency_p95", False, str(exc))
    p50, p95 = (float(np.percentile(times, q)) for q in (50, 95))
    return GateResult("latency_p95", p95 <= gates.latency_budget_ms,
                      f"{len(times)} single-sample requests: p95 {p95:.2f} ms vs budget {gates.latency_budget_ms:g} ms",
                      {"p50_ms": p50, "p95_ms": p95, "budget_ms": gates.latency_budget_ms})


# -- repository snapshot ---------------------------------------------------------------------------

def _step_models(network: str) -> tuple[str, str, str]:
    return f"{network}_preprocess", f"{network}_postprocess", f"{network}_ensemble"


@dataclass
class _Snapshot:
    """The repository state of one network's four Triton models, to restore after a refusal.

    Small files are kept byte for byte; the network's version folders (ONNX files, large and
    immutable) only by name, since a promotion only ever adds one.
    """

    repository: ModelRepository
    network: str
    files: dict[str, dict[str, bytes] | None]  # model -> {relative path: bytes}, None = model absent
    versions: set[int]
    loaded: dict[str, bool]

    @staticmethod
    def _read(root: Path, model: str, network: str) -> dict[str, bytes] | None:
        folder = root / model
        if not folder.is_dir():
            return None
        entries = folder.iterdir() if model == network else folder.rglob("*")  # ONNX version folders: by name
        return {str(p.relative_to(folder)): p.read_bytes() for p in entries if p.is_file()}

    @classmethod
    def take(cls, repository: ModelRepository, network: str, endpoint: TritonEndpoint) -> "_Snapshot":
        files = {m: cls._read(repository.root, m, network) for m in (network, *_step_models(network))}
        loaded = {m: endpoint.model_ready(m) for m in files}
        return cls(repository, network, files, set(repository.versions(network)), loaded)

    def restore(self, endpoint: TritonEndpoint) -> None:
        """Put every file back as it was, remove what was added, and make Triton load that state."""
        root = self.repository.root
        absent = [m for m, f in self.files.items() if f is None and (root / m).exists()]
        for model in reversed([self.network, *_step_models(self.network)]):  # ensemble first
            if model in absent and endpoint.model_ready(model):
                with contextlib.suppress(ServingError):
                    endpoint.unload(model)
        changed = []
        for model, before in self.files.items():
            folder = root / model
            if before is None:
                if folder.exists():
                    shutil.rmtree(folder)
                continue
            now = self._read(root, model, self.network) or {}
            if now == before and (model != self.network or set(self.repository.versions(model)) == self.versions):
                continue
            changed.append(model)
            for rel, data in before.items():
                if now.get(rel) != data:
                    atomic_write_bytes(folder / rel, data)
            for rel in set(now) - set(before):
                (folder / rel).unlink()
        if self.files[self.network] is not None:  # with its config restored, the added version is unserved
            for version in set(self.repository.versions(self.network)) - self.versions:
                self.repository.remove_version(self.network, version)
        for model in (self.network, *_step_models(self.network)):  # network first, ensemble last
            if model in changed and self.loaded.get(model):
                endpoint.load(model)


# -- promotion -------------------------------------------------------------------------------------

def _endpoint(triton: TritonEndpoint | str, repository: ModelRepository) -> TritonEndpoint:
    """The endpoint to act on; a URL gets the repository's control key (model control is keyed)."""
    endpoint = triton if isinstance(triton, TritonEndpoint) else \
        TritonEndpoint(triton, key=control_key(repository.root.parent))
    if not endpoint.server_live():
        raise ServingError(f"Triton at {endpoint.url} is unreachable")
    return endpoint


def _pick_candidate(network: str, version: int | None, workspace: Workspace | None) -> reg.ModelVersion:
    if version is not None:
        return reg.get_version(network, version, workspace)
    challenger = reg.get_alias(network, "challenger", workspace)
    if challenger is not None:
        return challenger
    versions = reg.list_versions(network, workspace)
    if not versions:
        raise ValueError(f"{reg.registered_name(network)} has no registered versions")
    return versions[-1]


def _install(repository: ModelRepository, candidate: reg.ModelVersion, served: list[int],
             workspace: Workspace | None, tmp: Path) -> None:
    """Put the candidate's ONNX on disk as its registry version and serve it beside ``served``."""
    network, version = candidate.network, candidate.version
    onnx_path = _download(candidate, ONNX_ARTIFACT, tmp, workspace)
    if version in repository.versions(network):
        on_disk = repository.root / network / str(version) / "model.onnx"
        if _sha256(on_disk) != _sha256(onnx_path):
            raise ValueError(f"{on_disk} differs from the registry's v{version} ONNX file: the repository and "
                             "the registry disagree; remove that folder and promote again")
        repository.set_served_versions(network, sorted({*served, version}))
    else:
        repository.write_model(network, version, onnx_path, keep_versions=served)


def _trim(repository: ModelRepository, network: str, champion: int, previous: int | None,
          retention: RetentionPolicy, endpoint: TritonEndpoint) -> None:
    serve = [champion] + ([previous] if retention.serve_previous and previous in repository.versions(network) else [])
    repository.set_served_versions(network, serve)
    endpoint.load(network)  # Triton unloads the versions no longer listed
    keep = set(serve) | ({previous} if retention.keep_previous_on_disk and previous else set())
    for version in repository.versions(network):
        if version not in keep:
            repository.remove_version(network, version)


def _install_check_and_switch(repository: ModelRepository, endpoint: TritonEndpoint, candidate: reg.ModelVersion,
                              smoke: Mapping[str, np.ndarray], gates: PromotionGates, workspace: Workspace | None,
                              tmp: Path, before_switch=lambda: None) -> list[GateResult]:
    """Serve the candidate beside the champion, run the Triton gates and, only if they pass, switch
    the ensemble to it. Returns the gate results; the caller restores the repository on a failure."""
    network, version = candidate.network, candidate.version
    served = repository.served_versions(network) if network in repository.networks() else []
    try:
        _install(repository, candidate, served, workspace, tmp)
        endpoint.load(network)
    except (ServingError, ValueError) as exc:
        return [GateResult("triton_smoke", False, f"installing v{version} failed: {exc}")]
    metadata = repository.metadata(network, version)
    checks = [_smoke_gate(endpoint, network, version, metadata, smoke, gates),
              _latency_gate(endpoint, network, version, metadata, smoke["input"][0], gates)]
    if not all(c.passed for c in checks):
        return checks
    before_switch()
    try:
        repository.set_champion(network, version, endpoint)
    except (ServingError, ValueError) as exc:
        return checks + [GateResult("ensemble_switch", False, str(exc))]
    return checks


def promote(
    network: str,
    version: int | None = None,
    *,
    gates: PromotionGates = PromotionGates(),
    triton: TritonEndpoint | str,
    repository: ModelRepository | None = None,
    retention: RetentionPolicy = RetentionPolicy(),
    workspace: Workspace | None = None,
) -> PromotionResult:
    """Promote ``version`` of ``network`` (default: the ``challenger``, else the newest) to champion.

    ``triton`` is the running Triton that serves ``repository`` (default: the workspace's). Returns a
    refused :class:`PromotionResult` when a gate fails (nothing changed); raises
    :class:`PromotionBusy` when another promotion of the network runs, ``ValueError`` for bad input
    and :class:`ServingError` when Triton cannot be reached.
    """
    workspace = workspace or Workspace.from_env()
    repository = repository or ModelRepository(workspace.triton_repository)
    with promotion_lock(network, workspace):
        start = time.perf_counter()
        if _journal_path(network, workspace).is_file():
            replay_journal(network, workspace=workspace, repository=repository,
                           endpoint=_endpoint(triton, repository), retention=retention)
        candidate = _pick_candidate(network, version, workspace)
        champion = reg.get_alias(network, "champion", workspace)
        if champion is not None and champion.version == candidate.version:
            raise ValueError(f"{network} v{candidate.version} is the champion already")
        before = champion.version if champion else None
        results = registry_gates(candidate, champion, gates)

        def refused() -> PromotionResult:
            served = tuple(repository.served_versions(network)) if network in repository.networks() else ()
            return PromotionResult(network, candidate.version, False, before, tuple(results),
                                   time.perf_counter() - start, served)

        if not all(r.passed for r in results):
            return refused()
        endpoint = _endpoint(triton, repository)
        with tempfile.TemporaryDirectory() as tmp:
            smoke = dict(np.load(_download(candidate, SMOKE_ARTIFACT, Path(tmp), workspace)))
            snapshot = _Snapshot.take(repository, network, endpoint)
            challenger = reg.get_alias(network, "challenger", workspace)
            journal = lambda: _write_journal(  # noqa: E731 -- written just before the ensemble switch
                network, workspace, "promotion", candidate.version, before,
                challenger is not None and challenger.version == candidate.version)
            try:
                results += _install_check_and_switch(repository, endpoint, candidate, smoke, gates, workspace,
                                                     Path(tmp), before_switch=journal)
            except BaseException:
                snapshot.restore(endpoint)  # an unexpected error or an interrupt: put things back first
                _journal_path(network, workspace).unlink(missing_ok=True)
                raise
            if not all(r.passed for r in results):
                snapshot.restore(endpoint)
                _journal_path(network, workspace).unlink(missing_ok=True)
                return refused()
        reg.set_alias(network, "champion", candidate.version, workspace)
        reg.set_alias(network, "previous", before, workspace)
        if challenger is not None and challenger.version == candidate.version:
            reg.set_alias(network, "challenger", None, workspace)
        _trim(repository, network, candidate.version, before, retention, endpoint)
        _journal_path(network, workspace).unlink(missing_ok=True)
        return PromotionResult(network, candidate.version, True, before, tuple(results),
                               time.perf_counter() - start, tuple(repository.served_versions(network)))


def rollback(
    network: str,
    *,
    triton: TritonEndpoint | str,
    repository: ModelRepository | None = None,
    retention: RetentionPolicy = RetentionPolicy(),
    workspace: Workspace | None = None,
) -> RollbackResult:
    """Make ``previous`` the champion again, in the registry and in Triton; the demoted version
    becomes ``previous``. ``ValueError`` when there is no previous version."""
    workspace = workspace or Workspace.from_env()
    repository = repository or ModelRepository(workspace.triton_repository)
    with promotion_lock(network, workspace):
        start = time.perf_counter()
        if _journal_path(network, workspace).is_file():
            replay_journal(network, workspace=workspace, repository=repository,
                           endpoint=_endpoint(triton, repository), retention=retention)
        previous = reg.get_alias(network, "previous", workspace)
        champion = reg.get_alias(network, "champion", workspace)
        if previous is None or champion is None:
            raise ValueError(f"{network} has no {'previous' if champion else 'champion'} version, so nothing to "
                             "roll back to (that takes two promotions)")
        endpoint = _endpoint(triton, repository)
        snapshot = _Snapshot.take(repository, network, endpoint)
        served = repository.served_versions(network) if snapshot.files[network] is not None else []
        try:
            with tempfile.TemporaryDirectory() as tmp:
                _install(repository, previous, served, workspace, Path(tmp))
            endpoint.load(network)
            _write_journal(network, workspace, "rollback", previous.version, champion.version, False)
            repository.set_champion(network, previous.version, endpoint)
        except BaseException:
            snapshot.restore(endpoint)
            _journal_path(network, workspace).unlink(missing_ok=True)
            raise
        reg.set_alias(network, "champion", previous.version, workspace)
        reg.set_alias(network, "previous", champion.version, workspace)
        _trim(repository, network, previous.version, champion.version, retention, endpoint)
        _journal_path(network, workspace).unlink(missing_ok=True)
        return RollbackResult(network, previous.version, champion.version, time.perf_counter() - start)


def models(
    *,
    triton: TritonEndpoint | str | None = None,
    repository: ModelRepository | None = None,
    workspace: Workspace | None = None,
) -> list[NetworkStatus]:
    """Every network in the registry or the repository: versions with aliases and tags, the
    repository's versions/served/champion and, with ``triton``, the versions Triton has loaded."""
    workspace = workspace or Workspace.from_env()
    repository = repository or ModelRepository(workspace.triton_repository)
    endpoint = _endpoint(triton, repository) if triton is not None else None
    described = repository.describe()
    out = []
    for network in sorted(set(reg.list_networks(workspace)) | set(described)):
        files = described.get(network, {})
        live = None if endpoint is None else tuple(endpoint.served_versions(network))
        ensemble = None if endpoint is None else endpoint.model_ready(f"{network}_ensemble")
        out.append(NetworkStatus(
            network=network, versions=tuple(reg.list_versions(network, workspace)),
            repository_versions=tuple(files.get("versions", ())), repository_served=tuple(files.get("served", ())),
            repository_champion=files.get("champion"), triton_served=live, ensemble_ready=ensemble))
    return out
