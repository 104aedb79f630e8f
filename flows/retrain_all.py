"""Flow ``retrain_all``: the scheduled job. For every network: ingest its source → retrain if the
data version or the recipe changed → promote if the gates say it is better → one summary table.

The cache key is (data version, recipe fingerprint), looked up in the tags of the registered
versions (``flows.cache``): a network whose data and recipe did not change is not retrained and
reports ``unchanged``. So a failed run, re-run, resumes: finished networks are skipped, an
interrupted training continues from its checkpoint (``resume=True``), and a version whose promotion
was already decided gets the persisted decision back instead of a second evaluation.

Data and cache checks run network by network; then the trainings: in-process one after another
(embedded default, they share the CPUs), or, on a Prefect server with the ``train/train``
deployment on a work pool, all at once as that deployment's flow runs, so the pool's workers train
in parallel (``flows.dispatch``); then the promotions one at a time. A network that fails (e.g. its
data gate) does not stop the others, but the flow ends Failed after publishing the summary.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from fer_core.models.catalog import list_networks, network_specs
from fer_platform.workspace import Workspace
from flows.ingest import ingest
from flows.promote import promote
from flows.dispatch import submit_training, train_on_pool, wait_for
from flows.steps import (champion_of, data_docs_link, evaluate_version, find_rounds_version, find_trained_version,
                         mlflow_links, publish_summary, recipe_for, start_triton, stop_triton, test_sets_for)
from flows.refine_au_labels import train_au_rounds
from flows.train import train

# The default networks and their sources come from the network specs (fer_core.models.catalog):
# data in each network's real format, expected under <FER_HOME>/sources/<format> (`fer demo`
# generates it there).
TABLE_KEY = "retrain-all-summary"


def default_sources(workspace: Workspace) -> dict[str, tuple[str, str, str]]:
    """Network -> (dataset name, format, source path) under ``<FER_HOME>/sources``."""
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


def _evaluate_champion(network: str, version: int, workspace: Workspace) -> str:
    """Evaluate a newly promoted champion (in-process ONNX) on every registered test set of its task.

    A failed evaluation is reported in the summary, never undoes the promotion: the gates decided it.
    """
    results = []
    for ref in test_sets_for(network, workspace):
        state = evaluate_version(network, version, ref, workspace, return_state=True)
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
    dispatch: str = "auto",
    au_rounds: int = 0,
) -> list[dict[str, str]]:
    """Retrain and promote ``networks`` (default: :func:`default_networks`); returns the summary rows.

    ``sources``: network -> (dataset name, format, source path), over :func:`default_sources`.
    ``overrides``: network -> recipe overrides. ``gates``: network -> ``PromotionGates`` fields.
    ``triton_url``: Triton to promote into (default ``FER_TRITON_URL``, else an embedded server).
    ``dispatch``: ``pool`` trains each network as its own ``train/train`` flow run on the work pool
    (parallel over workers), ``local`` as in-process sub-flows, ``auto`` the pool when Prefect runs
    on a server with that deployment (``flows.dispatch``).
    ``au_rounds``: K > 0 trains ``au_cotrain`` with K noisy-label refinement rounds
    (``flows.refine_au_labels.train_au_rounds``, in-process) and registers the last round's model; its cache
    key adds K to (data, recipe, code).
    """
    workspace = Workspace.load().ensure()  # this flow run's platform context
    networks = list(networks or default_networks())
    sources = {**default_sources(workspace), **{k: tuple(v) for k, v in (sources or {}).items()}}
    unknown = [n for n in networks if n not in sources]
    if unknown:
        raise ValueError(f"no data source configured for {unknown}; pass sources={{network: (name, format, path)}}")
    overrides, gates = overrides or {}, gates or {}
    url = triton_url or workspace.settings.triton_url
    on_pool = train_on_pool(dispatch)
    server = None
    rows: list[dict[str, str]] = []
    failed: list[str] = []
    todo: dict[str, dict[str, Any]] = {}  # network -> what its promotion step needs
    try:
        # 1. data and cache, network by network (cheap)
        for network in networks:
            name, fmt, path = sources[network]
            row = {"network": network, "data version": "", "metric": "", "champion before": "",
                   "champion after": "", "decision": "", "test sets": "", "mlflow run": "", "model version": "",
                   "data docs": ""}
            rows.append(row)
            data_state = ingest(name, fmt, path, return_state=True)
            row["data docs"] = data_docs_link(workspace.gx_docs)
            if data_state.is_failed():
                row["decision"] = f"failed: ingest: {_failure(data_state)}"
                failed.append(network)
                continue
            data = data_state.result()
            row["data version"] = f"{data.name}@{data.short}"
            before = champion_of(network, workspace)
            row["champion before"] = row["champion after"] = _version_text(before)
            recipe = recipe_for(network, profile, overrides.get(network))
            if network == "au_cotrain" and au_rounds > 0:
                version = find_rounds_version(data.ref, recipe, au_rounds, workspace)
            else:
                version = find_trained_version(network, data.ref, recipe, workspace)
            todo[network] = {"row": row, "data": data, "before": before, "recipe": recipe,
                             "version": version, "retrained": version is None}
        # 2. training: on the pool, every network's own flow run at once; else one after another
        pending = [n for n, t in todo.items() if t["version"] is None]
        if au_rounds > 0 and "au_cotrain" in pending:
            # The rounds refine labels between trainings, so they run here, in this flow run.
            pending.remove("au_cotrain")
            item = todo["au_cotrain"]
            rounds_state = train_au_rounds(item["data"].ref, au_rounds, profile, overrides.get("au_cotrain"),
                                           return_state=True)
            if rounds_state.is_failed():
                item["error"] = f"failed: au rounds: {_failure(rounds_state)}"
            else:
                item["version"] = rounds_state.result()
        if on_pool and pending:
            runs = {n: submit_training(n, todo[n]["data"].ref, profile, overrides.get(n)) for n in pending}
            print(f"training {', '.join(pending)} as flow runs of train/train on the work pool")
            states = wait_for(list(runs.values()))
            for network, run_id in runs.items():
                state, item = states[run_id], todo[network]
                if state.type.value != "COMPLETED":
                    item["error"] = f"failed: train: flow run {run_id} {state.name}: {state.message or ''}".strip()
                    continue
                item["version"] = find_trained_version(network, item["data"].ref, item["recipe"], workspace)
                if item["version"] is None:
                    item["error"] = f"failed: train: flow run {run_id} completed but registered no version"
        else:
            for network in pending:
                item = todo[network]
                train_state = train(network, item["data"].ref, profile, overrides.get(network), return_state=True)
                if train_state.is_failed():
                    item["error"] = f"failed: train: {_failure(train_state)}"
                else:
                    item["version"] = train_state.result()
        # 3. promotion, one network at a time
        for network, item in todo.items():
            row, before, version = item["row"], item["before"], item["version"]
            if "error" in item:
                row["decision"] = item["error"]
                failed.append(network)
                continue
            row["metric"] = f"{version.tags.get('primary_metric', '?')}={version.tags.get('primary_metric_value', '?')}"
            row["mlflow run"], row["model version"] = mlflow_links(version, workspace)
            if before is not None and before.version == version.version:
                row["decision"] = "unchanged"
                continue
            if server is None and not url:
                server = start_triton(workspace)
                url = f"grpc://{server.grpc_url}"
            promo_state = promote(network, version.version, gates.get(network), url, return_state=True)
            after = champion_of(network, workspace)
            row["champion after"] = _version_text(after)
            if promo_state.is_failed():
                row["decision"] = f"failed: promote: {_failure(promo_state)}"
                failed.append(network)
                continue
            result = promo_state.result()
            if not item["retrained"] and (after and after.version) == (before and before.version):
                row["decision"] = "unchanged"  # this version's promotion was decided by an earlier run
            elif result.promoted:
                row["decision"] = f"promoted v{version.version}"
                row["test sets"] = _evaluate_champion(network, version.version, workspace)
            else:
                row["decision"] = f"kept champion (v{version.version} refused by {', '.join(g.name for g in result.failed)})"
        publish_summary(rows, TABLE_KEY, f"retrain_all ({profile} profile): data version, primary metric, "
                        "champion before/after, the decision and links to the MLflow run, the model "
                        "version and the Data Docs of each network")
    finally:
        if server is not None:
            stop_triton(server)
    if failed:
        raise RuntimeError(f"retrain_all failed for {', '.join(failed)}: "
                           + "; ".join(r["decision"] for r in rows if r["network"] in failed))
    return rows
