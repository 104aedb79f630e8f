"""``fer pipeline run`` (the retraining flow once, now) and ``fer pipeline serve`` (on a schedule).

``run`` uses ``PREFECT_API_URL`` / ``FER_PREFECT_API_URL`` when set, else Prefect's temporary local
API (its database under ``<FER_HOME>/prefect``). ``serve`` needs a real API for its schedule: it
reuses or starts ``prefect server start`` on 127.0.0.1 (same ``PREFECT_HOME``) unless an API URL is
set, then serves ``retrain_all`` from this process until Ctrl-C. For a remote server and a work
pool instead, deploy ``prefect.yaml`` (``prefect deploy --all``) and run a worker.
"""

from __future__ import annotations

import argparse
import os

from fer_cli.main import EXIT_ERROR, CommandError

DEFAULT_CRON = "0 3 * * *"
DEPLOYMENT_NAME = "retrain-all"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "pipeline", help="run or schedule the retraining pipeline (Prefect flow retrain_all)",
        description="The retraining pipeline: for every network, ingest its source (gate + DVC version), "
        "retrain when the data version or recipe changed, promote into Triton when the gates pass, and "
        "publish a summary table (a Prefect artifact).",
    )
    cmds = parser.add_subparsers(dest="pipeline_command", metavar="PIPELINE_COMMAND", required=True)

    p = cmds.add_parser("run", help="run retrain_all once, now",
                        description="Run retrain_all once in this process. Prefect API: PREFECT_API_URL or "
                        "FER_PREFECT_API_URL when set, else a temporary local one.")
    _common(p)
    p.set_defaults(func=_run)

    p = cmds.add_parser("serve", help="serve retrain_all on a schedule (cron or interval) until Ctrl-C",
                        description="Serve retrain_all as the deployment 'retrain_all/retrain-all' with a schedule. "
                        "Without PREFECT_API_URL/FER_PREFECT_API_URL, a local `prefect server start` on 127.0.0.1 "
                        "is reused or started (UI at its address). For a remote server with a work pool, use "
                        "the deployments in prefect.yaml instead.")
    _common(p)
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", default=None, help=f"cron schedule (default {DEFAULT_CRON!r}, UTC)")
    when.add_argument("--interval", type=float, default=None, metavar="SECONDS", help="run every SECONDS instead")
    p.set_defaults(func=_serve)


def _common(p: argparse.ArgumentParser) -> None:
    from fer_core.models.catalog import list_networks
    from fer_core.training.recipe import PROFILES

    p.add_argument("--networks", "-n", nargs="+", default=None, metavar="NETWORK",
                   help=f"networks to retrain (default: {' '.join(list_networks(default_only=True))}; "
                   f"all: {' '.join(list_networks())})")
    p.add_argument("--profile", "-p", default="quick", choices=PROFILES,
                   help="recipe profile (quick: CPU-sized; paper: the source methods' settings, for a GPU)")


def _check_networks(networks: list[str] | None) -> None:
    if networks:
        from fer_core.errors import UsageError
        from fer_core.models.catalog import list_networks

        unknown = sorted(set(networks) - set(list_networks()))
        if unknown:
            raise UsageError(f"unknown networks {unknown}; trainable: {', '.join(list_networks())}")


def print_rows(rows: list[dict[str, str]]) -> None:
    """The summary table, as plain text."""
    if not rows:
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def _run(args: argparse.Namespace) -> int:
    _check_networks(args.networks)
    from fer_platform.settings import Settings
    from flows import configure_prefect

    configure_prefect(Settings.load())  # the flow run builds its own context from the same environment
    from flows.retrain_all import retrain_all

    state = retrain_all(networks=args.networks, profile=args.profile, return_state=True)
    rows = state.result(raise_on_failure=False)
    if isinstance(rows, list):
        print_rows(rows)
    print(f"Prefect flow run: {state.state_details.flow_run_id} ({state.name}); summary artifact "
          f"'retrain-all-summary'; Prefect home {os.environ['PREFECT_HOME']}")
    if state.is_failed():
        raise CommandError(f"retrain_all failed: {state.message}", EXIT_ERROR)
    return 0


def _serve(args: argparse.Namespace) -> int:
    _check_networks(args.networks)
    if args.interval is not None and args.interval <= 0:
        from fer_core.errors import UsageError

        raise UsageError(f"--interval must be > 0 seconds, got {args.interval}")
    from fer_platform.settings import Settings
    from flows import configure_prefect, prefect_home
    from flows.local_server import LocalPrefectServer

    settings = Settings.load()
    configure_prefect(settings)
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        server = LocalPrefectServer(prefect_home(settings)).start()
        os.environ["PREFECT_API_URL"] = server.api_url
        print(f"Prefect server {'reused' if server.reused else 'started'}: {server.api_url} "
              f"(UI: {server.api_url.removesuffix('/api')})", flush=True)
    from flows.retrain_all import retrain_all  # imports Prefect, which now reads PREFECT_API_URL

    schedule = {"interval": args.interval} if args.interval is not None else {"cron": args.cron or DEFAULT_CRON}
    parameters = {"networks": args.networks, "profile": args.profile}
    try:
        retrain_all.serve(name=DEPLOYMENT_NAME, parameters=parameters, **schedule)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.stop()
    return 0
