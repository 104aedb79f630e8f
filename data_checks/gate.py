"""Run the data gate on a prepared dataset: decode, derive, validate with GX, report, write Data Docs.

::

    report = validate_dataset(root)                     # never raises for bad data
    report.raise_for_failure()                          # GateFailed naming each failed check
    validate_dataset(root, docs_dir=ws.gx_docs)         # also renders GX Data Docs (HTML)

Without ``docs_dir`` GX runs in an ephemeral context (nothing kept). With it, ``docs_dir`` is a
file-backed GX project (``great_expectations.yml``, suites, checkpoints, validation results) and the
checkpoint's ``UpdateDataDocsAction`` renders the run into ``uncommitted/data_docs/local_site``.

What GX validates is the *gate table*: the manifest plus the per-sample columns computed in Python
(``exists``, ``decodes``, ``height``, ``channels``, ``pixel_hash``, split overlap...), written as
parquet. GX reads it through its own pandas-filesystem data source (``tables/<dataset>/<key>.parquet``
in the project, data asset ``<dataset>``), so the saved checkpoint ``<dataset>@<key>`` re-run with
GX's API, ``context.checkpoints.get("<dataset>@<key>").run()``, reproduces the verdict exactly.
``key`` is the dataset version (DVC hash) when the caller knows it, else ``table-<sha256 prefix>``.
With ``store_table=True`` the table is also written as ``gate.parquet`` next to the manifest, so
it is versioned with the data (the version then covers it; the GX copy is a hard link).

Choices: one suite per key (``<dataset>@<key>.<task>``), so re-running an old checkpoint uses the
bounds it was gated with; GX project writes are serialised by a workspace lock and made atomic
(temporary file + fsync + rename, installed into GX's file-writing modules), so concurrent gates
or a full disk never leave ``great_expectations.yml`` corrupt or truncated.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pandas as pd

import great_expectations as gx
from great_expectations.data_context import AbstractDataContext
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig
from filelock import FileLock

import great_expectations.data_context.data_context.file_data_context as _gx_project_file
import great_expectations.data_context.store.tuple_store_backend as _gx_store_files
from fer_core.atomic import open_writes_atomically

from data_checks.sample_checks import inspect_samples
from data_checks.suites import CLIP_TASKS, GateBounds, build_suite, gate_frame
from fer_core.data.manifest import TASKS, read_card, read_manifest

DATASOURCE = "fer_gate_tables"
TABLES_DIR = "tables"  # inside the GX project: the tables its checkpoints read
GATE_TABLE = "gate.parquet"  # next to the manifest when the table is stored with the dataset
LOCK_TIMEOUT_S = 900.0

# GX writes its project config and stores with open(path, "w"): a full disk truncates them (a 4 KB
# great_expectations.yml that no later run can load). Its modules get an ``open`` whose whole-file
# writes go through a temporary file + fsync + rename; reads are untouched.
_gx_project_file.open = open_writes_atomically  # type: ignore[attr-defined]
_gx_store_files.open = open_writes_atomically  # type: ignore[attr-defined]
# Unexpected rows kept per expectation: enough for messages and Data Docs, bounded for 32k-row sets.
PARTIAL_UNEXPECTED = 20
EXAMPLES_IN_MESSAGE = 5


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one expectation, named by its gate check (``meta["check"]``)."""

    name: str
    expectation: str  # GX type, e.g. "expect_column_values_to_be_unique"
    columns: tuple[str, ...]
    success: bool
    element_count: int | None = None
    unexpected_count: int | None = None
    examples: tuple[str, ...] = ()  # offending rows: "id (column=value)"
    observed: str | None = None  # for table-level expectations (missing splits, columns...)
    error: str | None = None  # the expectation could not be evaluated (e.g. a column is missing)

    def describe(self) -> str:
        """One line: check, expectation and column(s), then counts and examples or what was seen."""
        head = f"{self.name} [{self.expectation} on {', '.join(self.columns) or 'table'}]"
        if self.error:
            return f"{head}: could not be evaluated: {self.error}"
        if self.unexpected_count is not None:
            text = f"{head}: {self.unexpected_count} of {self.element_count} rows unexpected"
            if self.examples:
                text += f"; e.g. {'; '.join(self.examples[:EXAMPLES_IN_MESSAGE])}"
            return text
        return f"{head}: {self.observed or 'failed'}"


