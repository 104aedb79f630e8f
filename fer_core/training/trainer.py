"""One training loop for all networks: recipe-driven, deterministic, resumable, DDP-ready.

* Determinism: the model is initialised from ``recipe.seed``; the sampling order comes from a
  ``DistributedSampler`` seeded with (seed, epoch) and augmentation from per-sample generators
  (:func:`fer_core.training.task.epoch_generator`), so a run resumed from its last checkpoint ends
  where the uninterrupted run would have.
* Checkpoints every epoch (``last.pt``) and on improvement (``best.pt``), loaded with
  ``weights_only=True`` (:mod:`fer_core.training.checkpoint`).
* DDP: launched by ``torchrun`` (``WORLD_SIZE``/``RANK`` in the environment), gloo on CPU and NCCL on
  CUDA. ``recipe.batch_size`` is the global batch; each rank takes its share. Only rank 0 calls
  callbacks and writes checkpoints.
* The loop knows nothing about tracking: MLflow, progress bars and the like are callbacks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from fer_core.models import FERModel, create_model
from fer_core.training.callbacks import Callback
from fer_core.training.checkpoint import load_checkpoint, save_checkpoint
from fer_core.training.recipe import Recipe
from fer_core.training.task import Task


@dataclass
class TrainResult:
    """What a finished run produced."""

    best_epoch: int
    best_value: float
    history: list[dict[str, float]]
    test_metrics: dict[str, float]
    best_checkpoint: Path
    last_checkpoint: Path
    epochs_run: int
    stopped_early: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


class _TrainForward(nn.Module):
    """Routes ``forward`` to ``forward_train`` so DDP's gradient hooks see the training pass."""

    def __init__(self, model: FERModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_train(x)


def effective_recipe(recipe: Recipe, task: Task) -> Recipe:
    """``recipe`` with the model kwargs the data decides (e.g. the number of classes) folded in, so
    that checkpoints, logged params and fingerprints show what was really built."""
    overrides = task.model_overrides() if hasattr(task, "model_overrides") else {}
    changed = {f"model_kwargs.{k}": v for k, v in overrides.items() if recipe.model_kwargs.get(k) != v}
    return recipe.with_overrides(changed) if changed else recipe


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    xs = torch.stack([b[0] for b in batch])
    targets = {k: torch.stack([torch.as_tensor(b[1][k]) for b in batch]) for k in batch[0][1]}
    return xs, targets


class Trainer:
    """Fits one network on one task following one recipe."""

    def __init__(
        self,
        recipe: Recipe,
        task: Task,
        run_dir: Path,
        callbacks: Iterable[Callback] = (),
        data_version: str = "",
    ) -> None:
        recipe = effective_recipe(recipe, task)
        self.recipe, self.task, self.run_dir = recipe, task, Path(run_dir)
        self.callbacks = list(callbacks)
        self.data_version = data_version
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(recipe.device)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if recipe.batch_size % self.world_size:
            raise ValueError(f"batch_size {recipe.batch_size} is not divisible by world size {self.world_size}")
        torch.manual_seed(recipe.seed)
        self.model: FERModel = create_model(recipe.network, **recipe.model_kwargs).to(self.device)
        self.datasets: Mapping[str, Dataset] = task.build_datasets(recipe)
        if "train" not in self.datasets or len(self.datasets["train"]) == 0:
            raise ValueError(f"task {task.name!r} produced no training samples")
        self.loss_fn = task.build_loss(recipe, self.model)
        self.steps_per_epoch = self._steps_per_epoch()
        self.global_step = 0

    # -- construction helpers ----------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _steps_per_epoch(self) -> int:
        per_rank = math.ceil(len(self.datasets["train"]) / self.world_size)
        steps = math.ceil(per_rank / (self.recipe.batch_size // self.world_size))
        return min(steps, self.recipe.max_steps_per_epoch) if self.recipe.max_steps_per_epoch else steps

    def _optimizer(self) -> torch.optim.Optimizer:
        r = self.recipe
        params = [p for p in self.model.parameters() if p.requires_grad]
        if r.optimizer == "adam":
            return torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay)
        if r.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
        return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay, nesterov=True)

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        r = self.recipe
        main_epochs = max(r.epochs - r.warmup_epochs, 1)
        if r.scheduler == "cosine":
            main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs)
        elif r.scheduler == "step":
            main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=r.step_size, gamma=r.gamma)
        elif r.scheduler == "hold_decay_cosine":
            def factor(epoch: int) -> float:
                return hold_decay_cosine_factor(epoch, r.step_size, r.gamma, main_epochs)

            main = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        else:
            main = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        if r.warmup_epochs <= 0:
            return main
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=r.warmup_epochs)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[r.warmup_epochs])

    def _loader(self, split: str, epoch: int, train: bool) -> DataLoader:
        ds = self.datasets[split]
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        if train:
            sampler = DistributedSampler(ds, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                         seed=self.recipe.seed)
            sampler.set_epoch(epoch)
            return DataLoader(ds, batch_size=self.recipe.batch_size // self.world_size, sampler=sampler,
                              num_workers=self.recipe.num_workers, collate_fn=_collate,
                              pin_memory=self.device.type == "cuda")
        return DataLoader(ds, batch_size=self.recipe.eval_batch_size, shuffle=False,
                          num_workers=self.recipe.num_workers, collate_fn=_collate)

    def _call(self, hook: str, *args: Any) -> None:
        if self.is_main:
            for cb in self.callbacks:
                getattr(cb, hook)(self, *args)

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, split: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
        """Concatenated ``forward_train`` outputs, targets and mean loss over a whole split."""
        self.model.eval()
        outputs: dict[str, list[torch.Tensor]] = {}
        targets: dict[str, list[torch.Tensor]] = {}
        total, count = 0.0, 0
        for x, tgt in self._loader(split, 0, train=False):
            x = x.to(self.device)
            tgt = {k: v.to(self.device) for k, v in tgt.items()}
            with self._autocast():
                out = self.model.forward_train(x)
                loss, _ = self.loss_fn(out, tgt)
            total += float(loss) * len(x)
            count += len(x)
            for k, v in out.items():
                outputs.setdefault(k, []).append(v.float().cpu())
            for k, v in tgt.items():
                targets.setdefault(k, []).append(v.cpu())
        cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
        return cat(outputs), cat(targets), total / max(count, 1)

    def evaluate(self, split: str) -> dict[str, float]:
        """Loss and task metrics on a whole split (every rank evaluates the full split)."""
        if len(self.datasets[split]) == 0:
            return {}
        outputs, targets, loss = self.predict(split)
        return {"loss": loss, **self.task.compute_metrics(outputs, targets)}

    def _autocast(self):
        enabled = self.recipe.amp and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # -- training ----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        r = self.recipe
        distributed = self.world_size > 1
        if distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        train_module: nn.Module = _TrainForward(self.model)
        if distributed:
            train_module = nn.parallel.DistributedDataParallel(
                train_module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        optimizer = self._optimizer()
        scheduler = self._scheduler(optimizer)
        last_path, best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        history: list[dict[str, float]] = []
        start_epoch, best_value, best_epoch, bad_epochs = 0, math.inf, -1, 0
        sign = 1.0 if r.monitor_mode == "min" else -1.0
        if resume and last_path.is_file():
            state = load_checkpoint(last_path, map_location=self.device)
            self.model.load_state_dict(state["model_state"])
            optimizer.load_state_dict(state["optimizer_state"])
            scheduler.load_state_dict(state["scheduler_state"])
            start_epoch, history = int(state["epoch"]), list(state["history"])
            best_value, best_epoch, bad_epochs = state["best_value"], state["best_epoch"], state["bad_epochs"]
            self.global_step = int(state["global_step"])
            if "torch_rng_state" in state:  # dropout and the loader's base seed draw from it
                torch.set_rng_state(state["torch_rng_state"].cpu())
        self._call("on_fit_start")
        patience = r.early_stopping_patience
        stopped_early = bool(patience and bad_epochs >= patience)  # a resumed run that had already stopped
        for epoch in range(start_epoch, r.epochs):
            if stopped_early:
                break
            self._call("on_epoch_start", epoch)
            self.model.train()
            started, seen, loss_sum, parts_sum = time.perf_counter(), 0, 0.0, {}
            for step, (x, tgt) in enumerate(self._loader("train", epoch, train=True)):
                if step >= self.steps_per_epoch:
                    break
                x = x.to(self.device, non_blocking=True)
                tgt = {k: v.to(self.device, non_blocking=True) for k, v in tgt.items()}
                optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    loss, parts = self.loss_fn(train_module(x), tgt)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch + 1}, step {step}")
                loss.backward()
                if r.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
                optimizer.step()
                self.global_step += 1
                seen += len(x)
                loss_sum += float(loss.detach()) * len(x)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(torch.as_tensor(v).detach()) * len(x)
                self._call("on_train_batch_end", self.global_step, float(loss.detach()), len(x))
            elapsed = time.perf_counter() - started
            if distributed:  # epoch statistics over all ranks, not rank 0's share
                keys = sorted(parts_sum)
                stats = torch.tensor([loss_sum, float(seen), *[parts_sum[k] for k in keys]], dtype=torch.float64, device=self.device)
                dist.all_reduce(stats)
                loss_sum, seen = float(stats[0]), int(stats[1])
                parts_sum = {k: float(v) for k, v in zip(keys, stats[2:])}
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            metrics = {"train/loss": loss_sum / max(seen, 1), "lr": lr,
                       "throughput/samples_per_s": seen / max(elapsed, 1e-9),
                       "epoch_seconds": elapsed}
            metrics.update({f"train/{k}": v / max(seen, 1) for k, v in parts_sum.items()})
            if "val" in self.datasets and len(self.datasets["val"]):
                metrics.update({f"val/{k}": v for k, v in self.evaluate("val").items()})
            if r.monitor not in metrics:
                raise ValueError(f"monitor {r.monitor!r} is not among the epoch metrics {sorted(metrics)}")
            history.append(metrics)
            value = sign * metrics[r.monitor]
            improved = value < best_value
            if improved:
                best_value, best_epoch, bad_epochs = value, epoch, 0
            else:
                bad_epochs += 1
            if self.is_main:
                state = {
                    "model_state": self.model.state_dict(), "optimizer_state": optimizer.state_dict(),
                    "scheduler_state": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                    "best_value": best_value, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                    "global_step": self.global_step, "recipe": r.to_dict(), "network": r.network,
                    "model_kwargs": dict(r.model_kwargs), "data_version": self.data_version, "metrics": metrics,
                    # The global RNG has advanced through this run's epochs (dropout, the loader's base
                    # seed); a resumed run must continue from the same state to end where this one ends.
                    "torch_rng_state": torch.get_rng_state(),
                }
                # best.pt before last.pt: if writing best fails (disk full), last.pt still names the
                # previous best, so a resumed run never records a best epoch whose weights were lost.
                if improved:
                    save_checkpoint(state, best_path)
                save_checkpoint(state, last_path)
            self._call("on_epoch_end", epoch, metrics)
            self._call("on_checkpoint", last_path, improved)
            stopped_early = bool(patience and bad_epochs >= patience and epoch + 1 < r.epochs)
        if distributed:
            dist.barrier()
        best = load_checkpoint(best_path if best_path.is_file() else last_path, map_location=self.device)
        self.model.load_state_dict(best["model_state"])
        if not best_path.is_file():  # no best weights on disk: what follows is of the last epoch's
            best_epoch = -1
        # Final evaluation of the best weights on the test split (val when there is none), plus the
        # task's detailed report (confusion matrix, per-class table) for tracking artifacts.
        final_split = next((s for s in ("test", "val") if s in self.datasets and len(self.datasets[s])), None)
        test_metrics, extra = {}, {}
        if final_split:
            outputs, targets, loss = self.predict(final_split)
            test_metrics = {f"{final_split}/loss": loss, **{
                f"{final_split}/{k}": v for k, v in self.task.compute_metrics(outputs, targets).items()}}
            if hasattr(self.task, "report"):
                extra["report"] = {"split": final_split, **self.task.report(outputs, targets)}
        result = TrainResult(best_epoch=best_epoch, best_value=sign * best_value, history=history,
                             test_metrics=test_metrics, best_checkpoint=best_path, last_checkpoint=last_path,
                             epochs_run=len(history), stopped_early=stopped_early, extra=extra)
        self._call("on_fit_end", result)
        return result


