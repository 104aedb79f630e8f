"""Where ``retrain_all`` trains, and which lock a promotion takes, on a real Prefect server.

Embedded default (Prefect's temporary API, ``fer pipeline run``): every network trains as an
in-process sub-flow, and a promotion holds the per-host ``flock`` of ``registry.promotion``.

On a Prefect server whose ``train/train`` deployment sits on a work pool, each network's training
is its own flow run of that deployment (``run_deployment``), so the pool's workers train networks in
parallel, and promotions additionally hold a Prefect *global concurrency limit* of one slot per
network (``fer-promote-<network>``), which excludes promotions on other hosts too. The flock stays
inside: it is what the embedded default and ``fer promote`` rely on.

Ambiguity: "a server with a work pool" is read as "the API is a server (``PREFECT_API_URL`` set)
and the ``train`` deployment exists with a work pool"; ``dispatch="local"`` forces sub-flows.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator
from uuid import UUID

TRAIN_DEPLOYMENT = "train/train"
PROMOTION_LIMIT = "fer-promote-{network}"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def on_server() -> bool:
    """Is Prefect talking to a server (rather than its temporary in-process API)?"""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL"))


def train_on_pool(dispatch: str = "auto", deployment_name: str = TRAIN_DEPLOYMENT) -> bool:
    """Train through the work pool of ``deployment_name`` (default ``train/train``) (``pool``), in
    process (``local``), or whichever the API offers (``auto``)."""
    if dispatch not in {"auto", "pool", "local"}:
        raise ValueError(f"dispatch must be auto, pool or local, not {dispatch!r}")
    if dispatch == "local" or (dispatch == "auto" and not on_server()):
        return False
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            if dispatch == "pool":
                raise ValueError(f"dispatch='pool' needs the deployment {deployment_name} "
                                 "(prefect --no-prompt deploy --all)") from None
            return False
    return bool(deployment.work_pool_name)


def submit_training(network: str, data_ref: str, profile: str, overrides: dict[str, Any] | None) -> UUID:
    """Start a ``train/train`` flow run on the pool (a child of the current flow run); its id."""
    from prefect.deployments import run_deployment

    run = run_deployment(TRAIN_DEPLOYMENT, timeout=0, flow_run_name=f"train-{network}",
                         parameters={"network": network, "data_ref": data_ref, "profile": profile,
                                     "overrides": overrides})
    return run.id


def wait_for(flow_run_ids: list[UUID], poll_s: float = 2.0, timeout_s: float = 6 * 3600) -> dict[UUID, Any]:
    """Wait until every flow run is final; id → its final state."""
    from prefect import get_client

    states: dict[UUID, Any] = {}
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while len(states) < len(flow_run_ids):
            for run_id in flow_run_ids:
                if run_id not in states:
                    run = client.read_flow_run(run_id)
                    if run.state is not None and run.state.type.value in TERMINAL:
                        states[run_id] = run.state
            if len(states) < len(flow_run_ids):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"training flow runs still running after {timeout_s:.0f}s")
                time.sleep(poll_s)
    return states


@contextlib.contextmanager
def promotion_slot(network: str, timeout_s: float = 600.0) -> Iterator[None]:
    """Hold the network's global concurrency limit (created with one slot when missing) on a server;
    nothing on the temporary API, where the flock inside ``registry.promotion`` suffices."""
    if not on_server():
        yield
        return
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = PROMOTION_LIMIT.format(network=network)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield
