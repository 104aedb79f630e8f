"""The sixth network of ``tests/sixth_network.py`` (one file) passes the checks every network passes
(``model_checks.check_network``), is listed by ``fer train --list`` and the pipeline, and a typo in
the plugin list fails loudly.

In this process the network is registered by the module fixture and removed after this module's
tests, so the other modules see the registry as shipped; subprocesses find it through
``FER_NETWORK_MODULES``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

NAME = "tiny_fer6"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    from fer_core.models import catalog

    module = importlib.import_module("sixth_network")
    catalog.register_network(module.SPEC)  # idempotent when the import just registered it
    yield
    catalog._NETWORKS.pop(NAME, None)  # leave the registry as the other test modules expect it
    catalog._MODEL_FACTORIES.pop(NAME, None)
    catalog._PROFILES.pop(NAME, None)


def _fer(*argv: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "FER_HOME": str(home),
           "FER_NETWORK_MODULES": "sixth_network"}
    return subprocess.run([sys.executable, "-m", "fer_cli", *argv], env=env, capture_output=True, text=True, timeout=120)


def test_the_sixth_network_passes_every_network_check(tmp_path):
    from model_checks import check_network

    check_network(NAME, tmp_path, size=60)


@pytest.mark.slow  # CLI subprocesses over every network (~9 s)
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
