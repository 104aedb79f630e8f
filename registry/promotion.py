"""Gated promotion of a registered version into Triton, rollback, and what is served where.

A promotion of ``network`` to version N, under a per-network lock (a second concurrent promotion or
rollback of the same network is refused with :class:`PromotionBusy`):

1. the candidate's (and the champion's) **model package** is downloaded and checked: its
   ``package.json`` must match the digest its run logged as an immutable parameter at registration,
   every file its hash (``package`` gate; a missing, altered or truncated package is refused with
   one line). Then :func:`package_gates`, never from editable version tags: ``data_gate`` (the
   package's data version is in the gated dataset index), ``onnx_parity`` (the run's logged
   ``parity/*`` metrics) and ``metric_vs_champion``: both packages are scored in-process on the
   *same* held-out split of the candidate's (current) data version; the candidate may be worse by
   at most a margin, the first version must reach a floor. Any failure stops here.
2. N's package is installed atomically as ``<network>/<N>/`` (``model.onnx`` + ``package.json``)
   and served *beside* the current champion, which keeps answering through the ensemble.
3. Triton gates on version N itself: ``triton_smoke`` (the package's *raw* smoke samples go
   through a temporary ensemble of N with N's own pre/post-processing; probabilities must match the
   package's expected answers within ``atol`` and labels agree) and ``latency_p95`` (p95 of
   single-sample requests within the budget).
4. Only then the ensemble is switched to N (:meth:`ModelRepository.set_champion`, which regenerates
   pre/post-processing from N's package), aliases move (``previous`` ← old champion, ``champion`` ← N,
   ``challenger`` dropped if it was N) and the served and on-disk versions are trimmed by the
   :class:`RetentionPolicy`.

A refusal at step 3 (or a failed switch) restores the repository files byte for byte (the new
version folder is removed, configs are rewritten as they were) and reloads what changed, so
aliases, repository and the served model are exactly as before. :func:`rollback` makes
``previous`` the champion again after the same integrity checks (its package against its digest,
a folder still on disk against its package), reinstalling it from the registry if its folder is gone.


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

from fer_platform.workspace import Workspace
from registry import models as reg
from registry.export import PACKAGE_ARTIFACT, PACKAGE_DIGEST_PARAM
from serving.package import ModelPackage, PackageError
from serving.repository import STEP_SUFFIXES, ModelRepository, atomic_write_bytes
from serving.server import ServingError, TritonEndpoint, control_key

__all__ = ["PromotionGates", "RetentionPolicy", "GateResult", "PromotionResult", "RollbackResult",
           "NetworkStatus", "PromotionBusy", "promotion_lock", "package_gates", "download_package",
           "score_package", "promote", "rollback", "models", "replay_journal"]

_NETWORK_NAME = re.compile(r"[a-z][a-z0-9_]*")
GATE_NAMES = ("package", "data_gate", "onnx_parity", "metric_vs_champion", "triton_smoke", "latency_p95")


class PromotionBusy(RuntimeError):
    """Another promotion or rollback of the same network holds its lock."""


@dataclass(frozen=True)
class PromotionGates:
    """Thresholds of a promotion.

    ``margin``: how much worse than the champion's primary metric the candidate may be.
    ``floor``: the primary metric the first version (no champion) must reach.
    ``latency_budget_ms``: the p95 of single-sample requests on the new version must stay under it.
    ``smoke_samples``: held-out samples sent through Triton; ``latency_requests``: requests timed.
    ``atol``: tolerance of the smoke test (Triton's ensemble vs the package's expected answers).
    ``metric_samples``: at most this many samples of the current held-out split score both packages.
    """

    margin: float = 0.02
    floor: float = 0.2
    latency_budget_ms: float = 100.0
    smoke_samples: int = 16
    latency_requests: int = 50
    atol: float = 1e-4
    metric_samples: int = 256  # held-out samples both packages are scored on

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
def promotion_lock(network: str, workspace: Workspace) -> Iterator[Path]:
    """Hold the network's promotion lock (``<workspace>/locks/promote-<network>.lock``), non-blocking.

    ``flock`` locks belong to the open file, so two threads of one process exclude each other too,
    and the kernel drops the lock of a crashed process.
    """
    if not _NETWORK_NAME.fullmatch(network or ""):
        raise ValueError(f"network name {network!r} must be lower-case letters, digits and _")
    workspace = workspace.ensure()
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


def replay_journal(network: str, *, workspace: Workspace, repository: ModelRepository | None = None,
                   endpoint: TritonEndpoint | None = None, retention: RetentionPolicy | None = None) -> str:
    """Finish or discard an interrupted promotion/rollback of ``network`` (call with its lock held).

    Returns a one-line account ("" when there was no journal). With ``endpoint`` the live Triton is
    brought in line too (the network and its ensemble are reloaded from the repository).
    """
    import json

    repository = repository or ModelRepository.of_workspace(workspace)
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


# -- the model package --------------------------------------------------------------------------------

def download_package(version: reg.ModelVersion, dst: Path, workspace: Workspace) -> ModelPackage:
    """The version's model package, checked: its ``package.json`` must match the digest the run
    logged as an (immutable) parameter at registration, and every file its hash. One-line
    :class:`PackageError` otherwise (missing, altered, truncated, other format version)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking

    name = f"{reg.registered_name(version.network)} v{version.version}"
    setup_tracking(workspace)
    client = MlflowClient()
    try:
        run = client.get_run(version.run_id)
    except MlflowException:
        raise PackageError(f"{name}: its run {version.run_id!r} does not exist") from None
    digest = run.data.params.get(PACKAGE_DIGEST_PARAM)
    if not digest:
        raise PackageError(f"{name} has no model package (run param {PACKAGE_DIGEST_PARAM}); register it again "
                           "with fer register")
    try:
        folder = Path(client.download_artifacts(version.run_id, PACKAGE_ARTIFACT, str(dst)))
    except (MlflowException, OSError) as exc:
        raise PackageError(f"{name}: its model package cannot be downloaded ({str(exc).splitlines()[0]})") from None
    try:
        package = ModelPackage.open(folder, expected_digest=digest)
    except PackageError as exc:
        raise PackageError(f"{name}: {exc}") from None
    if package.network != version.network:
        raise PackageError(f"{name}: its package is for {package.network!r}")
    return package


