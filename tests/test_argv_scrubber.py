"""The argv scrubber preload (serving/backends/scrub_argv.c), on a plain process instead of Triton.

The preload is what keeps the model-control key out of ``/proc/<pid>/cmdline`` for the embedded
server and the Triton containers (docker/scripts/triton.sh). A Python child shows both sides: what
``main()`` got (``sys.argv``: the key, read from ``FER_TRITON_KEY_FILE``) and what every local user
reads in ``/proc/self/cmdline`` (the placeholder). A placeholder it cannot fill stops the process
with exit 78 (it never runs with the placeholder text as its key). Needs a C compiler (skips without).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving.server import CONTROL_HEADER, KEY_PLACEHOLDER, build_argv_scrubber

SHOW = ("import json, sys; cmdline = open('/proc/self/cmdline', 'rb').read().decode();"
        " print(json.dumps({'argv': sys.argv[1:], 'cmdline': cmdline.split(chr(0))}))")
OPTION = f"--grpc-restricted-protocol=model-repository:{CONTROL_HEADER}="


@pytest.fixture(scope="module")
def scrubber(tmp_path_factory) -> Path:
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the argv scrubber is not built")
    library = build_argv_scrubber(tmp_path_factory.mktemp("scrubber"))
    assert library is not None and library.is_file()
    return library


def _run(scrubber: Path, *args: str, key_file: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FER_TRITON_KEY_FILE"}
    env["LD_PRELOAD"] = str(scrubber)
    if key_file is not None:
        env["FER_TRITON_KEY_FILE"] = str(key_file)
    return subprocess.run([sys.executable, "-c", SHOW, *args], env=env, capture_output=True, text=True, timeout=60)


def _key_file(folder: Path, text: str) -> Path:
    path = folder / "control.key"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_placeholder_is_filled_from_the_key_file_and_never_in_cmdline(scrubber, tmp_path):
    key = secrets.token_hex(32)
    proc = _run(scrubber, "--other=1", OPTION + KEY_PLACEHOLDER,
                f"--http-restricted-api=inference:{CONTROL_HEADER}={KEY_PLACEHOLDER}",
                key_file=_key_file(tmp_path, key + "\n"))
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["argv"] == ["--other=1", OPTION + key, f"--http-restricted-api=inference:{CONTROL_HEADER}={key}"]
    assert key not in "".join(seen["cmdline"])
    assert OPTION + KEY_PLACEHOLDER in seen["cmdline"]


def test_an_inline_key_is_overwritten_in_cmdline(scrubber):
    key = secrets.token_hex(32)
    proc = _run(scrubber, OPTION + key)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["argv"] == [OPTION + key]
    assert key not in "".join(seen["cmdline"]) and "--grpc-restricted-protocol=" + "x" * 20 in seen["cmdline"][-2]


@pytest.mark.parametrize("content", [None, "", "short\n", "a" * 40 + "\n" + "b" * 40 + "\n"],
                         ids=["no variable", "empty", "short", "two lines"])
def test_a_placeholder_it_cannot_fill_stops_the_process(scrubber, tmp_path, content):
    key_file = None if content is None else _key_file(tmp_path, content)
    proc = _run(scrubber, OPTION + KEY_PLACEHOLDER, key_file=key_file)
    assert proc.returncode == 78 and proc.stdout == ""
    assert proc.stderr.startswith("fer argv scrubber: ") and len(proc.stderr.splitlines()) == 1


def test_a_missing_key_file_stops_the_process(scrubber, tmp_path):
    proc = _run(scrubber, OPTION + KEY_PLACEHOLDER, key_file=tmp_path / "absent.key")
    assert proc.returncode == 78 and "cannot open FER_TRITON_KEY_FILE" in proc.stderr
