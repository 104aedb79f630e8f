"""Bad data through the full ``fer data add`` path: every applicable corruption of the catalogue
(``tests/corruptions.py``) stops at the gate; nothing is versioned, so nothing can be trained,
registered or served from it.

The adapter runs for real on a generated FER2013-format source; the corruption is applied to its
output inside ``fer data add`` (between adapt and gate, where a broken adapter or source would
show), then the real gate, DVC store and exit code decide. ``tests/test_data_gates.py`` checks
that each corruption is caught by its own check; the ingest flow's refusal is in ``tests/test_flows.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fer_cli import data as data_cli
from fer_cli.main import main
from fer_core.data.formats import adapt, get_format
from tests.corruptions import applicable

NAME = "fer"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return get_format("fer2013").write_synthetic(tmp_path_factory.mktemp("src") / "fer2013", size=140)


def _catalogue(source: Path, tmp: Path) -> list:
    prepared = tmp / "probe"
    adapt("fer2013", source, prepared, name=NAME)
    return [c for c in applicable(prepared) if c.bounds is None]  # the CLI gates with default bounds


@pytest.mark.slow  # `fer data add` once per corruption (~20 s)
def test_every_corruption_stops_at_fer_data_add_and_nothing_is_versioned(workspace, source, tmp_path, monkeypatch,
                                                                         capsys):
    from registry.datasets import DatasetStore

    corruptions = _catalogue(source, tmp_path)
    assert len(corruptions) >= 10, [c.name for c in corruptions]
    real_adapt = data_cli._adapt_into
    refused, let_through = [], []
    for corruption in corruptions:
        def adapt_then_corrupt(*args, _corruption=corruption, **kwargs):
            prepared = real_adapt(*args, **kwargs)
            _corruption.apply(prepared)
            return prepared

        monkeypatch.setattr(data_cli, "_adapt_into", adapt_then_corrupt)
        code = main(["data", "add", NAME, str(source), "--format", "fer2013"])
        captured = capsys.readouterr()
        (refused if code == 1 and "nothing was added" in captured.err else let_through).append(corruption.name)
        assert "Traceback" not in captured.err
    assert let_through == [], let_through
    store = DatasetStore(workspace)
    assert store.list() == [] and store.list(NAME) == []
    monkeypatch.setattr(data_cli, "_adapt_into", real_adapt)
    # Nothing versioned: training has no data to start from, so nothing is registered or served.
    assert main(["train", "ca_resnet", "--data", NAME]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not workspace.triton_repository.exists() or not any(workspace.triton_repository.iterdir())
    # The clean source still goes through (the refusals were the corruptions, not the path).
    assert main(["data", "add", NAME, str(source), "--format", "fer2013"]) == 0
