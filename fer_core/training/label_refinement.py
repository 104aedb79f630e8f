"""Noisy-label retraining rounds of the AU co-training network (``au_cotrain``).

Round 0 trains the network to convergence on the dataset as given (one
:class:`~fer_core.training.trainer.Trainer` run with the recipe). Each round k = 1..K then

1. predicts the noisy-head probabilities ``p1, p2`` of both views for every ``noisy`` row of the
   current label table (un-augmented images, eval mode; :func:`~fer_core.models.au_cotrain.noisy_probabilities`);
2. refines their labels with :func:`~fer_core.models.au_cotrain.refine_labels`:
   ``y_k = [gamma * y_{k-1} + (1 - gamma) * (p1 + p2) / 2 >= 0.5]``, unknown (-1) cells stay unknown.
   ``y_{k-1}`` is the previous round's table (rounds compound), ``y_0`` the dataset's noisy labels.
   Note that a label can only flip when ``gamma < 0.5`` (a 0 needs ``p >= 0.5 / (1 - gamma)``, a 1
   needs ``p < (0.5 - gamma) / (1 - gamma)``); at ``gamma = 0.5`` a 1 never flips and a 0 only at
   p = 1, so refinement is practically a no-op and the
   rounds default to ``gamma = 0.3`` (flip a 0 at p >= 0.71, a 1 at p < 0.29);
3. writes the refined table as a new prepared dataset (a copy of the manifest with the refined
   ``aus`` of the noisy rows; the files are hard-linked, copied where links are impossible) and
   hands it to ``hooks.publish`` (which may version it and move it; the returned folder is trained on);
4. retrains, starting from the previous round's weights, for ``round_epochs`` epochs:
   ``retrain="full"`` (default) trains the whole network with the recipe's monitor (``val/mean_f1``,
   max): the refined labels enter through the noisy term ``BCE(sigmoid(f_clean + f_noisy), y_k)``,
   whose gradient reaches the clean heads and the shared trunks, i.e. the path the served model
   (the clean heads) uses -- only then can a round change what is served.
   ``retrain="noisy_heads"`` trains only the two noisy heads -- the trunks are frozen and held in
   eval mode so their BatchNorm statistics do not drift, the clean heads are frozen too -- and,
   since the clean heads then cannot change (the served output stays the same by construction),
   picks the epoch by ``val/loss`` (min);
   an equal-epochs *control* is the same rounds with ``gamma = 1`` (labels never change, so only the
   extra epochs act): ``bench/label_refinement.py`` runs it beside the refining rounds;
5. evaluates: the Trainer's final split metrics (test, else val) of the round's best weights, plus
   how the round's label table compares with the previous one and, where the manifest keeps the
   truth (``true_aus``), the agreement of the noisy rows' labels with it.

The library knows nothing about DVC or MLflow: :class:`RoundHooks` lets the caller version each
round's table (``publish``), give each round's Trainer its callbacks (``callbacks``, e.g. an MLflow
child run) and see each finished round (``on_round_end``); see :mod:`registry.tracked_refinement`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from fer_core.data.manifest import CARD_FILE, MANIFEST_FILE, read_card, write_prepared
from fer_core.models.au_cotrain import noisy_probabilities, refine_labels
from fer_core.training.callbacks import Callback
from fer_core.training.recipe import Recipe
from fer_core.training.tasks import create_task
from fer_core.training.tasks.au import AUCoTrainTask, au_matrix
from fer_core.training.trainer import Trainer, TrainResult

RETRAIN_MODES = ("noisy_heads", "full")


@dataclass
class RoundResult:
    """One round: the label table it trained on, its training run and its evaluation."""

    round: int  # 0 = the base training on the given labels
    data_root: Path
    data_ref: str  # what ``hooks.publish`` returned (e.g. a DVC dataset ref), else the folder
    train_result: TrainResult
    metrics: dict[str, float]  # final-split metrics of the round's weights ("test/..." or "val/...")
    noisy_labels: np.ndarray  # int64 (N_noisy, L) labels of the noisy rows this round trained on
    labels_changed: int  # noisy cells that differ from the previous round's table (0 in round 0)
    agreement_with_truth: float | None  # share of known noisy cells equal to ``true_aus``; None without truth

    def summary(self) -> dict[str, Any]:
        """A flat row: labels, evaluation split and its mean F1s, epochs."""
        split = "test" if any(k.startswith("test/") for k in self.metrics) else "val"
        return {
            "round": self.round, "data": self.data_ref, "labels_changed": self.labels_changed,
            "agreement_with_truth": self.agreement_with_truth, "split": split,
            **{key: self.metrics.get(f"{split}/{key}") for key in ("mean_f1", "mean_f1_truth", "mean_f1_noisy_labels")},
            "best_epoch": self.train_result.best_epoch + 1, "epochs_run": self.train_result.epochs_run,
        }


@dataclass
class AURoundsResult:
    rounds: list[RoundResult]
    model: nn.Module  # the last round's weights
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One flat row per round (what the CLI prints)."""
        return [r.summary() for r in self.rounds]


