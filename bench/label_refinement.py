"""Measure the AU noisy-label rounds on generated data with injected label noise (not a test).

SynthFACS renders a co-training set (:func:`fer_core.data.formats.au_table.write_synthetic`) with
``--flip-rate`` of the noisy rows' AU labels flipped and no unknown cells, so the clean rows' labels
are the truth. A third of the clean rows is marked ``test`` (same identities as training, unseen
images). For each retrain mode the script runs :func:`fer_core.training.label_refinement.run_au_rounds`
and reports per round:

* ``agree``: agreement of that round's noisy-row labels with the kept-aside truth (round 0 = the
  injected noise, i.e. about 1 - flip rate);
* ``test_f1``: the clean heads' mean F1 on the test rows, i.e. against the truth;
* ``changed``: noisy label cells that differ from the previous round.

Usage: ``python bench/label_refinement.py [--size 600] [--rounds 3] [--modes noisy_heads full] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_core.data.formats import adapt, get_format  # noqa: E402
from fer_core.training.label_refinement import run_au_rounds  # noqa: E402
from fer_core.training.tasks import get_recipe  # noqa: E402


def make_dataset(folder: Path, size: int, flip_rate: float, seed: int, image_size: int) -> Path:
    source = get_format("au_table").write_synthetic(folder / "src", seed=seed, size=size, image_size=image_size,
                                                    flip_rate=flip_rate, unknown_rate=0.0)
    clean = pd.read_csv(source / "clean.csv")
    clean.insert(1, "split", ["test" if i % 3 == 2 else "train" for i in range(len(clean))])
    clean.to_csv(source / "clean.csv", index=False)
    adapt("au_table", source, folder / "prepared", name="au-bench")
    return folder / "prepared"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=600, help="images: 1/2 clean, 1/4 noisy, 1/4 unlabelled")
    parser.add_argument("--flip-rate", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gamma", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=15, help="base training epochs")
    parser.add_argument("--round-epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=48, help="rendered size (the model input is 40 px)")
    parser.add_argument("--modes", nargs="+", default=["noisy_heads", "full", "full-control"],
                        choices=["noisy_heads", "full", "noisy_heads-control", "full-control"],
                        help="a '-control' mode runs the same rounds with gamma = 1 (labels unchanged): "
                             "the equal-epochs control")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the per-round rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = get_recipe("au_cotrain", "quick").with_overrides({
        "epochs": args.epochs, "early_stopping_patience": 0, "max_steps_per_epoch": 0, "seed": args.seed,
    })
    report = {"settings": vars(args) | {"json": str(args.json)}, "recipe": recipe.to_dict(), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_dataset(tmp, args.size, args.flip_rate, args.seed, args.image_size)
        for mode in args.modes:
            started = time.perf_counter()
            retrain, control = mode.removesuffix("-control"), mode.endswith("-control")
            result = run_au_rounds(recipe, root, tmp / f"runs-{mode}", args.rounds,
                                   gamma=1.0 if control else args.gamma, retrain=retrain,
                                   round_epochs=args.round_epochs)
            seconds = time.perf_counter() - started
            rows = [{k: v for k, v in row.items() if k != "data"} for row in result.table()]
            report["modes"][mode] = {"rounds": rows, "seconds": seconds}
            print(f"\nretrain={mode}  flip_rate={args.flip_rate}  gamma={1.0 if control else args.gamma}  "
                  f"({seconds:.0f} s)")
            print(f"{'round':>5}  {'changed':>7}  {'agree':>6}  {'test_f1':>7}  {'val_f1':>6}  epochs")
            for r, res in zip(rows, result.rounds):
                val = res.train_result.history[res.train_result.best_epoch].get("val/mean_f1", float("nan"))
                print(f"{r['round']:>5}  {r['labels_changed']:>7}  {r['agreement_with_truth']:>6.3f}  "
                      f"{r['mean_f1']:>7.3f}  {val:>6.3f}  {r['best_epoch']}/{r['epochs_run']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
