"""Training callbacks: how tracking, progress bars and custom hooks plug into the loop.

The loop (:class:`fer_core.training.trainer.Trainer`) calls these hooks and knows nothing about
MLflow or terminals. In DDP runs only rank 0 calls them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from fer_core.training.trainer import Trainer, TrainResult


class Callback:
    """Base class; override what you need."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_train_batch_end(self, trainer: "Trainer", step: int, loss: float, batch_size: int) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: Mapping[str, float]) -> None: ...
    def on_checkpoint(self, trainer: "Trainer", path: Any, is_best: bool) -> None: ...
    def on_fit_end(self, trainer: "Trainer", result: "TrainResult") -> None: ...


class ProgressBar(Callback):
    """tqdm bars per epoch (steps) with the running loss, and one line per finished epoch."""

    def __init__(self, stream=sys.stderr, leave: bool = False) -> None:
        self.stream, self.leave, self._bar = stream, leave, None

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=trainer.steps_per_epoch, desc=f"epoch {epoch + 1}/{trainer.recipe.epochs}",
                         unit="step", file=self.stream, leave=self.leave, dynamic_ncols=True)

    def on_train_batch_end(self, trainer: "Trainer", step: int, loss: float, batch_size: int) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}")

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: Mapping[str, float]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        shown = {k: v for k, v in metrics.items() if "/" in k and k.count("/") == 1 and not k.startswith(("f1/", "recall/"))}
        text = "  ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items()))
        print(f"epoch {epoch + 1}/{trainer.recipe.epochs}  {text}", file=self.stream, flush=True)


class History(Callback):
    """Keeps every epoch's metrics in memory (tests, summaries)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: Mapping[str, float]) -> None:
        self.epochs.append(dict(metrics))