@dataclass(frozen=True)
class GateReport:
    """What the gate found in one prepared dataset."""

    success: bool
    dataset: str
    task: str
    num_rows: int
    results: list[ExpectationOutcome] = field(default_factory=list)
    docs_index: Path | None = None
    seconds: float = 0.0
    run_name: str = ""  # "<dataset>@<key>": the GX checkpoint and validation run of this verdict
    table: Path | None = None  # the gate table GX validated (inside the GX project when kept)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [r for r in self.results if not r.success]

    @property
    def failed_checks(self) -> list[str]:
        return [r.name for r in self.failures]

    def summary(self) -> str:
        """A human-readable verdict, one line per failed check."""
        verdict = "passed" if self.success else f"failed {len(self.failures)} of {len(self.results)} checks"
        lines = [f"data gate {verdict} for dataset {self.dataset!r} (task {self.task}, {self.num_rows} rows)"]
        lines += [f"  - {outcome.describe()}" for outcome in self.failures]
        if self.docs_index is not None:
            lines.append(f"  Data Docs: {self.docs_index}")
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        """Raise :class:`GateFailed` unless every expectation passed."""
        if not self.success:
            raise GateFailed(self)


class GateFailed(Exception):
    """A prepared dataset failed the data gate; ``report`` holds the details."""

    def __init__(self, report: GateReport) -> None:
        super().__init__(report.summary())
        self.report = report


def validate_dataset(
    root: Path,
    *,
    docs_dir: Path | None = None,
    bounds: GateBounds | None = None,
    version: str | Callable[[Path], str] | None = None,
    store_table: bool = False,
) -> GateReport:
    """Validate the prepared dataset at ``root`` against its task's suite.

    Raises ``ValueError`` only when ``root`` is not a prepared dataset (no manifest or card, or a card
    of unknown task); everything wrong with the data itself is reported, not raised.
    ``docs_dir``: a GX project folder (e.g. ``Workspace.gx_docs``) to keep the checkpoint, its table
    and Data Docs in. ``version``: the dataset version the run is named after, or a function of
    ``root`` computing it once ``gate.parquet`` is written (``store_table=True`` writes it there).
    """
    start = time.perf_counter()
    root = Path(root)
    card = read_card(root)
    if card.task not in TASKS:
        raise ValueError(f"{root}: card task {card.task!r} is not one of {', '.join(TASKS)}")
    manifest = read_manifest(root)
    bounds = bounds or GateBounds()

    samples = inspect_samples(root, manifest, clips=card.task in CLIP_TASKS)
    frame = gate_frame(manifest, samples, card)
    has_labels = "label" in frame.columns and bool(pd.to_numeric(frame["label"], errors="coerce").ge(0).any())
    table_bytes = _parquet_bytes(frame)
    if store_table:
        _write_bytes(root / GATE_TABLE, table_bytes)
    if callable(version):
        version = version(root)
    key = version or f"table-{hashlib.sha256(table_bytes).hexdigest()[:16]}"
    suite = build_suite(card, bounds, manifest.columns, has_labels=has_labels)
    suite.name = f"{card.name}@{key}.{card.task}"
    run_name = f"{card.name}@{key}"
    if docs_dir is None:
        with tempfile.TemporaryDirectory(prefix="fer-gate-") as scratch:
            outcomes, docs_index, table = _run_checkpoint(
                suite, frame, table_bytes, root / GATE_TABLE if store_table else None,
                asset=card.name, key=key, project=None, tables=Path(scratch))
        table = None
    else:
        with _project_lock(Path(docs_dir)):
            outcomes, docs_index, table = _run_checkpoint(
                suite, frame, table_bytes, root / GATE_TABLE if store_table else None,
                asset=card.name, key=key, project=Path(docs_dir), tables=Path(docs_dir) / TABLES_DIR)
    return GateReport(
        success=all(o.success for o in outcomes),
        dataset=card.name,
        task=card.task,
        num_rows=len(manifest),
        results=outcomes,
        docs_index=docs_index,
        seconds=time.perf_counter() - start,
        run_name=run_name,
        table=table,
    )


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    """The gate table as parquet (deterministic for the same frame: the key hashes it)."""
    import io

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    from fer_core.atomic import atomic_write_bytes

    atomic_write_bytes(path, data)


