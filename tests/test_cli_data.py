"""`fer data` end to end: generated data in every real format → adapt → GX gate → DVC version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fer_cli.main import main
from fer_core.data.formats import list_formats
from registry.datasets import DatasetStore

pytestmark = pytest.mark.integration  # `fer data` drives DVC (a real remote) and GX, mostly in subprocesses

FORMATS = [f.name for f in list_formats() if f.write_synthetic is not None]


def test_every_format_has_a_synthetic_writer():
    assert {"fer2013", "image_folder", "casme2", "samm", "smic", "dfew", "au_table"} <= set(FORMATS)


@pytest.mark.parametrize("format_name", FORMATS)
def test_synth_then_add_versions_every_format(format_name, workspace, tmp_path, capsys):
    src = tmp_path / "src"
    assert main(["data", "synth", format_name, str(src), "--seed", "3"]) == 0
    source = Path(capsys.readouterr().out.split("data to ")[1].split(" in ")[0])
    assert main(["data", "add", "ds", str(source), "--format", format_name]) == 0
    out = capsys.readouterr().out
    assert "data gate passed" in out and "added ds@" in out
    store = DatasetStore(workspace)
    (version,) = store.list("ds")
    manifest = pd.read_parquet(store.path("ds") / "manifest.parquet")
    assert len(manifest) == version.num_samples > 0
    # Same source again: same version, no new entry.
    assert main(["data", "add", "ds", str(source), "--format", format_name]) == 0
    assert [v.version for v in store.list("ds")] == [version.version]


def test_a_failed_gate_adds_nothing_and_exits_1(workspace, tmp_path, capsys):
    src = tmp_path / "src"
    assert main(["data", "synth", "image_folder", str(src), "--seed", "1"]) == 0
    source = Path(capsys.readouterr().out.split("data to ")[1].split(" in ")[0])
    victim = next(p for p in sorted(source.rglob("*")) if p.suffix.lower() in (".png", ".jpg"))
    victim.write_bytes(b"not an image")  # undecodable file
    assert main(["data", "add", "bad", str(source), "--format", "image_folder"]) == 1
    err = capsys.readouterr().err
    assert "nothing was added" in err
    assert DatasetStore(workspace).list("bad") == []
    assert not (workspace.dvc_repo / "datasets" / "bad").exists()


def test_list_pull_and_preview(workspace, tmp_path, capsys):
    src = tmp_path / "src"
    main(["data", "synth", "fer2013", str(src), "--size", "140"])
    source = Path(capsys.readouterr().out.split("data to ")[1].split(" in ")[0])
    main(["data", "add", "fer", str(source), "--format", "fer2013"])
    capsys.readouterr()
    assert main(["data", "list"]) == 0
    assert "fer " in capsys.readouterr().out
    version = DatasetStore(workspace).get("fer").version
    assert main(["data", "pull", f"fer@{version[:8]}"]) == 0
    png = tmp_path / "sheet.png"
    assert main(["data", "preview", "fer", "--out", str(png), "--count", "12"]) == 0
    assert png.stat().st_size > 1000


def test_bad_arguments_give_one_line_and_exit_2(workspace, tmp_path, capsys):
    assert main(["data", "add", "x", str(tmp_path / "missing"), "--format", "fer2013"]) == 2
    assert main(["data", "add", "Bad Name", str(tmp_path), "--format", "fer2013"]) == 2
    assert main(["data", "add", "x", str(tmp_path), "--format", "nope"]) == 2
    assert main(["data", "pull", "x@deadbeef"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("fer: error:") == 4


def test_help_on_every_level():
    for argv in (["--help"], ["data", "--help"], ["data", "add", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "fer_cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: fer" in proc.stdout
