"""FER2013 adapter errors name the right row, value and reason (issue 11, item 11).

Each case goes through ``fer data add`` too: one line on stderr, exit 2, no traceback, nothing added.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from fer_cli.main import main
from fer_core.data.formats.fer2013 import read_fer2013_csv

PIXELS = " ".join(["7"] * 2304)


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    text = "emotion,pixels,Usage\n" + "".join(f"{e},{p},Training\n" for e, p in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_a_float_label_is_reported_at_its_own_row_with_its_own_value(tmp_path, suffix):
    path = _csv(tmp_path / f"fer2013{suffix}", [("4", PIXELS)] * 5 + [("3.0", PIXELS), ("1", PIXELS)])
    with pytest.raises(ValueError) as info:
        read_fer2013_csv(path)
    assert "row 5 (line 7): emotion '3.0' is not an integer" in str(info.value)
    assert "4.0" not in str(info.value)


def test_integer_labels_stay_integers(tmp_path):
    emotions, usages, pixels = read_fer2013_csv(_csv(tmp_path / "fer2013.csv", [("4", PIXELS), ("0", PIXELS)]))
    assert emotions.tolist() == [4, 0] and usages.tolist() == ["Training"] * 2 and pixels.shape == (2, 48, 48)


def test_a_pixel_out_of_range_is_named_not_the_count(tmp_path):
    bad = " ".join(["7"] * 100 + ["256"] + ["7"] * 2203)
    path = _csv(tmp_path / "fer2013.csv", [("4", PIXELS), ("4", PIXELS), ("1", bad)])
    with pytest.raises(ValueError) as info:
        read_fer2013_csv(path)
    message = str(info.value)
    assert "row 2 (line 4): pixel 100 is 256, outside 0..255" in message
    assert "got 2304" not in message


def test_a_short_row_reports_its_count(tmp_path):
    path = _csv(tmp_path / "fer2013.csv", [("4", PIXELS), ("1", " ".join(["7"] * 2000))])
    with pytest.raises(ValueError, match=r"row 1 \(line 3\): pixels must be 2304 space-separated values, got 2000"):
        read_fer2013_csv(path)


def test_a_64_mb_line_is_named_without_reader_hints(tmp_path):
    path = tmp_path / "fer2013.csv"
    with open(path, "w") as handle:
        handle.write(f"emotion,pixels,Usage\n4,{PIXELS},Training\n1,")
        chunk = "7 " * (1 << 20)  # 2 MB
        for _ in range(32):
            handle.write(chunk)
        handle.write(",Training\n")
    with pytest.raises(ValueError) as info:
        read_fer2013_csv(path)
    message = str(info.value)
    assert "line 3 is 67.1 MB long; a FER2013 row is at most" in message
    assert "block" not in message and "straddl" not in message


def test_fer_data_add_prints_one_line_and_exits_2(workspace, tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    _csv(source / "fer2013.csv", [("4", PIXELS)] * 5 + [("3.0", PIXELS)])
    assert main(["data", "add", "fer", str(source), "--format", "fer2013"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "row 5 (line 7): emotion '3.0' is not an integer" in err
