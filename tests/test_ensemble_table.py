"""The README's table of the ensembles' inputs and outputs is what the generated configs say.

The table is generated (``python -m serving.ensemble_table``) from the ``config.pbtxt`` files that
``serving.repository`` writes for the five default networks; every copy of it in the docs (between
its markers) must equal a fresh generation, so a change of an ensemble's interface fails here until
the docs are regenerated.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.ensemble_table import BEGIN, END, build_reference_repository, ensemble_tensors, markdown_table

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "readme" / "perf.md"]  # perf.md: the text the README gains


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_reference_repository(tmp_path_factory.mktemp("ensemble-table"))


def _copies() -> dict[Path, str]:
    copies = {}
    for path in DOCS:
        text = path.read_text() if path.is_file() else ""
        if BEGIN in text:
            assert text.count(BEGIN) == 1 and END in text.split(BEGIN, 1)[1], f"{path}: unbalanced table markers"
            copies[path] = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    return copies


@pytest.mark.slow  # exports five ONNX models
def test_documented_ensemble_table_matches_the_generated_configs(repo):
    copies = _copies()
    assert copies, f"no ensemble table (marker {BEGIN!r}) in {[str(p.relative_to(ROOT)) for p in DOCS]}"
    table = markdown_table(repo)
    for path, copy in copies.items():
        assert copy == table, (f"{path.relative_to(ROOT)} is out of date: regenerate it with "
                               f"`python -m serving.ensemble_table`\n{table}")


@pytest.mark.slow
def test_every_default_network_has_its_ensemble_in_the_table(repo):
    from fer_core.models.catalog import list_networks

    table = markdown_table(repo)
    for network in list_networks(default_only=True):
        docs = ensemble_tensors(repo.root / f"{network}_ensemble" / "config.pbtxt")
        inputs = [d.name for d in docs if d.direction == "input"]
        assert inputs == (["FRAMES"] if network in ("c3d_ecstfl", "micro_lsh") else ["IMAGE"]), network
        assert {"FACE_FOUND", "LABEL", "PROBABILITIES"} <= {d.name for d in docs if d.direction == "output"}
        for d in docs:
            assert f"| `{network}_ensemble` | {d.direction} | `{d.name}` | {d.datatype} " in table
