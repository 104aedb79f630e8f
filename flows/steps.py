"""Thin, typed Prefect tasks over the platform's library functions (no logic of their own).

Retries only where a second try can help: DVC pulls/pushes and MLflow I/O inside training (a
retried training *resumes* from its last checkpoint), starting Triton, and a promotion refused
because another one of the same network holds the lock. None on the data gate: bad data stays bad.

Caching: Prefect's input-hashing cache is off (``NO_CACHE``): the inputs are folders, recipes and
servers, and what may be skipped is decided by the registry (``flows.cache``). The one persisted
result is a promotion's, keyed by the version's MLflow run, so a re-run of ``retrain_all`` after a
crash does not evaluate the same version twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from data_checks import GateReport, validate_dataset
from fer_core.data import formats
from fer_core.training.recipe import Recipe
from fer_platform.workspace import Workspace
from flows import cache
from flows.dispatch import promotion_slot
from registry import models as reg
from registry import promotion
from registry.datasets import DatasetStore, DatasetVersion
from registry.export import export_and_register
from registry.training import TrainOutcome, resolve_recipe, train_tracked
from serving.repository import ModelRepository
from serving.server import EmbeddedTriton, TritonEndpoint, control_key


def _busy(task, task_run, state) -> bool:
    """Retry a promotion only when it failed on the per-network lock."""
    try:
        state.result()
    except promotion.PromotionBusy:
        return True
    except BaseException:  # noqa: BLE001 -- any other failure is final
        return False
    return False


# -- data ------------------------------------------------------------------------------------------

@task(name="synthesize-source", cache_policy=NO_CACHE)
def synthesize_source(fmt: str, out: Path, seed: int = 0, size: int | None = None) -> Path:
    """Render SynthFACS data in ``fmt``'s real on-disk layout; returns the source to ingest."""
    kwargs: dict[str, Any] = {"seed": seed} if size is None else {"seed": seed, "size": size}
    return formats.get_format(fmt).write_synthetic(Path(out), **kwargs)


@task(name="adapt", cache_policy=NO_CACHE)
def adapt_source(fmt: str, source: Path, prepared: Path, name: str, options: Mapping[str, Any]) -> Path:
    """Read ``source`` (real layout of ``fmt``) into a prepared dataset at ``prepared``."""
    formats.adapt(fmt, Path(source), Path(prepared), name=name, **dict(options))
    return Path(prepared)


@task(name="data-gate", retries=0, cache_policy=NO_CACHE)
def data_gate(prepared: Path, docs_dir: Path) -> GateReport:
    """Great Expectations gate; raises ``GateFailed`` (its message lists every failed check)."""
    report = validate_dataset(Path(prepared), docs_dir=Path(docs_dir))
    report.raise_for_failure()
    return report


@task(name="version-dataset", cache_policy=NO_CACHE)
def version_dataset(name: str, prepared: Path, source: str, extra: Mapping[str, Any],
                    workspace: Workspace) -> DatasetVersion:
    """DVC-version a gated dataset (local: cache + index). Not retried: ``DatasetStore.add`` moves
    ``prepared`` into the store first, so a second try would find nothing to add."""
    return DatasetStore(workspace).add(name, Path(prepared), source=source, extra=dict(extra), push=False)


