"""``fer data``: generate, adapt, validate, version, restore and preview datasets.

``fer data add`` is the data layer's pipeline: adapt the real layout into a prepared dataset →
Great Expectations gate → DVC version + push. A failed gate adds nothing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from fer_core.errors import UsageError

from fer_cli.main import EXIT_ERROR, CommandError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data", help="generate, validate, version and restore datasets",
        description="Datasets: real formats in, gated and DVC-versioned prepared data out. "
        "Versions are DVC content hashes; refer to one as NAME@VERSION (a unique prefix is enough).",
    )
    cmds = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = cmds.add_parser("formats", help="list the dataset formats the platform reads")
    p.set_defaults(func=_formats)

    p = cmds.add_parser("synth", help="write generated SynthFACS data in a real dataset's on-disk format",
                        description="Render SynthFACS faces with known ground truth and write them in the "
                        "real layout of FORMAT, ready for `fer data add`.")
    p.add_argument("format", help="format name (see `fer data formats`)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--size", type=int, default=None, help="number of samples or clips (format default if unset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=float, default=0.0, help="nuisance level in [0, 1]")
    p.set_defaults(func=_synth)

    p = cmds.add_parser("add", help="adapt → validate (GX gate) → version (DVC) → push",
                        description="Adapt SOURCE (in the real layout of --format) into a prepared dataset, "
                        "run the data gate, then version it with DVC and push it to the remote. A failed "
                        "gate prints the failed expectations, writes Data Docs and adds nothing (exit 1).")
    p.add_argument("name", help="dataset name (lower-case letters, digits, - _ .)")
    p.add_argument("source", type=Path, help="file or folder in the real dataset layout")
    p.add_argument("--format", "-f", dest="format_name", required=True, help="format name (see `fer data formats`)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="adapter option, value parsed as YAML (repeatable), e.g. -o ferplus=fer2013new.csv")
    p.add_argument("--drop-cross-split-duplicates", action="store_true",
                   help="drop val/test rows whose pixels also occur in an earlier split (FER2013 has ~630); "
                   "recorded in the dataset card")
    p.set_defaults(func=_add)

    p = cmds.add_parser("validate", help="run the data gate on a source without versioning it")
    p.add_argument("source", type=Path, help="a prepared dataset folder, or a source with --format")
    p.add_argument("--format", "-f", dest="format_name", default=None)
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_validate)

    p = cmds.add_parser("list", help="list dataset versions")
    p.add_argument("name", nargs="?", default=None)
    p.set_defaults(func=_list)

    p = cmds.add_parser("pull", help="restore NAME@VERSION into the workspace from the DVC remote")
    p.add_argument("ref", help="NAME@VERSION, or NAME for the newest version")
    p.set_defaults(func=_pull)

    p = cmds.add_parser("preview", help="save a contact sheet PNG of a dataset so a person can see the faces")
    p.add_argument("dataset", help="NAME[@VERSION] in the store, or a prepared dataset folder")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: <workspace>/previews/<name>.png)")
    p.add_argument("--count", type=int, default=40, help="number of samples to show")
    p.set_defaults(func=_preview)


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"option {pair!r} must look like KEY=VALUE")
        try:
            options[key.replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UsageError(f"option {key}: {value!r} is not a YAML value "
                             f"({getattr(exc, 'problem', None) or 'syntax error'})") from None
    return options


def _formats(args: argparse.Namespace) -> int:
    from fer_core.data.formats import list_formats

    for fmt in list_formats():
        synth = "synth" if fmt.write_synthetic else "     "
        print(f"{fmt.name:14s} {fmt.task:8s} {synth}  {fmt.description}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from fer_core.data.formats import get_format

    fmt = get_format(args.format)
    if fmt.write_synthetic is None:
        raise ValueError(f"format {fmt.name!r} has no synthetic writer")
    kwargs: dict[str, Any] = {"seed": args.seed, "difficulty": args.difficulty}
    if args.size is not None:
        kwargs["size"] = args.size
    start = time.perf_counter()
    path = fmt.write_synthetic(args.out, **kwargs)
    print(f"wrote generated {fmt.name} data to {path} in {time.perf_counter() - start:.1f}s")
    print(f"next: fer data add <name> {path} --format {fmt.name}")
    return 0


def _gate(prepared: Path, docs_dir: Path, version=None, store_table: bool = False):
    from data_checks import validate_dataset

    return validate_dataset(prepared, docs_dir=docs_dir, version=version, store_table=store_table)


def _print_gate(report) -> None:
    status = "passed" if report.success else "FAILED"
    failed = [r for r in report.results if not r.success]
    print(f"data gate {status}: {len(report.results) - len(failed)}/{len(report.results)} expectations "
          f"on {report.num_rows} rows in {report.seconds:.1f}s")
    if report.run_name:
        print(f"gate run: {report.run_name}")
    if report.docs_index:
        print(f"Data Docs: {report.docs_index}")


def _adapt_into(staging_root: Path, format_name: str, source: Path, name: str, options: dict) -> Path:
    from fer_core.data.formats import adapt

    prepared = staging_root / name
    adapt(format_name, source, prepared, name=name, **options)
    return prepared


def _add(args: argparse.Namespace) -> int:
    from data_checks import GateFailed
    from fer_platform.workspace import Workspace
    from registry.datasets import DataVersionError, DatasetStore, check_dataset_name, content_version

    name = check_dataset_name(args.name)
    options = _parse_options(args.option)
    if args.drop_cross_split_duplicates:
        options["drop_cross_split_duplicates"] = True
    workspace = Workspace.load().ensure()
    store = DatasetStore(workspace)
    start = time.perf_counter()
    try:
        # One add per name at a time: the second waits, then versions its own data.
        with store.lock(name):
            store.recover(name)
            staging = store.staging(name)  # leftovers of a crashed add are removed here
            try:
                prepared = _adapt_into(staging, args.format_name, args.source, name, options)
                adapted = time.perf_counter()
                # The gate table is stored with the data, and the run is named after the version.
                report = _gate(prepared, workspace.gx_docs, version=content_version, store_table=True)
                _print_gate(report)
                try:
                    report.raise_for_failure()
                except GateFailed as exc:
                    raise CommandError(f"{name}: nothing was added.\n{exc}", EXIT_ERROR) from None
                gated = time.perf_counter()
                version = store.add(name, prepared, source=str(args.source.resolve()),
                                    extra={"format": args.format_name, "options": options,
                                           "gate_run": report.run_name})
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (DataVersionError, OSError) as exc:
        raise CommandError(f"{name}: nothing was added: {_one_line(exc)}", EXIT_ERROR) from None
    done = time.perf_counter()
    print(f"added {version.ref} ({version.num_samples} samples, {version.num_files} files, "
          f"{version.size_bytes / 1e6:.1f} MB)")
    print(f"time: adapt {adapted - start:.1f}s, gate {gated - adapted:.1f}s, "
          f"version+push {done - gated:.1f}s, total {done - start:.1f}s")
    return 0


def _one_line(exc: BaseException) -> str:
    """A reason in one line: disk full and other OS errors by their ``strerror``, else the message."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _validate(args: argparse.Namespace) -> int:
    from fer_platform.workspace import Workspace

    workspace = Workspace.load().ensure()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = args.source
        if args.format_name:
            prepared = _adapt_into(Path(tmp), args.format_name, args.source, "candidate",
                                   _parse_options(args.option))
        report = _gate(prepared, workspace.gx_docs)
        _print_gate(report)
        if not report.success:
            from data_checks import GateFailed

            raise CommandError(str(GateFailed(report)), EXIT_ERROR)
    return 0


