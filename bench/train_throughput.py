"""Trainer overhead and quick-profile timings (a benchmark, not a test).

1. Samples/s of the platform trainer (MLflow logging on, progress bar off) against a bare PyTorch
   loop written here, on the same model, data pipeline (the same cached dataset and DataLoader
   settings) and batch size, augmentation off in both, in one process. Target: within 5 %.
2. Wall time of each network's ``quick`` profile end to end (data version → tracked training),
   on generated data in that network's real format, at the demo's dataset sizes.

    .venv/bin/python bench/train_throughput.py [--steps 60] [--network ca_resnet] [--skip-quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_core.data.formats import adapt, get_format  # noqa: E402
from fer_core.models import create_model  # noqa: E402
from fer_core.models.catalog import get_network, list_networks  # noqa: E402
from fer_core.training.tasks import create_task, get_recipe  # noqa: E402
from fer_core.training.trainer import Trainer, _collate  # noqa: E402



def bare_loop(model, dataset, loss_fn, batch_size: int, steps: int, lr: float) -> float:
    """The reference: a plain PyTorch training loop; returns samples/s."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=_collate,
                                         generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    seen, done = 0, 0
    start = time.perf_counter()
    while done < steps:
        for x, targets in loader:
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_fn(model.forward_train(x), targets)
            loss.backward()
            opt.step()
            seen += len(x)
            done += 1
            if done == steps:
                break
    return seen / (time.perf_counter() - start)


def overhead(network: str, steps: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["FER_HOME"] = str(tmp / "home")
        spec = get_network(network)  # its real data format and demo size
        source = get_format(spec.data_format).write_synthetic(tmp / "src", seed=0, size=4 * spec.demo_size)
        adapt(spec.data_format, source, tmp / "data", name="bench")
        recipe = get_recipe(network, "quick").with_overrides({"augment": {}, "epochs": 1, "max_steps_per_epoch": steps})
        task = create_task(network, tmp / "data", recipe)
        probe = Trainer(recipe, task, tmp / "probe")  # builds the datasets; warm their decode caches
        train_ds = probe.datasets["train"]
        for i in range(len(train_ds)):
            train_ds[i]
        batch = recipe.batch_size
        steps = min(steps, len(train_ds) // batch)
        if steps < 1:
            raise SystemExit(f"{network}: {len(train_ds)} training samples make no batch of {batch}")
        recipe = recipe.with_overrides({"max_steps_per_epoch": steps})
        bare, platform = [], []
        from fer_platform.workspace import Workspace
        from registry.tracking import MlflowCallback

        for r in range(repeats):
            torch.manual_seed(recipe.seed)
            model = create_model(recipe.network, **probe.recipe.model_kwargs)
            bare.append(bare_loop(model, train_ds, task.build_loss(recipe, model), batch, steps, recipe.lr))
            trainer = Trainer(recipe, task, tmp / f"run{r}",
                              callbacks=[MlflowCallback(network, tmp / f"run{r}", log_model=False,
                                                        workspace=Workspace(tmp / "home"))])
            trainer.datasets = probe.datasets  # same warmed data pipeline
            result = trainer.fit()
            platform.append(result.history[-1]["throughput/samples_per_s"])
        b, p = statistics.median(bare), statistics.median(platform)
        print(f"{network}: batch {batch}, {steps} steps x {repeats} repeats, torch threads {torch.get_num_threads()}")
        print(f"  bare PyTorch loop : {b:8.1f} samples/s  (runs: {', '.join(f'{v:.1f}' for v in bare)})")
        print(f"  platform trainer  : {p:8.1f} samples/s  (runs: {', '.join(f'{v:.1f}' for v in platform)})")
        print(f"  trainer / bare    : {p / b:8.3f}  ({(p / b - 1) * 100:+.1f} %)")


def quick_profiles(networks: list[str]) -> None:
    from fer_platform.workspace import Workspace
    from registry.datasets import DatasetStore
    from registry.training import resolve_recipe, train_tracked

    print("\nquick profile, end to end (data version → tracked training with MLflow, model logged):")
    for network in networks:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            workspace = Workspace(tmp / "home").ensure()  # a fresh embedded default per network
            spec = get_network(network)
            source = get_format(spec.data_format).write_synthetic(tmp / "src", seed=0, size=spec.demo_size)
            adapt(spec.data_format, source, tmp / "prepared", name="bench")
            version = DatasetStore(workspace).add("bench", tmp / "prepared")
            start = time.perf_counter()
            outcome = train_tracked(network, version.ref, resolve_recipe(network, "quick"), progress=False,
                                   workspace=workspace)
            wall = time.perf_counter() - start
            task = create_task(network, DatasetStore(workspace).path("bench"), outcome.recipe)
            key = next((k for k in outcome.result.test_metrics if k.endswith("/" + task.primary_metric)), None)
            metric = f"{key}={outcome.result.test_metrics[key]:.3f}" if key else ""
            print(f"  {network:14s} {wall:7.1f} s  epochs {outcome.result.epochs_run}  {metric}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="ca_resnet")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-quick", action="store_true")
    args = parser.parse_args()
    overhead(args.network, args.steps, args.repeats)
    if not args.skip_quick:
        quick_profiles(list_networks(default_only=True))


if __name__ == "__main__":
    main()
