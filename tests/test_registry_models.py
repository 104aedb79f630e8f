"""Registering versions and moving aliases in a real (SQLite) MLflow Model Registry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fer_core.training.trainer import Trainer
from registry import models as reg
from registry.tracking import MlflowCallback

sys.path.insert(0, str(Path(__file__).parent))
from training_toy import ToyTask, toy_recipe  # noqa: E402


def test_register_versions_tags_and_aliases(workspace, tmp_path):
    versions = []
    for i in range(2):
        cb = MlflowCallback("toy_net", tmp_path / f"run{i}", data_ref=f"toy@{i}", workspace=workspace)
        Trainer(toy_recipe(epochs=1, seed=i), ToyTask(), tmp_path / f"run{i}", callbacks=[cb]).fit()
        versions.append(reg.register("toy_net", cb.model_info.model_uri, cb.run_id,
                                     {"data_version": f"toy@{i}", "parity_passed": True}, workspace))
    assert [v.version for v in versions] == [1, 2]
    assert versions[1].tags == {"data_version": "toy@1", "parity_passed": "True"}
    assert reg.get_alias("toy_net", "champion", workspace) is None
    reg.set_alias("toy_net", "champion", 1, workspace)
    reg.set_alias("toy_net", "challenger", 2, workspace)
    assert reg.get_alias("toy_net", "champion", workspace).version == 1
    assert [v.aliases for v in reg.list_versions("toy_net", workspace)] == [("champion",), ("challenger",)]
    reg.set_alias("toy_net", "challenger", None, workspace)
    assert reg.get_alias("toy_net", "challenger", workspace) is None
    assert reg.list_networks(workspace) == ["toy_net"]
    with pytest.raises(ValueError, match="alias must be"):
        reg.set_alias("toy_net", "production", 1, workspace)
    with pytest.raises(ValueError, match="no version 9"):
        reg.get_version("toy_net", 9, workspace)
