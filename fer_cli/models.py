"""``fer register`` / ``fer promote`` / ``fer rollback`` / ``fer models``: the registry ↔ serving commands.

Promotion and rollback talk to a running Triton at ``--url`` (or ``$FER_TRITON_URL``) that serves
the workspace's model repository, else to the running ``fer serve`` of the workspace (found by its
state file, see :mod:`serving.live`); only when neither exists do they start the embedded Triton over
that repository for the duration of the command, which leaves the repository ready for ``fer serve``.
``fer models`` reports what that Triton actually serves (its repository index), and the alerts of
``fer serve``'s reconciliation loop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from fer_cli.main import EXIT_ERROR, EXIT_SERVICE, EXIT_USAGE, CommandError

TRITON_URL_ENV = "FER_TRITON_URL"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register", help="export a training run to ONNX, check parity and register it as a new version",
        description="Export the best checkpoint of a finished MLflow training run to ONNX, compare ONNX "
        "Runtime with PyTorch on held-out test samples, log both to the run and register the run's model "
        "as a new version of fer-NETWORK (tags: data version + gate, git commit, recipe fingerprint, "
        "parity, metrics); the new version becomes the challenger.",
    )
    p.add_argument("network")
    p.add_argument("--run", required=True, metavar="RUN_ID", help="MLflow run id (printed by `fer train`)")
    p.add_argument("--atol", type=float, default=1e-4, help="parity tolerance on every output (default 1e-4)")
    p.add_argument("--no-challenger", action="store_true", help="do not move the challenger alias to it")
    p.add_argument("--face-detection", choices=("off", "haar"), default=None,
                   help="the version's face handling for full photos, stored in its package (default: haar "
                   "when the recipe aligned faces, else off; one choice per training run)")
    p.set_defaults(func=_register)

    p = sub.add_parser(
        "promote", help="gate a registered version and make it the champion Triton serves",
        description="Gates, by name: package (the version's package is whole and matches its hashes), "
        "data_gate, onnx_parity, metric_vs_champion (before anything is installed), then triton_smoke and latency_p95 on the new version served beside the champion. "
        "Only if all pass does the ensemble switch to it and the aliases move. A refusal lists each "
        "failed gate with its numbers, changes nothing and exits with 1.",
    )
    p.add_argument("network")
    p.add_argument("--version", type=int, default=None, help="version to promote (default: the challenger, "
                   "else the newest)")
    p.add_argument("--margin", type=float, default=0.02,
                   help="how much worse than the champion's primary metric it may be (default 0.02)")
    p.add_argument("--floor", type=float, default=0.2,
                   help="primary metric the first version must reach (default 0.2)")
    p.add_argument("--latency-budget-ms", type=float, default=100.0, help="p95 budget per request (default 100)")
    p.add_argument("--smoke-samples", type=int, default=16, help="held-out samples sent through Triton")
    p.add_argument("--latency-requests", type=int, default=50, help="requests timed for the p95")
    p.add_argument("--serve-previous", action="store_true", help="keep serving the old champion's version too")
    _serving_options(p)
    p.set_defaults(func=_promote)

    p = sub.add_parser("rollback", help="make the previous champion the champion again",
                       description="The version aliased `previous` becomes champion in the registry and in "
                       "Triton (reinstalled from the registry if its folder is gone); the demoted version "
                       "becomes `previous`.")
    p.add_argument("network")
    _serving_options(p)
    p.set_defaults(func=_rollback)

    p = sub.add_parser("models", help="list networks, versions, aliases and what Triton serves",
                       description="Registered versions with aliases, primary metric, data version and parity, "
                       "and the versions the model repository serves (with --url, $FER_TRITON_URL or the config file's "
                       "triton_url: what "
                       "that Triton has loaded).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--url", default=None,
                   help=f"a running Triton to ask (default ${TRITON_URL_ENV} or the config file's triton_url, if set)")
    p.add_argument("--repository", type=Path, default=None, help="model repository (default $FER_HOME/triton/models)")
    p.set_defaults(func=_models)


def _serving_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help=f"running Triton serving the repository (default ${TRITON_URL_ENV} or the config "
                   "file's triton_url; "
                   "without either the embedded one is started for the command)")
    p.add_argument("--repository", type=Path, default=None, help="model repository (default $FER_HOME/triton/models)")


def _quiet_downloads() -> None:
    # MLflow draws a progress bar per artifact download; for a few small files it buries the report.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _repository(args: argparse.Namespace):
    from fer_platform.workspace import Workspace

    _quiet_downloads()
    from serving.repository import ModelRepository

    try:
        workspace = Workspace.load().ensure()  # this command's platform context
    except ValueError as exc:  # a malformed value in the environment or the file
        raise CommandError(f"settings: {exc}", EXIT_USAGE) from None
    repository = ModelRepository.of_workspace(workspace) if not args.repository else \
        ModelRepository(args.repository, face_detection=workspace.face_detection_override,
                        tuning_env=workspace.settings.serving_tuning)
    return workspace, repository


def _configured_triton_url(workspace) -> str | None:
    """``triton_url`` of the platform settings: ``$FER_TRITON_URL``, else the ``$FER_CONFIG`` file's
    ``triton_url``; None when neither names one."""
    return workspace.settings.triton_url or None


@contextlib.contextmanager
def _triton(args: argparse.Namespace, workspace, repository) -> Iterator[str]:
    """The URL of the Triton to use: ``--url``, ``$FER_TRITON_URL``, the running ``fer serve`` of this
    workspace, or (when none runs) an embedded one started for the command. Never a private Triton
    while ``fer serve`` runs: the live server is the one whose answers must change."""
    from serving.live import find_live
    from serving.server import EmbeddedTriton, ServingError

    url = args.url or _configured_triton_url(workspace)
    if url:
        yield url
        return
    live, why = find_live(repository)
    if why:
        raise CommandError(why, EXIT_ERROR)
    if live is not None:
        print(f"acting on the running `fer serve` (pid {live.pid}) at {live.grpc_url}")
        yield live.grpc_url
        return
    repository.root.mkdir(parents=True, exist_ok=True)
    server = EmbeddedTriton(repository, workspace.root / "triton", models=repository.load_order())
    try:
        server.start(strict=False)
    except ServingError as exc:
        raise CommandError(f"cannot start the embedded Triton: {exc}", EXIT_SERVICE) from None
    for model, error in server.load_failures.items():
        print(f"warning: {model} did not load: {error}", file=sys.stderr)
    print(f"started the embedded Triton at {server.grpc_url} for this command (log {server.log_path})")
    try:
        yield server.grpc_url
    finally:
        server.stop()


def _register(args: argparse.Namespace) -> int:
    from fer_platform.workspace import Workspace
    from registry.export import register_run

    _quiet_downloads()
    version = register_run(args.network, args.run, atol=args.atol, set_challenger=not args.no_challenger,
                           face_detection=args.face_detection, workspace=Workspace.load())
    tags = version.tags
    print(f"registered {args.network} v{version.version} from run {version.run_id}"
          f"{' (challenger)' if 'challenger' in version.aliases else ''}")
    for key in ("data_version", "data_gate", "parity_passed", "parity_max_abs_diff", "primary_metric",
                "primary_metric_value", "recipe_fingerprint", "git_commit", "face_handling"):
        print(f"  {key:22s} {tags.get(key, '-')}")
    if tags.get("parity_passed") != "true":
        print("warning: ONNX parity failed; `fer promote` will refuse this version", file=sys.stderr)
    return 0


def _promote(args: argparse.Namespace) -> int:
    from registry.promotion import PromotionBusy, PromotionGates, RetentionPolicy, promote
    from serving.server import ServingError

    gates = PromotionGates(margin=args.margin, floor=args.floor, latency_budget_ms=args.latency_budget_ms,
                           smoke_samples=args.smoke_samples, latency_requests=args.latency_requests)
    workspace, repository = _repository(args)
    try:
        with _triton(args, workspace, repository) as url:
            result = promote(args.network, args.version, gates=gates, triton=url, repository=repository,
                             retention=RetentionPolicy(serve_previous=args.serve_previous), workspace=workspace)
    except (PromotionBusy, ServingError) as exc:
        raise CommandError(str(exc), EXIT_ERROR) from None
    print(result.summary())
    if not result.promoted:
        failed = "; ".join(f"{g.name}: {g.detail}" for g in result.failed)
        raise CommandError(f"promotion of {args.network} v{result.version} refused by {failed}", EXIT_ERROR)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from registry.promotion import PromotionBusy, rollback
    from serving.server import ServingError

    workspace, repository = _repository(args)
    try:
        with _triton(args, workspace, repository) as url:
            result = rollback(args.network, triton=url, repository=repository, workspace=workspace)
    except (PromotionBusy, ServingError) as exc:
        raise CommandError(str(exc), EXIT_ERROR) from None
    print(f"rolled {args.network} back to v{result.champion} (v{result.demoted} is now `previous`) "
          f"in {result.seconds:.1f}s")
    return 0


def _models(args: argparse.Namespace) -> int:
    from registry.promotion import models
    from serving.server import ServingError

    from serving.live import find_live

    workspace, repository = _repository(args)
    url = args.url or _configured_triton_url(workspace)
    live, why = (None, "") if url else find_live(repository)
    if live is not None:
        url = live.grpc_url
    try:
        statuses = models(triton=url, repository=repository, workspace=workspace)
    except ServingError as exc:  # the Triton asked is unreachable or refuses: a service failure
        raise CommandError(str(exc), EXIT_SERVICE) from None
    alerts = list(live.alerts) if live is not None else []
    if args.json:  # the list of networks, as before; alerts go to stderr
        for alert in alerts:
            print(f"alert: {alert}", file=sys.stderr)
        print(json.dumps([s.to_dict() for s in statuses], indent=2))
        return 0
    print(f"Triton: {url} ({'fer serve pid ' + str(live.pid) if live else 'as given'})" if url else
          f"Triton: none running{' (' + why + ')' if why else ''}; nothing is served")
    for alert in alerts:
        print(f"alert: {alert}")
    if not statuses:
        print("no registered models yet: train, then `fer register NETWORK --run RUN_ID`")
        return 0
    print(f"{'network':14s} {'ver':>4s}  {'aliases':20s} {'primary metric':22s} {'data':22s} {'parity':7s} served")
    for s in statuses:
        # What Triton reports, never what the repository's files say (those are not proof of serving).
        served = s.triton_served if s.triton_served is not None else ()
        for v in s.versions or ():
            metric = f"{v.tags.get('primary_metric', '-')} {v.tags.get('primary_metric_value', '')}".strip()
            data = v.tags.get("data_version", "-")
            data = data.split("@")[0] + "@" + data.split("@")[1][:12] if "@" in data else data
            mark = "yes" + (" (ensemble)" if v.version == s.repository_champion and s.ensemble_ready else "") \
                if v.version in served else ""
            print(f"{s.network:14s} {v.version:4d}  {','.join(v.aliases) or '-':20s} {metric:22s} {data:22s} "
                  f"{v.tags.get('parity_passed', '-'):7s} {mark}")
        unregistered = sorted(set(s.repository_versions) - {v.version for v in s.versions})
        if unregistered:
            print(f"{s.network:14s} versions {unregistered} are in the repository but not registered")
        if s.triton_served is None:
            print(f"{s.network:14s} not served (no Triton); the repository pins "
                  f"{s.repository_champion if s.repository_champion is not None else '-'}")
        else:
            print(f"{s.network:14s} Triton serves {list(served) or 'nothing'}; ensemble "
                  f"{'READY' if s.ensemble_ready else 'NOT READY'}, pinned to "
                  f"{s.repository_champion if s.repository_champion is not None else '-'}")
    return 0
