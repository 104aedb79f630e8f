"""Flow ``ingest``: a source in a real dataset layout → prepared dataset → data gate → DVC version.

A failed gate fails the flow with the gate's report (every failed expectation by name) and
versions nothing: the prepared folder lives in a staging directory that is deleted either way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow

from fer_platform.workspace import Workspace
from flows.steps import adapt_source, data_gate, push_dataset, version_dataset
from registry.datasets import DatasetVersion, check_dataset_name


@flow(name="ingest", flow_run_name="ingest-{name}")
def ingest(name: str, fmt: str, source: str, options: dict[str, Any] | None = None) -> DatasetVersion:
    """Adapt ``source`` (format ``fmt``) into dataset ``name``, gate it, version it; returns the version."""
    check_dataset_name(name)
    workspace = Workspace.load().ensure()  # this flow run's platform context
    staging = workspace.dvc_repo / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    # Staging beside the DVC repository: the store *moves* the gated folder in (same filesystem).
    with tempfile.TemporaryDirectory(dir=staging) as tmp:
        prepared = adapt_source(fmt, Path(source), Path(tmp) / name, name, options or {})
        data_gate(prepared, workspace.gx_docs)
        version = version_dataset(name, prepared, str(Path(source).resolve()),
                                  {"format": fmt, "options": options or {}}, workspace)
    push_dataset(name, workspace)
    return version