class RoundHooks:
    """Where a caller plugs in versioning and tracking; the defaults do nothing."""

    def callbacks(self, round_index: int, data_ref: str, run_dir: Path) -> list[Callback]:
        """Callbacks of the round's Trainer (round 0 = the base training)."""
        return []

    def publish(self, round_index: int, prepared: Path, parent_ref: str) -> tuple[Path, str]:
        """Take round ``round_index``'s refined label table at ``prepared`` (derived from
        ``parent_ref``); return the folder to train on and a reference naming it."""
        return prepared, str(prepared)

    def on_round_end(self, result: RoundResult) -> None:
        """Called after each round's training and evaluation."""


def label_agreement(labels: np.ndarray, truth: np.ndarray) -> float | None:
    """Share of cells known in both ``labels`` and ``truth`` (0/1/-1 matrices) where they are equal."""
    known = (labels >= 0) & (truth >= 0)
    return float((labels[known] == truth[known]).mean()) if known.any() else None


def _noisy_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest[manifest["label_set"] == "noisy"]


def _truth(rows: pd.DataFrame, num_aus: int) -> np.ndarray | None:
    if "true_aus" not in rows.columns:
        return None
    truth = au_matrix(rows["true_aus"], num_aus)
    return truth if (truth >= 0).any() else None


def refine_noisy_labels(
    model: nn.Module, task: AUCoTrainTask, gamma: float = 0.3, batch_size: int = 64
) -> tuple[pd.DataFrame, np.ndarray]:
    """The task's manifest with the noisy rows' ``aus`` refined by the model; also the refined (N, L)."""
    manifest = task.manifest
    rows = _noisy_rows(manifest)
    if rows.empty:
        raise ValueError(f"{task.root} has no noisy rows to refine")
    num_aus = len(task.au_names)
    current = torch.from_numpy(au_matrix(rows["aus"], num_aus))
    device = next(model.parameters()).device
    p1, p2 = noisy_probabilities(model, task.images(rows).to(device), batch_size)
    refined = refine_labels(current, p1.cpu(), p2.cpu(), gamma).numpy()
    out = manifest.copy()
    out["aus"] = out["aus"].astype(object)
    for position, index in enumerate(rows.index):
        out.at[index, "aus"] = refined[position].tolist()
    return out, refined


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def write_refined_dataset(
    source_root: Path, manifest: pd.DataFrame, out_dir: Path, *, name: str, provenance: Mapping[str, Any]
) -> Path:
    """A prepared dataset at ``out_dir``: ``source_root``'s files (hard-linked) with ``manifest``."""
    source_root, out_dir = Path(source_root), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for path in sorted(source_root.rglob("*")):
        relative = path.relative_to(source_root)
        if path.is_file() and relative.as_posix() not in (MANIFEST_FILE, CARD_FILE):
            _link_or_copy(path, out_dir / relative)
    card = read_card(source_root)
    card = dataclasses.replace(card, name=name, provenance={**card.provenance, **provenance})
    write_prepared(out_dir, manifest, card)
    return out_dir