def _list(args: argparse.Namespace) -> int:
    from fer_platform.workspace import Workspace
    from registry.datasets import DatasetStore

    store = DatasetStore(Workspace.load())
    versions = store.list(args.name)
    if not versions:
        print("no dataset versions yet: add one with `fer data add NAME SOURCE --format FORMAT`")
        return 0
    print(f"{'dataset':16s} {'version':12s} {'task':8s} {'format':10s} {'samples':>8s} {'MB':>8s}  created  (* checked out)")
    for v in versions:
        mark = "*" if store.checked_out(v.name) == v.version else " "
        print(f"{v.name:16s} {v.short:12s} {v.task:8s} {v.source_format:10s} {v.num_samples:8d} "
              f"{v.size_bytes / 1e6:8.1f}  {v.created_at} {mark}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from fer_platform.workspace import Workspace
    from registry.datasets import DatasetStore, parse_ref

    from registry.datasets import DataVersionError

    name, version = parse_ref(args.ref)
    start = time.perf_counter()
    try:
        path = DatasetStore(Workspace.load()).pull(name, version)
    except (DataVersionError, OSError) as exc:
        raise CommandError(f"{args.ref}: {_one_line(exc)}", EXIT_ERROR) from None
    print(f"restored {args.ref} to {path} in {time.perf_counter() - start:.1f}s")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from fer_core.data.preview import dataset_contact_sheet
    from fer_platform.workspace import Workspace

    workspace = Workspace.load()
    root = Path(args.dataset)
    if not (root / "manifest.parquet").is_file():
        from registry.datasets import DatasetStore, parse_ref

        name, version = parse_ref(args.dataset)
        store = DatasetStore(workspace)
        root = store.pull(name, version) if version else store.path(name)
        if not root.is_dir():
            root = store.pull(name, None)
    out = args.out or workspace.root / "previews" / f"{root.name}.png"
    dataset_contact_sheet(root, out, count=args.count)
    print(f"contact sheet: {out}")
    return 0
