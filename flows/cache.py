"""The retraining cache of ``retrain_all``: is there a registered version for this data and recipe?

The key is (data version, recipe fingerprint, code fingerprint), and the registry is where it is
looked up: every version that ``registry.export.export_and_register`` registers carries the tags
``data_version`` (``name@md5``), ``recipe_fingerprint`` and ``code_fingerprint`` (the network's
model, loss, task and preprocessing sources, :mod:`fer_core.training.fingerprint`), so a fix to
one network's code retrains that network only. That fingerprint is the one of the *effective* recipe,
the trainer's recipe with the model kwargs the data decides folded in (e.g. ``num_classes``), so
the requested recipe is turned into that effective recipe here before looking.

Lives here rather than in ``registry`` only because the flows were its first user; it is plain
library code (no Prefect).
"""

from __future__ import annotations

from fer_core.training.fingerprint import code_fingerprint
from fer_core.training.recipe import Recipe
from fer_core.training.trainer import effective_recipe
from fer_platform.workspace import Workspace
from registry import models as reg
from registry.datasets import DatasetStore, parse_ref


def recipe_on_data(network: str, data_ref: str, recipe: Recipe, workspace: Workspace) -> Recipe:
    """The recipe the trainer will actually run on ``data_ref`` (as ``Trainer`` folds data-decided kwargs)."""
    from fer_core.training.tasks import create_task

    name, version = parse_ref(data_ref)
    root = DatasetStore(workspace).pull(name, version)
    return effective_recipe(recipe, create_task(network, root, recipe))


def find_trained_version(network: str, data_ref: str, recipe: Recipe,
                         workspace: Workspace) -> reg.ModelVersion | None:
    """The newest registered version of ``network`` trained on ``data_ref`` with ``recipe`` and the
    current code of the network, or None."""
    if not parse_ref(data_ref)[1]:
        raise ValueError(f"the cache needs a full data version (name@md5), got {data_ref!r}")
    fingerprint = recipe_on_data(network, data_ref, recipe, workspace).fingerprint()
    code = code_fingerprint(network)
    hits = [v for v in reg.list_versions(network, workspace)
            if v.tags.get("data_version") == data_ref and v.tags.get("recipe_fingerprint") == fingerprint
            and v.tags.get("code_fingerprint") == code]
    return hits[-1] if hits else None


def find_rounds_version(data_ref: str, recipe: Recipe, rounds: int,
                        workspace: Workspace) -> reg.ModelVersion | None:
    """The newest ``au_cotrain`` version registered from ``rounds`` AU label-refinement rounds that
    started from ``data_ref`` with ``recipe`` and the network's current code, or None."""
    from registry.tracked_refinement import ROUNDS_BASE_DATA_TAG, ROUNDS_BASE_RECIPE_TAG, ROUNDS_TAG

    fingerprint = recipe_on_data("au_cotrain", data_ref, recipe, workspace).fingerprint()
    code = code_fingerprint("au_cotrain")
    hits = [v for v in reg.list_versions("au_cotrain", workspace)
            if v.tags.get(ROUNDS_TAG) == str(rounds) and v.tags.get(ROUNDS_BASE_DATA_TAG) == data_ref
            and v.tags.get(ROUNDS_BASE_RECIPE_TAG) == fingerprint and v.tags.get("code_fingerprint") == code]
    return hits[-1] if hits else None

