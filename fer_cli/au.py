"""``fer au-rounds``: train ``au_cotrain``, then refine its noisy labels over K retraining rounds.

Each round's refined label table becomes a DVC dataset version (``<name>-round<k>``, parent = the
previous round) and each round an MLflow child run of one parent run; a per-round table is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "au-rounds", help="AU co-training with noisy-label refinement rounds (versioned + tracked)",
        description="Train au_cotrain on an AU dataset version, then for K rounds refine the noisy rows' "
        "labels with the noisy heads (y = gamma*y + (1-gamma)*mean(p1, p2) >= 0.5), version the refined table "
        "with DVC and retrain. Every round is an MLflow child run of one parent run.",
    )
    p.add_argument("data", help="AU dataset as NAME@VERSION (or NAME for its newest version)")
    p.add_argument("--rounds", "-k", type=int, default=2, help="refinement rounds after the base training (default 2)")
    p.add_argument("--gamma", type=float, default=0.3,
                   help="weight of the current label in the refinement, in [0, 1]; labels only flip below 0.5 "
                   "(default 0.3)")
    p.add_argument("--retrain", choices=("noisy_heads", "full"), default="full",
                   help="what each round retrains: the noisy heads only (default) or the whole network")
    p.add_argument("--round-epochs", type=int, default=None, help="epochs per round (default: half the recipe's)")
    p.add_argument("--profile", "-p", default="quick", choices=("quick", "paper"))
    p.add_argument("--config", "-c", type=Path, default=None, help="YAML file of recipe overrides")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe value (repeatable), e.g. --set epochs=10")
    p.add_argument("--no-model-logging", action="store_true", help="do not log each round's model to MLflow")
    p.set_defaults(func=_au_rounds)


def _au_rounds(args: argparse.Namespace) -> int:
    from fer_core.training.recipe import parse_set_options
    from fer_core.training.tasks import get_recipe
    from fer_platform.workspace import Workspace
    from registry.tracked_refinement import run_tracked_au_rounds

    if args.rounds < 0:
        raise ValueError(f"--rounds must be >= 0, got {args.rounds}")
    if args.round_epochs is not None and args.round_epochs < 1:
        raise ValueError(f"--round-epochs must be >= 1, got {args.round_epochs}")
    recipe = get_recipe("au_cotrain", args.profile)
    if args.config:
        recipe = recipe.with_yaml(args.config)
    recipe = recipe.with_overrides(parse_set_options(args.overrides))
    tracked = run_tracked_au_rounds(args.data, recipe, args.rounds, gamma=args.gamma, retrain=args.retrain,
                                    round_epochs=args.round_epochs, log_models=not args.no_model_logging,
                                    workspace=Workspace.load())
    print_round_table(tracked.result.table(), tracked.parent_run_id)
    return 0


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_round_table(rows: list[dict], parent_run_id: str | None = None) -> None:
    """One line per round: label table, how it changed, its agreement with truth and the F1s."""
    if not rows:
        return
    split = rows[0]["split"]
    headers = ("round", "labels", "changed", "agree_truth", f"{split}_f1", f"{split}_f1_truth", "f1_noisy_lbl", "epochs")
    table = [(str(r["round"]), r["data"], str(r["labels_changed"]), _fmt(r["agreement_with_truth"]),
              _fmt(r["mean_f1"]), _fmt(r["mean_f1_truth"]), _fmt(r["mean_f1_noisy_labels"]),
              f"{r['best_epoch']}/{r['epochs_run']}") for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if parent_run_id:
        print(f"\nmlflow parent run {parent_run_id} (experiment fer-au_cotrain); review it with `fer ui`")
