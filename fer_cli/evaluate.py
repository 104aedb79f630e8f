"""``fer evaluate``: score a registered model version on a labelled dataset version (MLflow-tracked)."""

from __future__ import annotations

import argparse
import json

from fer_cli.main import EXIT_ERROR, CommandError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate a registered model version on a dataset version (e.g. a cross-dataset test set)",
        description="Run a registered version of NETWORK on the test split of a DVC-versioned dataset "
        "(an evaluation-only test set, see `fer data add ... -o role=test`), print accuracy (WAR), UAR, UF1, "
        "per-class recall/F1 and the confusion matrix, and log an MLflow evaluation run linked to the "
        "model version and the dataset version (metrics eval/*, confusion-matrix PNG, per-sample "
        "predictions table). In-process ONNX Runtime by default; --url asks a served Triton ensemble "
        "with the same pre/post-processing. Test-set classes the network lacks are reported, not scored. "
        "multitask_fer also gets CCC/RMSE of valence and arousal and the landmarks' NME where the set "
        "annotates them; AU networks get F1 per AU (an AU table, `-o role=test` for an evaluation-only set).",
    )
    p.add_argument("network", help="network whose registered model fer-NETWORK to evaluate")
    p.add_argument("--data", "-d", required=True, help="dataset as NAME@VERSION (or NAME for its newest version)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, default=None, help="model version (default: the champion, else the newest)")
    which.add_argument("--alias", choices=("champion", "challenger", "previous"), default=None)
    p.add_argument("--url", default=None, help="evaluate through a served Triton at grpc://HOST:PORT or http://...")
    p.add_argument("--split", choices=("train", "val", "test"), default=None,
                   help="split to measure (default: test; a dataset without one is refused)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--face-detection", choices=("off", "haar"), default=None,
                   help="in-process pre-processing (default: FER_FACE_DETECTION, as the served ensemble)")
    p.add_argument("--no-track", action="store_true", help="do not log an MLflow evaluation run")
    p.add_argument("--json", action="store_true", help="print JSON (metrics, confusion, run id) for scripts")
    p.add_argument("--predictions", action="store_true", help="with --json: include the per-sample predictions")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from fer_platform.workspace import Workspace
    from registry.evaluation import evaluate, format_table

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        outcome = evaluate(args.network, args.data, version=args.version, alias=args.alias, url=args.url,
                           split=args.split, batch_size=args.batch_size, track=not args.no_track,
                           face_detection=args.face_detection, workspace=Workspace.load())
    except FileNotFoundError as exc:
        raise CommandError(str(exc), EXIT_ERROR) from None
    if args.json:
        body = outcome.to_dict()
        if args.predictions:
            body["predictions"] = outcome.predictions.to_dict(orient="records")
        print(json.dumps(body, indent=2))
    else:
        print(format_table(outcome))
    return 0