def freeze_all_but_noisy_heads(model: nn.Module) -> None:
    """Leave only the noisy heads trainable; trunks stay in eval mode even when the trainer calls
    ``model.train()`` (so frozen BatchNorm layers neither use batch statistics nor update theirs)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("noisy_heads."))
    for trunk in model.trunks:
        trunk.register_forward_pre_hook(_hold_in_eval)


def _hold_in_eval(module: nn.Module, args: tuple[Any, ...]) -> None:
    module.eval()  # a module-level function, so a model carrying this hook still pickles


def run_au_rounds(
    recipe: Recipe,
    data_root: Path,
    run_dir: Path,
    rounds: int = 2,
    *,
    gamma: float = 0.3,
    retrain: str = "full",
    round_epochs: int | None = None,
    round_overrides: Mapping[str, Any] | None = None,
    hooks: RoundHooks | None = None,
    data_ref: str = "",
) -> AURoundsResult:
    """Train ``recipe`` (an ``au_cotrain`` recipe) on ``data_root``, then ``rounds`` refinement rounds.

    ``round_epochs`` (default: half the recipe's epochs, at least 1) is each round's training length;
    ``round_overrides`` are recipe overrides for the rounds only. Run folders: ``run_dir/round<k>``.
    See the module docstring for what a round does.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if retrain not in RETRAIN_MODES:
        raise ValueError(f"retrain must be one of {RETRAIN_MODES}, got {retrain!r}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    hooks = hooks or RoundHooks()
    data_root, run_dir = Path(data_root), Path(run_dir)
    data_ref = data_ref or str(data_root)
    base_name = read_card(data_root).name

    def train(round_index: int, root: Path, ref: str, round_recipe: Recipe, init: nn.Module | None):
        task = create_task(round_recipe.network, root, round_recipe)
        if not isinstance(task, AUCoTrainTask):
            raise ValueError(f"AU rounds need the au_cotrain task, {round_recipe.network!r} has {type(task).__name__}")
        folder = run_dir / f"round{round_index}"
        trainer = Trainer(round_recipe, task, folder, callbacks=hooks.callbacks(round_index, ref, folder),
                          data_version=ref)
        if init is not None:
            trainer.model.load_state_dict(init.state_dict())
            if retrain == "noisy_heads":
                freeze_all_but_noisy_heads(trainer.model)
        return task, trainer, trainer.fit()

    def finish(round_index, root, ref, task, trainer, result, labels, previous) -> RoundResult:
        truth = _truth(_noisy_rows(task.manifest), len(task.au_names))
        done = RoundResult(
            round=round_index, data_root=root, data_ref=ref, train_result=result, metrics=dict(result.test_metrics),
            noisy_labels=labels, labels_changed=0 if previous is None else int((labels != previous).sum()),
            agreement_with_truth=None if truth is None else label_agreement(labels, truth),
        )
        hooks.on_round_end(done)
        return done

    task, trainer, result = train(0, data_root, data_ref, recipe, None)
    labels = au_matrix(_noisy_rows(task.manifest)["aus"], len(task.au_names))
    results = [finish(0, data_root, data_ref, task, trainer, result, labels, None)]

    overrides: dict[str, Any] = {"epochs": round_epochs or max(1, recipe.epochs // 2)}
    if retrain == "noisy_heads":
        overrides.update({"monitor": "val/loss", "monitor_mode": "min"})
    round_recipe = recipe.with_overrides({**overrides, **dict(round_overrides or {})})
    root, ref = data_root, data_ref
    for k in range(1, rounds + 1):
        previous = labels
        manifest, labels = refine_noisy_labels(trainer.model, task, gamma, recipe.eval_batch_size)
        staged = write_refined_dataset(
            root, manifest, run_dir / f"round{k}" / "labels", name=f"{base_name}-round{k}",
            provenance={"refined_labels": {"round": k, "gamma": gamma, "parent": ref, "retrain": retrain}},
        )
        root, ref = hooks.publish(k, staged, ref)
        model = trainer.model
        task, trainer, result = train(k, Path(root), ref, round_recipe, model)
        results.append(finish(k, Path(root), ref, task, trainer, result, labels, previous))
    return AURoundsResult(rounds=results, model=trainer.model,
                          extra={"gamma": gamma, "retrain": retrain, "round_recipe": round_recipe.to_dict()})