def hold_decay_cosine_factor(epoch: int, hold: int, decay: float, total: int) -> float:
    """The CA-ResNet method's learning-rate factor: held at 1 for ``hold`` epochs, then ×``decay`` per
    epoch combined (multiplied) with a cosine annealing over the remaining epochs.

    ``factor(e) = 1`` for ``e < hold``, else ``decay^(e − hold) · ½(1 + cos(π (e − hold) / (total − hold)))``.
    The method says "held, then ×0.9 after epoch 50, with cosine annealing" without the way the two
    decays combine; a product that starts at 1 on the first decaying epoch is our reading (scheduler
    "hold_decay_cosine"; ``recipe.step_size`` = hold epochs, ``recipe.gamma`` = the per-epoch decay).
    """
    if epoch < hold:
        return 1.0
    span = max(total - hold, 1)
    return decay ** (epoch - hold) * 0.5 * (1.0 + math.cos(math.pi * min(epoch - hold, span) / span))


def load_model_from_checkpoint(path: Path, map_location: str = "cpu") -> tuple[FERModel, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with and load its weights."""
    state = load_checkpoint(path, map_location=map_location)
    model = create_model(state["network"], **state["model_kwargs"])
    model.load_state_dict(state["model_state"])
    model.eval()
    return model, state