def _collate_targets(items: list[Mapping[str, object]]) -> dict[str, object]:
    import torch

    return {k: torch.stack([torch.as_tensor(t[k]) for t in items]) for k in items[0]}


def score_package(packages: list[ModelPackage], network: str, data_ref: str, recipe_dict: Mapping[str, object],
                  max_samples: int, workspace: Workspace) -> tuple[list[float], str, str, int]:
    """Primary metric of each package on the same held-out split of ``data_ref`` (the split of
    ``recipe_dict``, test else val), every package through its own full pipeline on the raw samples
    (in-process ONNX Runtime). Returns (values, metric name, split, samples)."""
    import torch

    from fer_core.training.recipe import Recipe
    from registry.export import held_out_split, raw_sample
    from serving.package import PackageRunner

    recipe = Recipe.from_dict(recipe_dict)
    task, split, dataset = held_out_split(network, data_ref, recipe, workspace, "to score on")
    count = min(max_samples, len(dataset))
    raw = [raw_sample(dataset.root, dataset.rows.iloc[i], task.meta) for i in range(count)]
    targets = _collate_targets([dataset[i][1] for i in range(count)])
    values = []
    for package in packages:
        answers = PackageRunner(package).predict(raw)
        outputs = {n: torch.from_numpy(answers[f"output:{n}"]) for n in package.metadata.output_names}
        values.append(float(task.compute_metrics(outputs, targets)[task.primary_metric]))
    return values, task.primary_metric, split, count


