"""Flow ``promote``: a registered version → registry gates → Triton repository (beside the champion)
→ load → Triton smoke + latency gates → ensemble switch → aliases; then the ensemble must serve it,
else the previous champion is rolled back in.

A refusal by any gate is a *completed* flow whose result names the failed gates (nothing changed);
an ensemble that does not come up on the new version after the switch fails the flow after the
rollback. Triton: ``triton_url``, else ``FER_TRITON_URL``, else an embedded server for the flow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from fer_platform.workspace import Workspace
from flows.steps import ensemble_serves, model_version, promote_version, rollback_network, start_triton, stop_triton
from registry.promotion import PromotionResult


@flow(name="promote", flow_run_name="promote-{network}-v{version}")
def promote(network: str, version: int, gates: dict[str, Any] | None = None,
            triton_url: str | None = None) -> PromotionResult:
    """Promote ``version`` of ``network``; ``gates`` are :class:`registry.promotion.PromotionGates` fields."""
    workspace = Workspace.load().ensure()  # this flow run's platform context
    url = triton_url or workspace.settings.triton_url
    server = None
    if not url:
        server = start_triton(workspace)
        url = f"grpc://{server.grpc_url}"
    try:
        candidate = model_version(network, version, workspace)
        result = promote_version(candidate, gates or {}, url, workspace)
        if result.promoted and not ensemble_serves(network, version, url, workspace):
            if result.champion_before is not None:
                rollback_network(network, url, workspace)
            raise RuntimeError(f"{network}_ensemble does not serve v{version} after the switch"
                               + (f"; rolled back to v{result.champion_before}" if result.champion_before else ""))
        return result
    finally:
        if server is not None:
            stop_triton(server)
