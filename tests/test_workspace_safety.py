"""Issue 11, items 10 and 12, through the real ``fer`` CLI in subprocesses (real DVC, MLflow/SQLite,
``mlflow server``; no mocks):

* two identical ``fer train --register`` at once: one MLflow run, one registered version, and the
  other process says why in one line;
* a read-only ``FER_HOME``: one line and exit code 1, never an ``OSError`` traceback;
* ``fer ui``: an upload through MLflow's artifact proxy lands under ``FER_HOME`` (not ``./mlartifacts``
  of the current folder), and SIGTERM stops the server it started;
* what the platform writes is readable by its owner only (umask 077).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "epochs=2", "--set", "max_steps_per_epoch=4", "--set", "batch_size=16",
        "--set", "model_kwargs.width=8"]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FER_", "MLFLOW_TRACKING", "MLFLOW_REGISTRY"))}
    env.update({"FER_HOME": str(home), "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true",
                "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"})
    return env


def _fer(*args: str, home: Path, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fer_cli", *args], env=_env(home), cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fer: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A workspace written by the CLI only (so the CLI's umask applies): one FER2013 dataset."""
    root = tmp_path_factory.mktemp("safety")
    home = root / "fer-home"  # created by fer itself
    synth = _fer("data", "synth", "fer2013", str(root / "src"), "--size", "140", home=home)
    assert synth.returncode == 0, synth.stderr[-2000:]
    add = _fer("data", "add", "fer", str(root / "src"), "--format", "fer2013", home=home)
    assert add.returncode == 0, add.stdout[-2000:] + add.stderr[-2000:]
    return home


@pytest.mark.slow
@pytest.mark.integration
def test_two_identical_trainings_at_once_share_nothing_and_register_one_version(workspace):
    from mlflow.tracking import MlflowClient

    argv = [sys.executable, "-m", "fer_cli", "train", "ca_resnet", "--data", "fer", *TINY, "--register"]
    procs = [subprocess.Popen(argv, env=_env(workspace), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1], [(r.returncode, r.stderr[-2000:]) for r in results]
    loser = next(r for r in results if r.returncode == 1)
    message = _one_line_error(loser)
    # at the same moment: the lock; a moment later: the finished run folder (resume it)
    assert "another process is training ca_resnet" in message or "holds a run of this recipe" in message

    uri = f"sqlite:///{workspace / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("fer-ca_resnet")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    # every epoch logged once: the run was not shared by two trainers
    history = client.get_metric_history(runs[0].info.run_id, "val/loss")
    assert sorted(m.step for m in history) == sorted({m.step for m in history}), history
    versions = client.search_model_versions("name='fer-ca_resnet'")
    assert len(versions) == 1 and versions[0].run_id == runs[0].info.run_id


def _others_can_read(path: Path, top: Path) -> bool:
    """Can a user outside the owner's group read ``path``: every folder from ``top`` down lets
    others through (x) and the entry itself lets them read (r)."""
    if path.is_symlink() or not path.lstat().st_mode & stat.S_IROTH:
        return False
    return all((top / folder).stat().st_mode & stat.S_IXOTH for folder in path.relative_to(top).parents)


@pytest.mark.slow
@pytest.mark.integration
def test_what_the_platform_writes_is_private_to_its_owner(workspace):
    # the dataset (DVC cache and remote, GX docs) and, in the test above or here when run alone, a
    # training and its registration (MLflow DB, checkpoints, artifacts), all through the CLI
    if not (workspace / "mlflow" / "mlflow.db").exists():
        proc = _fer("train", "ca_resnet", "--data", "fer", *TINY, "--register", home=workspace)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert stat.S_IMODE(workspace.stat().st_mode) == 0o700
    written = list(workspace.rglob("*"))
    leaks = [str(p) for p in written if _others_can_read(p, workspace)]
    assert not leaks, leaks[:20]
    # the files named in the issue carry no group/other bits at all (DVC chmods its own cache files
    # 0444; they sit in 0700 folders, which the check above covers)
    named = [p for p in written if p.name == "mlflow.db" or p.suffix == ".pt" or p.name == "manifest.parquet"]
    assert any(p.name == "mlflow.db" for p in named) and any(p.suffix == ".pt" for p in named)
    loose = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in named if p.stat().st_mode & 0o077]
    assert not loose, loose


def _read_only_mount(source: Path, target: Path, argv: list[str]) -> subprocess.CompletedProcess:
    script = (f"mount --bind {source} {target} && mount -o remount,ro,bind {target} && "
              f"exec {' '.join(argv)}")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], env=_env(target), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _can_mount_read_only(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    (tmp_path / "probe-src").mkdir()
    (tmp_path / "probe").mkdir()
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {tmp_path / 'probe-src'} {tmp_path / 'probe'}"],
                          capture_output=True, timeout=30)
    return proc.returncode == 0


def test_an_uncreatable_workspace_is_one_line():
    proc = _fer("train", "ca_resnet", "--data", "fer", home=Path("/proc/fer-home"), timeout=300)
    assert proc.returncode == 1
    assert "set FER_HOME to a folder you can write" in _one_line_error(proc)


@pytest.mark.integration
def test_a_read_only_workspace_is_one_line_for_every_writing_command(workspace, tmp_path):
    if not _can_mount_read_only(tmp_path):
        pytest.skip("needs `unshare -m` and bind mounts (root in a mount namespace) for a read-only FER_HOME")
    target = tmp_path / "ro-home"
    target.mkdir()
    commands = [["train", "ca_resnet", "--data", "fer", "--set", "epochs=1"],
                ["data", "add", "again", str(tmp_path), "--format", "fer2013"],
                ["ui", "--port", "5999"]]
    for command in commands:
        proc = _read_only_mount(workspace, target, [sys.executable, "-m", "fer_cli", *command])
        assert proc.returncode == 1, (command, proc.stderr[-2000:])
        assert f"cannot write {target}" in _one_line_error(proc), command
    listed = _read_only_mount(workspace, target, [sys.executable, "-m", "fer_cli", "data", "list"])
    assert listed.returncode == 0 and "fer" in listed.stdout  # reading still works


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_mentioning(text: str) -> list[int]:
    """Processes (not ``fer`` itself) whose command line contains ``text``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and "fer_cli" not in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.integration
def test_fer_ui_keeps_uploads_in_the_workspace_and_stops_on_sigterm(tmp_path):
    home, cwd, port = tmp_path / "home", tmp_path / "cwd", _free_port()
    cwd.mkdir()
    ui = subprocess.Popen([sys.executable, "-m", "fer_cli", "ui", "--port", str(port)], env=_env(home),
                          cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert ui.poll() is None, ui.stdout.read().decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "fer ui did not become healthy"
            time.sleep(0.5)
        # an unauthenticated upload through the artifact proxy, as anyone on 127.0.0.1 can send it
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow-artifacts/artifacts/0/x/up.txt",
                                         data=b"uploaded", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        assert (home / "mlflow" / "artifacts" / "0" / "x" / "up.txt").read_bytes() == b"uploaded"
        assert not (cwd / "mlartifacts").exists() and list(cwd.iterdir()) == []
        assert _processes_mentioning(f"--port {port}")  # the mlflow server and its uvicorn
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(60) == 0
        deadline = time.monotonic() + 30
        while (_listening(port) or _processes_mentioning(f"--port {port}")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _listening(port), "MLflow still listens after SIGTERM to fer ui"
        assert _processes_mentioning(f"--port {port}") == []
    finally:
        for pid in _processes_mentioning(f"--port {port}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if ui.poll() is None:
            ui.kill()
            ui.wait()