@contextmanager
def _project_lock(project: Path) -> Iterator[None]:
    """One gate at a time per GX project (GX rewrites its config and stores on every run)."""
    project.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(project.parent / f".{project.name}.lock"), timeout=LOCK_TIMEOUT_S):
        yield


def _place_table(data: bytes, stored: Path | None, path: Path) -> None:
    """The table GX reads: a hard link to the one stored with the dataset (one copy on disk), else
    an atomic write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if stored is not None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
        try:
            tmp.unlink(missing_ok=True)
            os.link(stored, tmp)
            os.replace(tmp, path)
            return
        except OSError:
            tmp.unlink(missing_ok=True)
    _write_bytes(path, data)


def _context(docs_dir: Path | None) -> AbstractDataContext:
    """An ephemeral GX context, or the file project at ``docs_dir``; progress bars off either way."""
    if docs_dir is None:
        context = gx.get_context(mode="ephemeral")
    else:
        Path(docs_dir).mkdir(parents=True, exist_ok=True)
        context = gx.get_context(mode="file", context_root_dir=str(Path(docs_dir).resolve()))
    # tqdm bars per metric batch would flood logs of flows and CLI runs.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _run_checkpoint(
    suite: gx.ExpectationSuite, frame: pd.DataFrame, table_bytes: bytes, stored: Path | None, *,
    asset: str, key: str, project: Path | None, tables: Path,
) -> tuple[list[ExpectationOutcome], Path | None, Path]:
    """Validate the gate table with ``suite`` through the checkpoint ``<asset>@<key>``.

    Returns (outcomes in suite order, Data Docs index or None, the table GX read).
    """
    relative = Path(asset) / f"{key}.parquet"
    _place_table(table_bytes, stored, tables / relative)
    if project is not None:
        _repoint_tables(project, tables)
    context = _context(project)
    try:
        source = context.data_sources.get(DATASOURCE)
    except (KeyError, ValueError):
        source = context.data_sources.add_pandas_filesystem(name=DATASOURCE, base_directory=tables.resolve())
    try:
        data_asset = source.get_asset(asset)
    except LookupError:
        data_asset = source.add_parquet_asset(name=asset)
    try:
        batch_definition = data_asset.get_batch_definition(key)
    except KeyError:
        batch_definition = data_asset.add_batch_definition_path(name=key, path=str(relative))

    persistent = project is not None
    suite = context.suites.add_or_update(suite) if persistent else context.suites.add(suite)
    name = f"{asset}@{key}"
    validation = gx.ValidationDefinition(name=name, data=batch_definition, suite=suite)
    factory = context.validation_definitions
    validation = factory.add_or_update(validation) if persistent else factory.add(validation)
    actions = [gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")] if persistent else []
    checkpoint = gx.Checkpoint(
        name=name,
        validation_definitions=[validation],
        actions=actions,
        result_format={
            "result_format": "SUMMARY",
            "partial_unexpected_count": PARTIAL_UNEXPECTED,
            "unexpected_index_column_names": ["row"],
        },
    )
    checkpoint = context.checkpoints.add_or_update(checkpoint) if persistent else context.checkpoints.add(checkpoint)
    result = checkpoint.run(run_id=RunIdentifier(run_name=name))
    ids = frame["id"].astype("string") if "id" in frame.columns else pd.Series(pd.NA, index=frame.index)
    outcomes = outcomes_of(result, ids)
    order = {e.meta["check"]: i for i, e in enumerate(suite.expectations)}
    outcomes.sort(key=lambda o: order.get(o.name, len(order)))

    docs_index = None
    if persistent:
        from data_checks.docs import vendor_data_docs

        docs_index = vendor_data_docs(context)
    return outcomes, docs_index, tables / relative


def _repoint_tables(project: Path, tables: Path) -> None:
    """Point the tables data source at this project's ``tables/`` after the workspace was moved or
    copied. GX checks a relative ``base_directory`` against the current directory, so the config
    holds an absolute one; this rewrites that one value (atomically) when it is stale."""
    from ruamel.yaml import YAML

    config = project / "great_expectations.yml"
    if not config.is_file():
        return
    yaml = YAML()
    data = yaml.load(config.read_text())
    source = (data.get("fluent_datasources") or {}).get(DATASOURCE)
    if source is None or Path(str(source.get("base_directory"))) == tables.resolve():
        return
    source["base_directory"] = str(tables.resolve())
    import io

    buffer = io.StringIO()
    yaml.dump(data, buffer)
    from fer_core.atomic import atomic_write_text

    atomic_write_text(config, buffer.getvalue())


def outcomes_of(result: Any, ids: pd.Series | None = None) -> list[ExpectationOutcome]:
    """The outcomes of a GX ``CheckpointResult`` (e.g. of a checkpoint re-run with GX's API)."""
    ids = ids if ids is not None else pd.Series(dtype="string")
    return [
        _outcome(r, ids)
        for validation_result in result.run_results.values()
        for r in validation_result.results
    ]


def _outcome(result: Any, ids: pd.Series) -> ExpectationOutcome:
    """Condense one GX ExpectationValidationResult."""
    config = result.expectation_config
    kwargs = config.kwargs
    columns = tuple(str(kwargs[k]) for k in ("column", "column_A", "column_B") if k in kwargs)
    details: Mapping[str, Any] = result.result or {}
    error = _exception_message(result.exception_info)
    examples = tuple(_example(index, ids) for index in details.get("partial_unexpected_index_list") or ())
    observed = None
    if "partial_missing_list" in details:
        observed = f"missing {list(details['partial_missing_list'])}"
    elif "details" in details and "mismatched" in details["details"]:
        missing = details["details"]["mismatched"].get("missing")
        observed = f"missing columns {missing}" if missing else None
    if observed is None and "observed_value" in details:
        observed = f"observed {details['observed_value']!r}"
    if not result.success and error is None and not details:
        error = "no result (is a column missing?)"
    return ExpectationOutcome(
        name=(config.meta or {}).get("check", config.type),
        expectation=config.type,
        columns=columns,
        success=bool(result.success),
        element_count=details.get("element_count"),
        unexpected_count=details.get("unexpected_count"),
        examples=examples,
        observed=observed,
        error=error,
    )


def _example(index: Any, ids: pd.Series) -> str:
    """"<id> (column=value, ...)" for one unexpected row; ``index`` is GX's {row, column: value} dict."""
    if not isinstance(index, Mapping):
        return str(index)
    row = index.get("row")
    sample_id = ids.iloc[int(row)] if row is not None and 0 <= int(row) < len(ids) else pd.NA
    label = f"row {row}" if pd.isna(sample_id) else str(sample_id)
    values = ", ".join(f"{k}={_short(v)}" for k, v in index.items() if k != "row")
    return f"{label} ({values})" if values else label


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exception_message(info: Any) -> str | None:
    """GX reports exceptions flat ({raised_exception, exception_message}) or per metric (nested)."""
    if not info:
        return None
    if isinstance(info, Mapping) and "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    messages = []
    for value in (info.values() if isinstance(info, Mapping) else [info]):
        message = getattr(value, "exception_message", None)
        if message is None and isinstance(value, Mapping):
            message = value.get("exception_message")
        if message:
            messages.append(str(message).strip().splitlines()[-1])
    return "; ".join(dict.fromkeys(messages)) or None
