"""``fer train`` (one training run, tracked in MLflow) and ``fer ui`` (the MLflow UI)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fer_core.errors import StateError, UsageError


def port_number(text: str) -> int:
    """argparse type: a TCP port 1..65535 (argparse turns the ValueError into a usage error)."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return port


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train one network on one dataset version (tracked in MLflow)",
        description="Train NETWORK on a DVC-versioned dataset with a recipe profile, log the run to MLflow "
        "(params, per-epoch metrics, plots, checkpoint, model) and print a summary. "
        "A killed run continues with --resume (same network, data version and recipe).",
    )
    p.add_argument("network", help="network to train (see `fer train --list`)", nargs="?")
    p.add_argument("--data", "-d", action="append", default=None,
                   help="dataset as NAME@VERSION (or NAME for its newest version); with --protocol loso it may be "
                   "given several times: the MEGC 2019 composite of those micro-expression sets (e.g. "
                   "-d casme2 -d samm -d smic, each in the 3 composite classes), one LOSO over all their subjects")
    p.add_argument("--profile", "-p", default="quick", choices=("quick", "paper"),
                   help="quick: small and CPU-friendly; paper: the source method's hyper-parameters (GPU)")
    p.add_argument("--config", "-c", type=Path, default=None, help="YAML file of recipe overrides")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe value, e.g. --set lr=0.01 --set model_kwargs.width=32 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run of the same recipe and data")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--register", action="store_true",
                   help="after training: export to ONNX, check parity against PyTorch and register the run "
                   "as a new version of fer-NETWORK (alias challenger); promote it with `fer promote`")
    p.add_argument("--list", action="store_true", help="list trainable networks and their profiles")
    p.add_argument("--protocol", choices=("single", "loso", "kfold"), default="single",
                   help="single: one run (default); loso: leave-one-subject-out for micro-expression data, one "
                   "parent MLflow run with a child run per subject and pooled UF1/UAR, resumable fold by fold; "
                   "kfold: data with folds (DFEW), a child run per fold, mean ± std of the test metrics")
    p.add_argument("--folds", type=int, default=5, help="number of folds for --protocol kfold (DFEW: 5)")
    p.add_argument("--print-recipe", action="store_true",
                   help="print the resolved recipe (profile + --config + --set) as YAML and exit; needs no --data")
    p.set_defaults(func=_train)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for reviewing runs",
                       description="Serve the workspace's MLflow store (runs, plots, models, registry).")
    p.add_argument("--host", default=None,
                   help="bind address (default: FER_BIND_HOST, else 127.0.0.1; expose with care, see README)")
    p.add_argument("--port", type=port_number, default=5000, help="TCP port 1-65535 (default 5000)")
    p.set_defaults(func=_ui)


def _train(args: argparse.Namespace) -> int:
    from fer_core.models.catalog import network_specs
    from fer_core.training.recipe import parse_set_options
    from fer_core.training.tasks import get_task_kind

    if args.list:
        for spec in network_specs():
            kind = get_task_kind(spec.task)
            print(f"{spec.name:16s} task {spec.task:9s} trains on {kind.data_task:7s} data (default source "
                  f"{spec.data_format}); profiles: {', '.join(spec.profile_names)}; metric {spec.primary_metric}")
        return 0
    if not args.network:
        raise UsageError("give a NETWORK (see `fer train --list`)")
    from registry.training import resolve_recipe

    recipe = resolve_recipe(args.network, args.profile, args.config, parse_set_options(args.overrides))
    if args.print_recipe:
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    if not args.data:
        raise UsageError("give --data NAME@VERSION (see `fer train --help`)")
    if len(args.data) > 1 and args.protocol != "loso":
        raise UsageError("several --data make the composite of --protocol loso; other protocols take one")
    data_refs, args.data = args.data, args.data[0]

    from fer_platform.workspace import Workspace

    workspace = Workspace.load().ensure()  # this command's platform context
    if args.protocol == "loso":
        return _train_loso(args, data_refs, recipe, workspace)
    if args.protocol == "kfold":
        return _train_kfold(args, recipe, workspace)
    from registry.training import RunBusyError, RunExistsError, train_tracked

    try:
        outcome = train_tracked(args.network, args.data, recipe, resume=args.resume, track=not args.no_track,
                                workspace=workspace)
    except RunExistsError as exc:
        raise StateError(f"{exc} (pass --resume to continue it)") from None
    except RunBusyError as exc:
        raise StateError(str(exc)) from None
    from registry.datasets import DatasetStore, parse_ref
    from registry.training import measured_on

    source_format = DatasetStore(workspace).get(*parse_ref(outcome.data_ref)).source_format
    _print_summary(outcome.network, outcome.data_ref, outcome.result, outcome.run_id, outcome.run_dir,
                   measured_on(source_format, outcome.result.test_metrics))
    if args.register:
        if args.no_track:
            raise UsageError("--register needs the MLflow run: drop --no-track")
        from registry.export import export_and_register

        version = export_and_register(outcome, workspace=workspace)
        print(f"\nregistered fer-{outcome.network} version {version.version} "
              f"(parity passed: {version.tags.get('parity_passed')}); promote it: fer promote {outcome.network}")
    return 0


