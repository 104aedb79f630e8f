"""The generic trainer: determinism, resume, checkpoints, early stopping, DDP (2 gloo processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fer_core.training.callbacks import Callback, History
from fer_core.training.checkpoint import CheckpointError, load_checkpoint
from fer_core.training.recipe import Recipe, parse_set_options
from fer_core.training.trainer import Trainer, load_model_from_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from training_toy import ToyTask, toy_recipe  # noqa: E402

NONDET_KEYS = ("throughput/samples_per_s", "epoch_seconds")


def _comparable(history):
    return [{k: v for k, v in h.items() if k not in NONDET_KEYS} for h in history]


def test_training_learns_and_is_deterministic(tmp_path):
    a = Trainer(toy_recipe(), ToyTask(), tmp_path / "a").fit()
    b = Trainer(toy_recipe(), ToyTask(), tmp_path / "b").fit()
    assert _comparable(a.history) == _comparable(b.history)
    assert a.history[-1]["val/accuracy"] > 0.8, a.history[-1]
    assert a.test_metrics["test/accuracy"] > 0.8
    c = Trainer(toy_recipe(seed=1), ToyTask(), tmp_path / "c").fit()
    assert _comparable(c.history) != _comparable(a.history)


class _Crash(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, step, loss, batch_size):
        if step == self.at_step:
            raise KeyboardInterrupt("simulated kill")


def test_resume_after_a_kill_ends_where_the_uninterrupted_run_ends(tmp_path):
    full = Trainer(toy_recipe(), ToyTask(), tmp_path / "full").fit()
    run = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        Trainer(toy_recipe(), ToyTask(), run, callbacks=[_Crash(at_step=15)]).fit()  # mid epoch 3
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    resumed = Trainer(toy_recipe(), ToyTask(), run).fit(resume=True)
    assert _comparable(resumed.history) == _comparable(full.history)
    full_state = load_checkpoint(tmp_path / "full" / "last.pt")["model_state"]
    resumed_state = load_checkpoint(run / "last.pt")["model_state"]
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


def test_checkpoint_rebuilds_the_model_and_refuses_corruption(tmp_path):
    Trainer(toy_recipe(epochs=1), ToyTask(), tmp_path).fit()
    model, state = load_model_from_checkpoint(tmp_path / "best.pt")
    assert state["recipe"]["network"] == "toy_net" and model.metadata.name == "toy_net"
    raw = (tmp_path / "best.pt").read_bytes()
    (tmp_path / "best.pt").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(tmp_path / "best.pt")
    (tmp_path / "last.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match="unverified"):
        load_checkpoint(tmp_path / "last.pt")


def test_early_stopping_stops_after_patience(tmp_path):
    # lr so small that validation accuracy cannot improve after the first epoch
    history = History()
    result = Trainer(toy_recipe(lr=1e-9, epochs=10, early_stopping_patience=2), ToyTask(), tmp_path,
                     callbacks=[history]).fit()
    assert result.stopped_early and result.epochs_run == 3 and len(history.epochs) == 3


def test_recipe_overrides_yaml_and_validation(tmp_path):
    r = Recipe(network="ca_resnet", model_kwargs={"width": 64})
    r2 = r.with_overrides(parse_set_options(["lr=0.01", "model_kwargs.width=16", "data.val_fraction=0.2"]))
    assert (r2.lr, r2.model_kwargs["width"], r2.data["val_fraction"]) == (0.01, 16, 0.2)
    assert r.fingerprint() != r2.fingerprint() and r.fingerprint() == Recipe(network="ca_resnet", model_kwargs={"width": 64}).fingerprint()
    (tmp_path / "r.yaml").write_text("epochs: 3\nmodel_kwargs:\n  width: 8\n")
    r3 = r.with_yaml(tmp_path / "r.yaml")
    assert r3.epochs == 3 and r3.model_kwargs["width"] == 8
    assert r3.to_params()["model_kwargs.width"] == "8"
    with pytest.raises(ValueError, match="unknown recipe key"):
        r.with_overrides({"lrr": 1})
    with pytest.raises(ValueError, match="optimizer"):
        r.with_overrides({"optimizer": "lion"})


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_a_single_process_run(tmp_path):
    single = Trainer(toy_recipe(), ToyTask(), tmp_path / "single").fit()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "ddp_train_script.py"), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    single_state = load_checkpoint(tmp_path / "single" / "last.pt")["model_state"]
    ddp_state = load_checkpoint(tmp_path / "ddp" / "last.pt")["model_state"]
    assert single_state.keys() == ddp_state.keys()
    for name, value in single_state.items():
        assert torch.allclose(ddp_state[name], value, atol=1e-5), name
    for s, d in zip(single.history, ddp["history"]):
        assert abs(s["train/loss"] - d["train/loss"]) < 1e-5 and s["val/accuracy"] == d["val/accuracy"]


def test_hold_decay_cosine_factor_by_hand():
    import math as _math

    from fer_core.training.trainer import hold_decay_cosine_factor

    assert [hold_decay_cosine_factor(e, 50, 0.9, 300) for e in (0, 25, 49)] == [1.0, 1.0, 1.0]
    assert hold_decay_cosine_factor(50, 50, 0.9, 300) == 1.0
    # epoch 51: 0.9^1 · ½(1 + cos(π/250))
    assert hold_decay_cosine_factor(51, 50, 0.9, 300) == pytest.approx(0.9 * 0.5 * (1 + _math.cos(_math.pi / 250)))
    assert hold_decay_cosine_factor(300, 50, 0.9, 300) == pytest.approx(0.0, abs=1e-12)
