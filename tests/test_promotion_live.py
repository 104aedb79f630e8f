"""Promotion against the live ``fer serve``, and a promotion killed half way (issue 11 item 3).

One tracked training run is registered twice (v1, v2), and a real ``fer serve`` (CLI subprocess)
serves the workspace. ``fer promote`` / ``fer rollback`` (CLI subprocesses, no ``--url``) must find
that server through its state file and change what *it* serves, never start a private Triton. A
``fer promote`` SIGKILLed between the ensemble switch and the alias update (its first
``set_alias`` call kills the process) leaves a journal; the next ``fer serve`` start finishes the
operation, so the registry's champion and Triton's served ensemble agree again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fer_cli.main import main
from fer_core.data.formats import adapt, get_format
from fer_platform.workspace import Workspace
from registry import models as reg
from registry.datasets import DatasetStore
from registry.training import resolve_recipe, train_tracked
from serving.live import _ensemble_pin, find_live
from serving.repository import ModelRepository

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.integration
NETWORK = "ca_resnet"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
OPEN = ["--floor", "0", "--margin", "1", "--latency-budget-ms", "10000", "--smoke-samples", "4",
        "--latency-requests", "5"]
# Runs `fer promote` with registry.models.set_alias replaced by a SIGKILL of the process itself:
# the kill lands exactly after the ensemble switch, before the first alias moves.
KILL_AT_ALIAS = (
    "import os, signal, sys\n"
    "import registry.models as reg\n"
    "reg.set_alias = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
    "from fer_cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "FER_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}
    for var in ("FER_TRITON_URL", "FER_TRACKING_URI", "FER_REGISTRY_URI", "MLFLOW_TRACKING_URI",
                "MLFLOW_REGISTRY_URI", "FER_DVC_REMOTE"):
        env.pop(var, None)
    return env


def _fer(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fer_cli", *args], env=_env(home), capture_output=True, text=True,
                          timeout=timeout)


def _start_serve(home: Path, repo: ModelRepository) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "fer_cli", "serve", "--grpc-port", "0", "--metrics-port", "0",
                             "--check-interval", "0.5", "--reconcile-interval", "1", "--duration", "900"],
                            env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while find_live(repo)[0] is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    return proc


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("promotion-live")
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_HOME", str(home))
        for var in ("FER_TRACKING_URI", "FER_REGISTRY_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                    "FER_DVC_REMOTE", "FER_TRITON_URL"):
            mp.delenv(var, raising=False)
        ws = Workspace(home).ensure()
        source = get_format("fer2013").write_synthetic(root / "src", size=140)
        adapt("fer2013", source, root / "prepared", name="fer")
        data = DatasetStore(ws).add("fer", root / "prepared")
        recipe = resolve_recipe(NETWORK, "quick", None, {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16,
                                                         "model_kwargs.width": 8})
        outcome = train_tracked(NETWORK, data.ref, recipe, progress=False, workspace=ws)
        for _ in range(2):
            assert main(["register", NETWORK, "--run", outcome.run_id]) == 0
        repo = ModelRepository(ws.triton_repository)
        repo.root.mkdir(parents=True, exist_ok=True)
        proc = _start_serve(home, repo)
        state = SimpleNamespace(home=home, ws=ws, repo=repo, proc=proc)
        try:
            yield state
        finally:
            _stop(state.proc)


def _served(platform) -> tuple[list[int], int | None]:
    """(versions the live Triton serves, the version its loaded ensemble is pinned to)."""
    live, why = find_live(platform.repo)
    assert live is not None, why
    endpoint = live.endpoint()
    return endpoint.served_versions(NETWORK), _ensemble_pin(endpoint.model_config(f"{NETWORK}_ensemble"), NETWORK)


def _champion(platform) -> int:
    return reg.get_alias(NETWORK, "champion", platform.ws).version


def test_promote_and_rollback_act_on_the_live_fer_serve(platform):
    for version in (1, 2):
        result = _fer(platform.home, "promote", NETWORK, "--version", str(version), *OPEN)
        assert result.returncode == 0, result.stderr
        assert "acting on the running `fer serve`" in result.stdout
        assert "started the embedded Triton" not in result.stdout
        assert _served(platform) == ([version], version) and _champion(platform) == version
    result = _fer(platform.home, "rollback", NETWORK)
    assert result.returncode == 0 and "acting on the running `fer serve`" in result.stdout, result.stderr
    assert _served(platform) == ([1], 1) and _champion(platform) == 1
    models = _fer(platform.home, "models")
    assert models.returncode == 0 and "Triton serves [1]; ensemble READY, pinned to 1" in models.stdout, models.stdout


def test_promote_killed_between_switch_and_aliases_is_finished_by_the_next_start(platform):
    before = _champion(platform)  # 1 (after the rollback above), previous 2
    result = subprocess.run([sys.executable, "-c", KILL_AT_ALIAS, "promote", NETWORK, "--version", "2", *OPEN],
                            env=_env(platform.home), capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)
    journal = platform.ws.root / "locks" / f"promote-{NETWORK}.journal"
    assert journal.is_file()
    # The split state of the issue: Triton on v2, the registry still on v1.
    assert _served(platform)[1] == 2 and _champion(platform) == before == 1
    time.sleep(3)  # fer serve's reconciliation notices and alerts, but never follows the alias by itself
    live, _ = find_live(platform.repo)
    assert any("registry's champion is v1 but the served (gated) champion is v2" in a for a in live.alerts), live.alerts
    # The next start of fer serve replays the journal: aliases finished, one champion everywhere.
    out, _ = _stop(platform.proc)
    platform.proc = _start_serve(platform.home, platform.repo)
    deadline = time.monotonic() + 60
    while _served(platform)[0] != [2] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not journal.exists()
    assert _champion(platform) == 2 and reg.get_alias(NETWORK, "previous", platform.ws).version == 1
    assert _served(platform) == ([2], 2)