def _train_loso(args: argparse.Namespace, data_refs: list[str], recipe, workspace) -> int:
    from fer_core.models.catalog import get_network

    if get_network(args.network).task != "micro":
        raise UsageError(f"--protocol loso is for micro-expression networks; {args.network} is not one")
    if args.register or args.no_track:
        raise UsageError("--protocol loso is always tracked and registers nothing: drop --register/--no-track")
    from registry.protocols import train_loso

    outcome = train_loso(args.network, data_refs if len(data_refs) > 1 else data_refs[0], recipe, workspace=workspace)
    print(f"\nleave-one-subject-out: {len(outcome.per_fold)} folds"
          + (f" ({len(outcome.resumed_folds)} kept from an earlier run)" if outcome.resumed_folds else ""))
    print(f"  {'subject':14s} {'accuracy':>8s} {'UAR':>8s} {'UF1':>8s}")
    for subject, m in outcome.per_fold.items():
        print(f"  {subject:14s} {m['accuracy']:8.4f} {m['uar']:8.4f} {m['uf1']:8.4f}")
    for part, m in (outcome.per_part or {}).items():
        print(f"  {part + ' pooled':14s} {m['accuracy']:8.4f} {m['uar']:8.4f} {m['uf1']:8.4f}")
    p = outcome.pooled
    print(f"  {'pooled':14s} {p['accuracy']:8.4f} {p['uar']:8.4f} {p['uf1']:8.4f}")
    print(f"\n  mlflow parent run {outcome.parent_run_id} (experiment fer-{args.network})")
    return 0


def _train_kfold(args: argparse.Namespace, recipe, workspace) -> int:
    if args.folds < 2:
        raise UsageError(f"--folds must be >= 2, got {args.folds}")
    if args.register or args.no_track:
        raise UsageError("--protocol kfold is always tracked and registers nothing: drop --register/--no-track")
    from registry.protocols import train_kfold

    outcome = train_kfold(args.network, args.data, recipe, folds=args.folds, workspace=workspace)
    print(f"\n{args.folds}-fold cross-validation")
    print(f"  {'fold':8s} {'UAR':>8s} {'WAR':>8s}")
    for fold, m in outcome.per_fold.items():
        print(f"  {fold:<8d} {m.get('uar', float('nan')):8.4f} {m.get('war', float('nan')):8.4f}")
    for key in ("uar", "war"):
        if key in outcome.mean:
            print(f"  {key.upper()} {outcome.mean[key]:.4f} ± {outcome.std[key]:.4f}")
    print(f"\n  mlflow parent run {outcome.parent_run_id} (experiment fer-{args.network})")
    return 0


def _print_summary(network: str, data_ref: str, result, run_id: str | None, run_dir: Path,
                   measured: str = "") -> None:
    final = result.final_metrics
    rows = [("network", network), ("data", data_ref), ("epochs run", str(result.epochs_run)),
            ("best epoch", str(result.best_epoch + 1) if result.best_epoch >= 0
             else "none (no best.pt: metrics below are of the last epoch's weights)"),
            ("stopped early", str(result.stopped_early))]
    rows += [(k, f"{v:.4f}") for k, v in sorted(final.items()) if k.startswith("val/") and k.count("/") == 1]
    # The final evaluation (best weights) on the test split, or on val when there is no test split.
    mark = " (best)" if result.best_epoch >= 0 else " (last)"
    rows += [(f"{k}{mark}" if k in final else k, f"{v:.4f}") for k, v in sorted(result.test_metrics.items())
             if k.count("/") == 1]
    if measured:
        rows.append(("measured on", measured))
    rows += [("throughput", f"{final.get('throughput/samples_per_s', 0):.1f} samples/s"),
             ("checkpoint", str(result.best_checkpoint if result.best_epoch >= 0 else result.last_checkpoint))]
    if run_id:
        rows.append(("mlflow run", run_id))
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if run_id:
        print(f"\nreview it: fer ui   (then open the experiment fer-{network})")


def _ui(args: argparse.Namespace) -> int:
    from fer_platform.workspace import Workspace
    from registry.tracking import tracking_uri

    workspace = Workspace.load().ensure()  # this command's platform context
    uri = tracking_uri(workspace)
    host = args.host or workspace.settings.bind_host
    artifacts = workspace.mlflow_artifacts.resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("mlflow")
    # --artifacts-destination: uploads through the server's artifact proxy land in the workspace
    # (MLflow's default is ./mlartifacts under whatever folder `fer ui` was started from).
    cmd = [str(exe) if exe.exists() else "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", artifacts.as_uri(), "--artifacts-destination", artifacts.as_uri(),
           "--host", host, "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI on http://{host}:{args.port}  (store {uri}); Ctrl-C stops it", flush=True)
    # Its own process group, started in the workspace: on Ctrl-C or SIGTERM (raised here as
    # KeyboardInterrupt by fer's handler) the whole group goes, uvicorn's workers included.
    server = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                              cwd=workspace.mlflow_db.parent, start_new_session=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_group(server)


def _stop_group(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group of ``process`` (its own session), SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return  # the group is gone
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:  # a second Ctrl-C while stopping: kill it now
            continue
        # the leader exited; give the rest of its group (uvicorn workers) a moment, then end them too
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.2)
        if not _group_alive(process.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
