"""A sixth network in one file: this module is the whole network (model, factory, spec) plus its
test. Nothing else in the repository names it, yet it shows up in ``fer train --list``, the
pipeline's networks and sources, trains through its task, exports to ONNX and passes the checks every
network passes (``model_checks.check_network``).

The platform finds it through ``FER_NETWORK_MODULES`` (subprocesses); in this process it is
registered by importing this module, and removed again after the module's tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fer_core.data.labels import EXPRESSIONS
from fer_core.models.registry import FERModel, ModelMetadata, NetworkSpec, TensorSpec, register_network
from fer_core.training.recipe import Recipe

NAME = "tiny_fer6"


class TinyFER(FERModel):
    """Two convolutions and a linear head over 1x24x24 faces."""

    def __init__(self, num_classes: int = len(EXPRESSIONS), width: int = 8, img_size: int = 24,
                 label_names: tuple[str, ...] = EXPRESSIONS) -> None:
        super().__init__()
        if len(label_names) != num_classes:
            label_names = tuple(f"class_{i}" for i in range(num_classes))
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, stride=2),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)
        self.width = width
        self.metadata = ModelMetadata(
            name=NAME, task="static", inputs=(TensorSpec("image", (1, img_size, img_size)),),
            outputs=(TensorSpec("logits", (num_classes,), kind="logits", labels=tuple(label_names)),),
            mean=(0.5,), std=(0.5,), label_names=tuple(label_names), primary_output="logits")

    @property
    def num_features(self) -> int:
        return self.width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.fc(features)

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.width, num_classes)


def tiny_fer6(**kwargs) -> TinyFER:
    return TinyFER(**kwargs)


def _profiles() -> dict[str, Recipe]:
    paper = Recipe(network=NAME, profile="paper", loss_kwargs={"gamma": 2.0}, epochs=20, batch_size=64)
    return {"paper": paper, "quick": paper.with_overrides({"profile": "quick", "epochs": 2, "max_steps_per_epoch": 5})}


SPEC = register_network(NetworkSpec(
    name=NAME, factory=tiny_fer6, task="static", model_class=TinyFER, profiles=_profiles,
    data_format="fer2013", dataset="fer2013-tiny", primary_metric="accuracy", demo_size=200,
    description="a toy sixth network (test only)", default=False,
))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    yield
    from fer_core.models import registry

    registry._NETWORKS.pop(NAME, None)  # leave the registry as the other test modules expect it
    registry._MODEL_FACTORIES.pop(NAME, None)
    registry._PROFILES.pop(NAME, None)


def _fer(*argv: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "FER_HOME": str(home),
           "FER_NETWORK_MODULES": Path(__file__).stem}
    return subprocess.run([sys.executable, "-m", "fer_cli", *argv], env=env, capture_output=True, text=True, timeout=120)


def test_the_sixth_network_passes_every_network_check(tmp_path):
    from model_checks import check_network

    check_network(NAME, tmp_path, size=60)


def test_it_is_listed_by_fer_train_and_the_pipeline(tmp_path):
    listed = _fer("train", "--list", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith(NAME))
    assert "task static" in line and "fer2013" in line and "paper, quick" in line
    help_text = _fer("pipeline", "run", "--help", home=tmp_path)
    assert NAME in help_text.stdout.replace("\n", " ")
    printed = _fer("train", NAME, "--print-recipe", "--set", "model_kwargs.width=4", home=tmp_path)
    assert printed.returncode == 0 and "width: 4" in printed.stdout, printed.stderr
    refused = _fer("train", NAME, "--print-recipe", "--set", "model_kwargs.depth=4", home=tmp_path)
    assert refused.returncode == 2 and "known model_kwargs keys: img_size, label_names, num_classes, width" in refused.stderr


def test_it_is_among_the_pipeline_sources(workspace):
    pytest.importorskip("prefect")
    from flows.retrain_all import default_networks, default_sources

    assert default_sources(workspace)[NAME][:2] == ("fer2013-tiny", "fer2013")
    assert NAME not in default_networks()  # default=False: opt in with --networks


def test_a_typo_in_the_plugin_list_fails_loudly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FER_HOME": str(tmp_path), "FER_NETWORK_MODULES": "tets_sixth_network"}
    proc = subprocess.run([sys.executable, "-m", "fer_cli", "train", "--list"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "'tets_sixth_network' cannot be imported" in proc.stderr.strip().splitlines()[-1]