def _run_metrics(version: reg.ModelVersion, workspace: Workspace) -> Mapping[str, float]:
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking

    setup_tracking(workspace)
    return MlflowClient().get_run(version.run_id).data.metrics


def package_gates(candidate: reg.ModelVersion, champion: reg.ModelVersion | None, package: ModelPackage,
                  champion_package: ModelPackage | None, gates: PromotionGates,
                  workspace: Workspace) -> list[GateResult]:
    """``data_gate``, ``onnx_parity`` and ``metric_vs_champion`` from the packages and the run's logged
    metrics (never from version tags, which anyone with registry access can edit).

    The metric gate scores the candidate's and the champion's packages on the *same* held-out split
    of the candidate's data version (the current data), and reports both numbers.
    """
    from registry.export import PARITY_ATOL, data_gate_status

    data = str(package.info.get("data_version", ""))
    status = data_gate_status(data, workspace) if data else "unknown"
    results = [GateResult("data_gate", status == "passed", f"training data {data or '?'} gate: {status}")]
    metrics = _run_metrics(candidate, workspace)
    diff, agreement = metrics.get("parity/max_abs_diff"), metrics.get("parity/label_agreement")
    numbers = {k: float(v) for k, v in (("max_abs_diff", diff), ("label_agreement", agreement)) if v is not None}
    parity_ok = diff is not None and agreement is not None and diff <= PARITY_ATOL and agreement >= 1.0
    results.append(GateResult("onnx_parity", parity_ok,
                              "ONNX vs PyTorch on held-out samples (run metrics parity/*)" if numbers
                              else "the run logged no parity/* metrics", numbers))
    recipe = package.info.get("recipe")
    if not recipe:
        results.append(GateResult("metric_vs_champion", False, f"v{candidate.version}'s package records no recipe"))
        return results
    scored = [package] + ([champion_package] if champion_package is not None else [])
    try:
        values, metric, split, count = score_package(scored, candidate.network, data, recipe, gates.metric_samples,
                                                     workspace)
    except (ValueError, KeyError, RuntimeError) as exc:
        results.append(GateResult("metric_vs_champion", False,
                                  f"scoring on {data} failed: {(str(exc).splitlines() or [type(exc).__name__])[0]}"))
        return results
    where = f"{metric} on {count} {split} samples of {data}"
    if champion_package is None:
        results.append(GateResult("metric_vs_champion", values[0] >= gates.floor,
                                  f"first version: {where}: {values[0]:.4f} vs floor {gates.floor:.4f}",
                                  {"candidate": values[0], "floor": gates.floor}))
    else:
        results.append(GateResult(
            "metric_vs_champion", values[0] >= values[1] - gates.margin,
            f"{where}: v{candidate.version} {values[0]:.4f} vs champion v{champion.version} {values[1]:.4f} "
            f"- margin {gates.margin:.4f}",
            {"candidate": values[0], "champion": values[1], "margin": gates.margin}))
    return results


# -- Triton gates ----------------------------------------------------------------------------------

def _triton_error(endpoint: TritonEndpoint, model: str, exc: Exception) -> ServingError:
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    first_line = (str(message).strip().splitlines() or [type(exc).__name__])[0]
    return ServingError(f"{model} at {endpoint.url}: {first_line}")


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
        raise _triton_error(endpoint, f"{network} v{version}", exc) from None
    return {name: result.as_numpy(name) for name in outputs}