@task(name="push-dataset", retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def push_dataset(name: str, workspace: Workspace) -> None:
    """Upload the new version to the DVC remote; network I/O, so retried."""
    DatasetStore(workspace).push(name)


# -- training --------------------------------------------------------------------------------------

@task(name="resolve-recipe", cache_policy=NO_CACHE)
def recipe_for(network: str, profile: str, overrides: Mapping[str, Any] | None) -> Recipe:
    return resolve_recipe(network, profile, None, overrides)


@task(name="find-trained-version", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def find_trained_version(network: str, data_ref: str, recipe: Recipe, workspace: Workspace) -> reg.ModelVersion | None:
    """The registered version already trained on this data version with this recipe, if any."""
    return cache.find_trained_version(network, data_ref, recipe, workspace)


@task(name="train", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def train_network(network: str, data_ref: str, recipe: Recipe, workspace: Workspace) -> TrainOutcome:
    """Tracked training. ``resume=True``: a retried or re-run training continues its checkpoint."""
    return train_tracked(network, data_ref, recipe, resume=True, progress=False, workspace=workspace)


@task(name="export-and-register", cache_policy=NO_CACHE)
def register_model(outcome: TrainOutcome, workspace: Workspace) -> reg.ModelVersion:
    """ONNX export + parity on held-out samples + registration (tags: data version, fingerprint...)."""
    return export_and_register(outcome, workspace=workspace)


# -- registry and serving --------------------------------------------------------------------------

@task(name="champion", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def champion_of(network: str, workspace: Workspace) -> reg.ModelVersion | None:
    return reg.get_alias(network, "champion", workspace)


@task(name="model-version", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def model_version(network: str, version: int, workspace: Workspace) -> reg.ModelVersion:
    return reg.get_version(network, version, workspace)


@task(name="start-triton", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def start_triton(workspace: Workspace) -> EmbeddedTriton:
    """Start the embedded Triton over the workspace's repository, loading every model already in it."""
    repo = ModelRepository.of_workspace(workspace)
    return EmbeddedTriton(repo, workspace.root / "triton", models=repo.load_order()).start(strict=False)


@task(name="stop-triton", cache_policy=NO_CACHE)
def stop_triton(server: EmbeddedTriton) -> None:
    server.stop()


def _promotion_key(context, parameters: Mapping[str, Any]) -> str:
    # No path in the key: it must mean the same on every worker and checkout. The MLflow run id is
    # a UUID, so it already tells apart the same version number in two registries.
    version: reg.ModelVersion = parameters["version"]
    return f"promote-{version.network}-v{version.version}-{version.run_id}"


@task(name="promote-version", retries=3, retry_delay_seconds=10, retry_condition_fn=_busy,
      cache_key_fn=_promotion_key, persist_result=True)
def promote_version(version: reg.ModelVersion, gates: Mapping[str, Any], triton_url: str,
                    workspace: Workspace) -> promotion.PromotionResult:
    """Gated promotion (gates → install beside the champion → Triton smoke + latency → switch → aliases),
    under the network's global concurrency limit when Prefect runs on a server (``flows.dispatch``)."""
    with promotion_slot(version.network):
        return promotion.promote(version.network, version.version, gates=promotion.PromotionGates(**dict(gates)),
                                 triton=triton_url, workspace=workspace)


@task(name="ensemble-ready", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def ensemble_serves(network: str, version: int, triton_url: str, workspace: Workspace) -> bool:
    """Is ``<network>_ensemble`` ready and is ``version`` the network version Triton serves?"""
    key = control_key(workspace.triton_repository.parent)  # the repository index needs the key
    endpoint = TritonEndpoint(triton_url, key=key)
    try:
        return endpoint.model_ready(f"{network}_ensemble") and version in endpoint.served_versions(network)
    finally:
        endpoint.close()


@task(name="rollback", cache_policy=NO_CACHE)
def rollback_network(network: str, triton_url: str, workspace: Workspace) -> promotion.RollbackResult:
    return promotion.rollback(network, triton=triton_url, workspace=workspace)


# -- AU rounds and reporting -----------------------------------------------------------------------

@task(name="au-rounds", cache_policy=NO_CACHE)
def run_au_rounds(data_ref: str, recipe: Recipe, rounds: int, gamma: float, retrain: str,
                  round_epochs: int | None, workspace: Workspace) -> Any:
    """AU co-training then ``rounds`` refinement rounds (DVC version + MLflow child run per round)."""
    from registry.tracked_refinement import run_tracked_au_rounds

    return run_tracked_au_rounds(data_ref, recipe, rounds, gamma=gamma, retrain=retrain, round_epochs=round_epochs,
                                 workspace=workspace)


@task(name="find-rounds-version", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def find_rounds_version(data_ref: str, recipe: Recipe, rounds: int, workspace: Workspace) -> reg.ModelVersion | None:
    """The registered au_cotrain version already refined by ``rounds`` rounds from this data and recipe."""
    return cache.find_rounds_version(data_ref, recipe, rounds, workspace)


@task(name="register-final-round", cache_policy=NO_CACHE)
def register_final_round(tracked: Any, data_ref: str, recipe: Recipe, workspace: Workspace) -> reg.ModelVersion:
    """Export, parity-check, package and register the last AU round's model (tagged with its rounds)."""
    from registry.tracked_refinement import register_final_round as register

    fingerprint = cache.recipe_on_data("au_cotrain", data_ref, recipe, workspace).fingerprint()
    return register(tracked, data_ref, fingerprint, workspace=workspace)


@task(name="test-sets", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def test_sets_for(network: str, workspace: Workspace) -> list[str]:
    """Registered evaluation-only test sets of the network's data task."""
    from fer_core.models.catalog import get_network
    from fer_core.training.tasks import get_task_kind
    from registry.evaluation import registered_test_sets

    return registered_test_sets(get_task_kind(get_network(network).task).data_task, workspace=workspace)


@task(name="evaluate-version", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def evaluate_version(network: str, version: int, data_ref: str, workspace: Workspace,
                     triton_url: str | None = None) -> dict[str, Any]:
    """``fer evaluate``: one MLflow evaluation run of a version on a dataset; returns its JSON summary."""
    from registry.evaluation import evaluate

    return evaluate(network, data_ref, version=version, url=triton_url, workspace=workspace).to_dict()


@task(name="plan-loso", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def plan_loso_protocol(network: str, data_refs: list[str], recipe: Recipe, workspace: Workspace,
                       subjects: list[str] | None = None) -> dict[str, Any]:
    """Resolve the LOSO data (several refs: the MEGC composite) and open or find its parent run."""
    from registry.protocols import plan_loso

    return plan_loso(network, data_refs, recipe, subjects=subjects, workspace=workspace).__dict__


@task(name="train-loso-fold", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def train_loso_fold_task(plan: dict[str, Any], subject: str, recipe: Recipe, workspace: Workspace) -> str:
    """One held-out subject as a child run (kept when it finished before); its run id."""
    from registry.protocols import LosoPlan, train_loso_fold

    return train_loso_fold(LosoPlan(**_plan_fields(plan)), subject, recipe, workspace=workspace)


@task(name="finish-loso", cache_policy=NO_CACHE)
def finish_loso_protocol(plan: dict[str, Any], workspace: Workspace) -> dict[str, Any]:
    """Pool every fold's saved predictions into the parent run; refuses while a fold is missing."""
    import dataclasses

    from registry.protocols import LosoPlan, finish_loso

    return dataclasses.asdict(finish_loso(LosoPlan(**_plan_fields(plan)), workspace=workspace))


def _plan_fields(plan: Mapping[str, Any]) -> dict[str, Any]:
    return {**plan, "subjects": tuple(plan["subjects"]), "parts": tuple(plan.get("parts", ()))}


@task(name="publish-table", cache_policy=NO_CACHE)
def publish_table(rows: list[dict[str, Any]], key: str, description: str) -> None:
    """A Prefect table artifact (shown on the flow run's page)."""
    create_table_artifact(rows, key=key, description=description)


# The MLflow UI of the embedded default (`fer ui`'s address) when the tracking URI is no server.
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
LINK_COLUMNS = ("mlflow run", "model version", "data docs")


@task(name="mlflow-links", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def mlflow_links(version: reg.ModelVersion, workspace: Workspace) -> tuple[str, str]:
    """UI addresses of the version's MLflow run and of the registered version itself: the tracking
    server's own UI, or ``fer ui``'s default address for the embedded SQLite store."""
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking

    uri = setup_tracking(workspace)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_MLFLOW_UI
    experiment = MlflowClient().get_run(version.run_id).info.experiment_id
    return (f"{base}/#/experiments/{experiment}/runs/{version.run_id}",
            f"{base}/#/models/{reg.registered_name(version.network)}/versions/{version.version}")


def data_docs_link(gx_docs: Path) -> str:
    """The Data Docs index of the workspace's GX project (every validation run, newest first)."""
    return (Path(gx_docs) / "uncommitted" / "data_docs" / "local_site" / "index.html").resolve().as_uri()


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary(rows: list[dict[str, Any]], key: str, description: str) -> None:
    """The summary as a Prefect markdown artifact: one table row per network, the MLflow run, model
    version and Data Docs as links (the UI renders markdown links; table artifacts show plain text)."""
    columns = [c for c in rows[0] if c not in LINK_COLUMNS] if rows else []
    header = columns + ["links"]
    lines = [f"**{description}**", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        links = " · ".join(f"[{c}]({row[c]})" for c in LINK_COLUMNS if row.get(c))
        cells = [str(row.get(c, "")).replace("|", "\\|") for c in columns] + [links]
        lines.append("| " + " | ".join(cells) + " |")
    create_markdown_artifact("\n".join(lines), key=key, description=description)
