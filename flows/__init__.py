"""Prefect 3 orchestration of the platform: flows that only wire tasks, tasks that only call libraries.

Flows (the entrypoints ``prefect.yaml`` deploys):

* ``flows/ingest.py:ingest``                 adapt a real-format source → data gate → DVC version
* ``flows/train.py:train``                   tracked training → ONNX export + parity → registered version
* ``flows/refine_au_labels.py:au_noisy_rounds``     AU co-training, then K label-refinement rounds
* ``flows/refine_au_labels.py:train_au_rounds``     the same, then the last round's model registered (retrain_all, au_rounds=K)
* ``flows/promote.py:promote``               gated promotion into Triton; rollback if the switch misbehaves
* ``flows/retrain_all.py:retrain_all``       the scheduled job over every network

Prefect reads its settings when it is imported, so :func:`configure_prefect` must run before the
first ``import prefect`` of a process (``fer pipeline`` and ``fer demo`` do that). This module
itself imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fer_platform.settings import Settings
from fer_platform.workspace import PRIVATE_UMASK

# Prefect's own variables: we only set defaults, so anything a user exported wins. Prefect's log
# level stays INFO: flow and task runs send their INFO logs to the API, which the UI shows.
_QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # A fresh SQLite database migrates for 10-30 s on a busy 2-core machine before the temporary
    # server answers; Prefect's default start-up timeout is too tight for that.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


# Libraries whose INFO chatter (HTTP requests, migrations, GX/DVC internals) would drown the flow
# runs' own logs; WARNING and above still get through.
NOISY_LOGGERS = ("httpx", "httpcore", "urllib3", "alembic", "botocore", "s3fs", "fsspec", "asyncio",
                 "great_expectations", "dvc", "dvc_data", "dvc_objects", "mlflow", "matplotlib", "filelock",
                 "numexpr", "PIL", "uvicorn", "docket", "onnxscript", "torch.onnx")


def quiet_libraries() -> None:
    """Raise the noisy libraries' loggers to WARNING (idempotent; runs when ``flows`` is imported,
    so flow runs started by a worker get it too)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_libraries()
# A flow run started by a worker never passes through `fer`'s entry point: the same private umask
# for what the flows write, for any process that imports them.
os.umask(PRIVATE_UMASK)


def prefect_home(settings: Settings) -> Path:
    """Where Prefect keeps its database and persisted task results: ``<FER_HOME>/prefect``."""
    return Path(settings.home) / "prefect"


def configure_prefect(settings: Settings) -> dict[str, str]:
    """Point Prefect at the workspace and keep it quiet and offline; returns what was set.

    ``PREFECT_HOME`` defaults to ``<FER_HOME>/prefect``. ``FER_PREFECT_API_URL`` (the settings'
    ``prefect_api_url``) becomes ``PREFECT_API_URL`` unless that is set already; without either,
    flows run against Prefect's temporary local API.
    """
    wanted = {"PREFECT_HOME": str(prefect_home(settings)), **_QUIET_DEFAULTS}
    if settings.prefect_api_url:
        wanted["PREFECT_API_URL"] = settings.prefect_api_url
    applied = {}
    for key, value in wanted.items():
        if not os.environ.get(key):
            os.environ[key] = value
            applied[key] = value
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return applied
