"""DVC-backed dataset versions against a real DVC repository and local remote."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from fer_core.data.manifest import DatasetCard, content_hash, write_prepared
from registry.datasets import DatasetStore, parse_ref

pytestmark = pytest.mark.integration  # DVC: a real remote, add and pull


def _prepared(root: Path, seed: int, n: int = 6) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    (root / "images").mkdir(parents=True)
    for i in range(n):
        img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"{i}.png"), img)
        rows.append(dict(id=f"s{i}", task="static", source="test", split="train" if i % 3 else "test",
                         path=f"images/{i}.png", label=i % 2, subject="", onset=-1, apex=-1, offset=-1,
                         num_frames=1, content_hash=content_hash(img)))
    card = DatasetCard(name="toy", task="static", source_format="test", classes=("a", "b"), num_samples=n)
    write_prepared(root, pd.DataFrame(rows), card)
    return root


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_add_is_content_addressed_and_pull_restores_a_clean_workspace(workspace, tmp_path):
    store = DatasetStore(workspace)
    v1 = store.add("toy", _prepared(tmp_path / "a", seed=1), source="unit")
    digest = _tree_digest(store.path("toy"))
    again = store.add("toy", _prepared(tmp_path / "b", seed=1))
    assert again.version == v1.version, "identical content must give the identical version"
    v2 = store.add("toy", _prepared(tmp_path / "c", seed=2))
    assert v2.version != v1.version
    assert [v.version for v in store.list("toy")] == [v1.version, v2.version]
    assert store.get("toy").version == v2.version
    assert store.get("toy", v1.short).version == v1.version

    # A clean workspace: only the remote survives. The full hash alone restores the data.
    shutil.rmtree(workspace.dvc_repo)
    fresh = DatasetStore(workspace)
    restored = fresh.pull("toy", v1.version)
    assert _tree_digest(restored) == digest
    assert fresh.checked_out("toy") == v1.version


def test_bad_refs_and_names_are_value_errors(workspace):
    store = DatasetStore(workspace)
    with pytest.raises(ValueError, match="no versions"):
        store.get("nothing")
    with pytest.raises(ValueError, match="must be lower-case"):
        parse_ref("../evil@123")
    assert parse_ref("fer2013@abc") == ("fer2013", "abc")
    assert parse_ref("fer2013") == ("fer2013", None)
