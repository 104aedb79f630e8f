"""Flows ``loso`` and ``loso-fold``: leave-one-subject-out as a tracked protocol run.

``loso`` plans the protocol (:func:`registry.protocols.plan_loso`: the data -- one dataset version, or
the MEGC 2019 composite of several -- and the parent MLflow run), trains the folds, then pools them
into the parent run. Where the folds train follows ``dispatch`` as ``retrain_all``'s training does
(:mod:`flows.dispatch`): on a Prefect server whose ``loso-fold`` deployment sits on a work pool, each
unfinished fold is its own ``loso-fold`` flow run, so the pool's workers train folds in parallel (they
share the workspace, ``FER_HOME``); otherwise the folds run here, one after another. Either way a
fold that finished before is kept, so a re-run resumes.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from fer_platform.workspace import Workspace
from flows.dispatch import train_on_pool, wait_for
from flows.steps import finish_loso_protocol, plan_loso_protocol, recipe_for, train_loso_fold_task

FOLD_DEPLOYMENT = "loso-fold/loso-fold"


def _refs(data_ref: str | list[str]) -> list[str]:
    return [data_ref] if isinstance(data_ref, str) else list(data_ref)


@flow(name="loso", flow_run_name="loso-{network}")
def loso(network: str, data_ref: str | list[str], profile: str = "quick", overrides: dict[str, Any] | None = None,
         subjects: list[str] | None = None, dispatch: str = "auto") -> dict[str, Any]:
    """LOSO of ``network`` on ``data_ref`` (a list of refs: their composite); pooled metrics and run ids.

    ``dispatch``: ``pool`` runs every fold as a ``loso-fold`` flow run on the work pool, ``local`` here,
    ``auto`` the pool when the API is a server with that deployment.
    """
    from prefect.deployments import run_deployment

    recipe = recipe_for(network, profile, overrides)
    workspace = Workspace.load().ensure()  # this flow run's platform context
    plan = plan_loso_protocol(network, _refs(data_ref), recipe, workspace, subjects)
    if train_on_pool(dispatch, FOLD_DEPLOYMENT):
        runs = [run_deployment(FOLD_DEPLOYMENT, timeout=0, flow_run_name=f"loso-fold-{network}-{subject}",
                               parameters={"network": network, "data_ref": _refs(data_ref), "profile": profile,
                                           "overrides": overrides, "subject": subject, "subjects": subjects})
                for subject in plan["subjects"]]
        states = wait_for([r.id for r in runs])
        failed = [s for s, r in zip(plan["subjects"], runs) if not states[r.id].is_completed()]
        if failed:
            raise RuntimeError(f"LOSO folds {failed} failed on the work pool; a re-run resumes with them")
        get_run_logger().info("%d folds trained on the work pool", len(runs))
    else:
        for subject in plan["subjects"]:
            train_loso_fold_task(plan, subject, recipe, workspace)
    return finish_loso_protocol(plan, workspace)


@flow(name="loso-fold", flow_run_name="loso-fold-{network}-{subject}")
def loso_fold(network: str, data_ref: str | list[str], subject: str, profile: str = "quick",
              overrides: dict[str, Any] | None = None, subjects: list[str] | None = None) -> str:
    """One fold of a LOSO protocol (what ``loso`` starts on the work pool); the child run id."""
    recipe = recipe_for(network, profile, overrides)
    workspace = Workspace.load().ensure()
    plan = plan_loso_protocol(network, _refs(data_ref), recipe, workspace, subjects)  # finds the parent run
    return train_loso_fold_task(plan, subject, recipe, workspace)