def _infer_raw(endpoint: TritonEndpoint, ensemble: str, input_name: str, sample: list[bytes]) -> np.ndarray:
    """PROBABILITIES of one raw sample (an image, or a clip's frames) through an ensemble."""
    module = endpoint.module
    data = np.array([sample], dtype=object)
    tensor = module.InferInput(input_name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    try:
        result = endpoint.client.infer(ensemble, [tensor], outputs=[module.InferRequestedOutput("PROBABILITIES")])
    except Exception as exc:  # noqa: BLE001
        raise _triton_error(endpoint, ensemble, exc) from None
    return result.as_numpy("PROBABILITIES")[0]


def _smoke_gate(endpoint: TritonEndpoint, repository: ModelRepository, package: ModelPackage, version: int,
                gates: PromotionGates) -> GateResult:
    """The package's raw smoke set through a temporary ensemble of the candidate (its own
    pre/post-processing, the package's face handling), against the package's expected answers.
    The champion's ensemble is not touched; the candidate ensemble is removed afterwards."""
    network = package.network
    stem = repository.candidate_stem(network)
    steps = [f"{stem}{suffix}" for suffix in STEP_SUFFIXES] + [f"{stem}_ensemble"]  # cleaned up: any layout
    samples = package.smoke_samples()[: gates.smoke_samples]
    expected = package.expected()["PROBABILITIES"][: len(samples)]
    if not samples:
        return GateResult("triton_smoke", False, f"v{version}'s package has no smoke samples")
    input_name = "FRAMES" if package.pipeline.kind == "clip" else "IMAGE"
    try:
        repository.write_ensemble(network, version, stem=stem, face=package.pipeline.face)
        for model in [*repository.step_models(stem), f"{stem}_ensemble"]:  # the layout just written
            endpoint.load(model)
        got = np.stack([_infer_raw(endpoint, f"{stem}_ensemble", input_name, s) for s in samples])
    except (ServingError, ValueError) as exc:
        return GateResult("triton_smoke", False, f"raw smoke set through the candidate ensemble: {exc}")
    finally:
        for model in reversed(steps):
            with contextlib.suppress(ServingError):
                endpoint.unload(model)
        repository.remove_models(steps)
    if got.shape != expected.shape:
        return GateResult("triton_smoke", False, f"PROBABILITIES shape {got.shape} != package's {expected.shape}")
    max_diff = float(np.abs(got.astype(np.float64) - expected).max())
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    passed = max_diff <= gates.atol and agreement == 1.0
    return GateResult("triton_smoke", passed,
                      f"{len(samples)} raw held-out samples through the v{version} ensemble: max |diff| {max_diff:.2e} "
                      f"(atol {gates.atol:.0e}) vs the package's answers, label agreement {agreement:.3f}",
                      {"max_abs_diff": max_diff, "label_agreement": agreement, "samples": float(len(samples))})


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

def _step_models(network: str) -> tuple[str, ...]:
    """Every model of the network's ensemble in either layout, the ensemble last."""
    return (*(f"{network}{suffix}" for suffix in STEP_SUFFIXES), f"{network}_ensemble")


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
    if endpoint.before_load is None:  # an s3:// repository is published before each load
        endpoint.before_load = repository.publish
    if not endpoint.server_live():
        raise ServingError(f"Triton at {endpoint.url} is unreachable")
    return endpoint


def _pick_candidate(network: str, version: int | None, workspace: Workspace) -> reg.ModelVersion:
    if version is not None:
        return reg.get_version(network, version, workspace)
    challenger = reg.get_alias(network, "challenger", workspace)
    if challenger is not None:
        return challenger
    versions = reg.list_versions(network, workspace)
    if not versions:
        raise ValueError(f"{reg.registered_name(network)} has no registered versions")
    return versions[-1]


def _install(repository: ModelRepository, candidate: reg.ModelVersion, package: ModelPackage,
             served: list[int]) -> None:
    """Put the version's verified package on disk as its registry version and serve it beside ``served``.
    A version already on disk must be that package byte for byte (manifest digest, ONNX hash)."""
    network, version = candidate.network, candidate.version
    if version in repository.versions(network):
        try:
            repository.verify_version(network, version, package.digest)
        except PackageError as exc:
            raise PackageError(f"{exc}: the repository and the registry disagree; remove "
                               f"{repository.root / network / str(version)} and try again") from None
        repository.set_served_versions(network, sorted({*served, version}))
    else:
        repository.write_model(network, version, package.root, keep_versions=served)


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
                              package: ModelPackage, gates: PromotionGates, before_switch=lambda: None) -> list[GateResult]:
    """Serve the candidate beside the champion, run the Triton gates and, only if they pass, switch
    the ensemble to it. Returns the gate results; the caller restores the repository on a failure."""
    from serving.package import PackageRunner

    network, version = candidate.network, candidate.version
    served = repository.served_versions(network) if network in repository.networks() else []
    try:
        _install(repository, candidate, package, served)
        endpoint.load(network)
    except (ServingError, ValueError) as exc:
        return [GateResult("triton_smoke", False, f"installing v{version} failed: {exc}")]
    sample = PackageRunner(package).prepare(package.smoke_samples()[0]).tensor
    checks = [_smoke_gate(endpoint, repository, package, version, gates),
              _latency_gate(endpoint, network, version, package.metadata, sample, gates)]
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
    workspace: Workspace,
) -> PromotionResult:
    """Promote ``version`` of ``network`` (default: the ``challenger``, else the newest) to champion.

    ``triton`` is the running Triton that serves ``repository`` (default: the workspace's). Returns a
    refused :class:`PromotionResult` when a gate fails (nothing changed); raises
    :class:`PromotionBusy` when another promotion of the network runs, ``ValueError`` for bad input
    and :class:`ServingError` when Triton cannot be reached.
    """
    repository = repository or ModelRepository.of_workspace(workspace)
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
        with tempfile.TemporaryDirectory() as tmp:
            results: list[GateResult] = []
            try:
                package = download_package(candidate, Path(tmp) / "candidate", workspace)
                champion_package = (download_package(champion, Path(tmp) / "champion", workspace)
                                    if champion is not None else None)
            except PackageError as exc:
                results.append(GateResult("package", False, str(exc)))
            else:
                results.append(GateResult("package", True, f"v{candidate.version} package {package.digest[:12]} "
                                          f"matches its registration (format, hashes)"))
                results += package_gates(candidate, champion, package, champion_package, gates, workspace)

            def refused() -> PromotionResult:
                served = tuple(repository.served_versions(network)) if network in repository.networks() else ()
                return PromotionResult(network, candidate.version, False, before, tuple(results),
                                       time.perf_counter() - start, served)

            if not all(r.passed for r in results):
                return refused()
            endpoint = _endpoint(triton, repository)
            snapshot = _Snapshot.take(repository, network, endpoint)
            challenger = reg.get_alias(network, "challenger", workspace)
            journal = lambda: _write_journal(  # noqa: E731 -- written just before the ensemble switch
                network, workspace, "promotion", candidate.version, before,
                challenger is not None and challenger.version == candidate.version)
            try:
                results += _install_check_and_switch(repository, endpoint, candidate, package, gates,
                                                     before_switch=journal)
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
    workspace: Workspace,
) -> RollbackResult:
    """Make ``previous`` the champion again, in the registry and in Triton; the demoted version
    becomes ``previous``. ``ValueError`` when there is no previous version."""
    repository = repository or ModelRepository.of_workspace(workspace)
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
        with tempfile.TemporaryDirectory() as tmp:
            # Integrity first: the previous version's package must match its registration digest,
            # and a folder still on disk must match the package (nothing is touched otherwise).
            package = download_package(previous, Path(tmp), workspace)
            if previous.version in repository.versions(network):
                repository.verify_version(network, previous.version, package.digest)
            try:
                _install(repository, previous, package, served)
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
    workspace: Workspace,
) -> list[NetworkStatus]:
    """Every network in the registry or the repository: versions with aliases and tags, the
    repository's versions/served/champion and, with ``triton``, the versions Triton has loaded."""
    repository = repository or ModelRepository.of_workspace(workspace)
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
