"""NVIDIA's ``perf_analyzer`` (the tool's own client) against the embedded Triton: bench/perf_analyzer.py.

Needs the tool venv of ``bench/perf_tools.sh`` (``make perf-tools``): tritonclient 2.41's binary,
Debian's libb64-0d and the CUDA runtime wheel. Skipped, saying so, where it is not installed; with
``CI`` set it fails instead (.ci/run installs it), so a missing install step cannot pass as a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "perf_analyzer.py"


def _tool() -> Path:
    spec = importlib.util.spec_from_file_location("bench_perf_analyzer", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    tool = bench.find_perf_analyzer()
    if tool is None:
        looked_at = os.environ.get(bench.TOOL_ENV) or bench.DEFAULT_TOOL
        reason = (f"perf_analyzer is not installed ({looked_at} missing): run bench/perf_tools.sh "
                  "(make perf-tools) to install it")
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (.ci/run must install it)")
        pytest.skip(reason)
    return tool


@pytest.mark.integration  # starts tritonserver
@pytest.mark.slow  # tens of seconds of perf_analyzer windows
def test_perf_analyzer_measures_the_network_and_the_ensemble(tmp_path):
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.grpc")
    tool = _tool()
    out = tmp_path / "figures.json"
    # Short windows, loose stability: this checks that the tool runs and answers, not the figures.
    command = [sys.executable, str(BENCH), "--perf-analyzer", str(tool), "--concurrency", "1", "4",
               "--window-ms", "500", "--stability", "100", "--max-trials", "10", "--faces", "4",
               "--no-python-bench", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    levels = {(r["model"], r["concurrency"]): r for r in figures["levels"]}
    assert set(levels) == {(m, c) for m in ("ca_resnet", "ca_resnet_ensemble") for c in (1, 4)}
    for key, level in levels.items():
        assert level["tool"] == "perf_analyzer" and level["ok"], (key, level)
        assert level["throughput"] > 0 and 0 < level["p50_ms"] <= level["p99_ms"], (key, level)
    # The ensemble answered every request perf_analyzer sent (at concurrency 1 it also checked each
    # response against the Python client's answer, validation_data), and none failed.
    assert figures["answered"]["ca_resnet_ensemble"] > 0
    assert figures["failed"] == {"ca_resnet": 0, "ca_resnet_ensemble": 0}
    assert figures["perf_analyzer"].startswith("Perf Analyzer Version 2.41")
    assert "fer-control-key" not in done.stdout + done.stderr  # the run needs and shows no key


def test_a_missing_perf_analyzer_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "no-such-perf_analyzer"
    done = subprocess.run([sys.executable, str(BENCH), "--perf-analyzer", str(missing)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "bench/perf_tools.sh" in done.stderr, done.stderr
