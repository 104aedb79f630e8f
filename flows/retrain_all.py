"""Flow ``retrain_all``: the scheduled job. For every network: ingest its source → retrain if the
data version or the recipe changed → promote if the gates say it is better → one summary table.

The cache key is (data version, recipe fingerprint), looked up in the tags of the registered
versions (``flows.cache``): a network whose data and recipe did not change is not retrained and
reports ``unchanged``. So a failed run, re-run, resumes: finished networks are skipped, an
interrupted training continues from its checkpoint (``resume=True``), and a version whose promotion
was already decided gets the persisted decision back instead of a second evaluation.

Networks run one after another (they share the CPUs); a network that fails (e.g. its data gate)
does not stop the others, but the flow ends Failed after publishing the table.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from fer_core.models.registry import list_networks, network_specs
from fer_core.settings import Settings
from fer_core.workspace import Workspace
from flows.ingest import ingest
from flows.promote import promote
from flows.tasks import (champion_of, evaluate_version, find_trained_version, publish_table, recipe_for, start_triton,
                         stop_triton, test_sets_for)
from flows.train import train

# The default networks and their sources come from the network specs (fer_core.models.registry):
# data in each network's real format, expected under <FER_HOME>/sources/<format> (`fer demo`
# generates it there).
TABLE_KEY = "retrain-all-summary"


def default_sources(workspace: Workspace | None = None) -> dict[str, tuple[str, str, str]]:
    """Network -> (dataset name, format, source path) under ``<FER_HOME>/sources``."""
    workspace = workspace or Workspace.from_env()
    return {s.name: (s.dataset, s.data_format, str(workspace.root / "sources" / s.data_format)) for s in network_specs()}


def default_networks() -> list[str]:
    """The networks retrained when none are given: every registered spec with ``default=True``."""
    return list_networks(default_only=True)


def _version_text(version: Any) -> str:
    return f"v{version.version}" if version is not None else "none"


def _failure(state: Any) -> str:
    """One line: the exception of a failed sub-flow (e.g. every failed check of a data gate)."""
    error = state.result(raise_on_failure=False)
    text = str(error) if isinstance(error, BaseException) else (state.message or state.name)
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())[:600]


def _evaluate_champion(network: str, version: int) -> str:
    """Evaluate a newly promoted champion (in-process ONNX) on every registered test set of its task.

    A failed evaluation is reported in the summary, never undoes the promotion: the gates decided it.
    """
    results = []
    for ref in test_sets_for(network):
        state = evaluate_version(network, version, ref, return_state=True)
        if state.is_failed():
            results.append(f"{ref.split('@')[0]}: failed ({_failure(state)})")
        else:
            metrics = state.result()["metrics"]
            results.append(f"{ref.split('@')[0]}: UAR {metrics['uar']:.3f} WAR {metrics['war']:.3f}")
    return "; ".join(results) or "none registered"


@flow(name="retrain_all", log_prints=True)
def retrain_all(
    networks: list[str] | None = None,
    profile: str = "quick",
    sources: dict[str, tuple[str, str, str]] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    gates: dict[str, dict[str, Any]] | None = None,
    triton_url: str | None = None,
) -> list[dict[str, str]]:
    """Retrain and promote ``networks`` (default: :func:`default_networks`); returns the summary rows.

    ``sources``: network -> (dataset name, format, source path), over :func:`default_sources`.
    ``overrides``: network -> recipe overrides. ``gates``: network -> ``PromotionGates`` fields.
    ``triton_url``: Triton to promote into (default ``FER_TRITON_URL``, else an embedded server).
    """
    workspace = Workspace.from_env().ensure()
    networks = list(networks or default_networks())
    sources = {**default_sources(workspace), **{k: tuple(v) for k, v in (sources or {}).items()}}
    unknown = [n for n in networks if n not in sources]
    if unknown:
        raise ValueError(f"no data source configured for {unknown}; pass sources={{network: (name, format, path)}}")
    overrides, gates = overrides or {}, gates or {}
    url = triton_url or Settings.load().triton_url
    server = None
    rows: list[dict[str, str]] = []
    failed: list[str] = []
    try:
        for network in networks:
            name, fmt, path = sources[network]
            row = {"network": network, "data version": "", "metric": "", "champion before": "",
                   "champion after": "", "decision": "", "test sets": ""}
            rows.append(row)
            data_state = ingest(name, fmt, path, return_state=True)
            if data_state.is_failed():
                row["decision"] = f"failed: ingest: {_failure(data_state)}"
                failed.append(network)
                continue
            data = data_state.result()
            row["data version"] = f"{data.name}@{data.short}"
            before = champion_of(network)
            row["champion before"] = row["champion after"] = _version_text(before)
            recipe = recipe_for(network, profile, overrides.get(network))
            version = find_trained_version(network, data.ref, recipe)
            retrained = version is None
            if retrained:
                train_state = train(network, data.ref, profile, overrides.get(network), return_state=True)
                if train_state.is_failed():
                    row["decision"] = f"failed: train: {_failure(train_state)}"
                    failed.append(network)
                    continue
                version = train_state.result()
            row["metric"] = f"{version.tags.get('primary_metric', '?')}={version.tags.get('primary_metric_value', '?')}"
            if before is not None and before.version == version.version:
                row["decision"] = "unchanged"
                continue
            if server is None and not url:
                server = start_triton(workspace.triton_repository, workspace.root / "triton")
                url = f"grpc://{server.grpc_url}"
            promo_state = promote(network, version.version, gates.get(network), url, return_state=True)
            after = champion_of(network)
            row["champion after"] = _version_text(after)
            if promo_state.is_failed():
                row["decision"] = f"failed: promote: {_failure(promo_state)}"
                failed.append(network)
                continue
            result = promo_state.result()
            if not retrained and (after and after.version) == (before and before.version):
                row["decision"] = "unchanged"  # this version's promotion was decided by an earlier run
            elif result.promoted:
                row["decision"] = f"promoted v{version.version}"
                row["test sets"] = _evaluate_champion(network, version.version)
            else:
                row["decision"] = f"kept champion (v{version.version} refused by {', '.join(g.name for g in result.failed)})"
        publish_table(rows, TABLE_KEY, f"retrain_all ({profile} profile): data version, primary metric, "
                      "champion before/after and the decision per network")
    finally:
        if server is not None:
            stop_triton(server)
    if failed:
        raise RuntimeError(f"retrain_all failed for {', '.join(failed)}: "
                           + "; ".join(r["decision"] for r in rows if r["network"] in failed))
    return rows
