"""Security promises, each checked against the real thing (no mocks).

* every server the platform starts listens on 127.0.0.1 only: the embedded ``tritonserver``, the
  MLflow server of ``fer ui`` and the local Prefect server (their actual listening sockets);
* checkpoints load with ``weights_only=True``: a pickle whose ``__reduce__`` runs code is refused
  and the code does not run, through the library and through ``fer register``;
* a corrupted or truncated checkpoint is refused by hash, also through ``fer register``;
* manifests and dataset sources cannot read or write outside their root (``..``, absolute paths,
  symlinks), and nothing in the code base extracts archives (so there is no archive slip to test);
* secrets configured in the environment appear nowhere in a tracked training's MLflow params,
  tags, metrics, artifacts, workspace files or console output; the git repository holds no secrets.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from fer_cli.main import main
from fer_core.data import formats
from fer_core.data.manifest import resolve_reference
from fer_core.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # the last: IPv4 loopback on a v6 socket


def _listening_addresses(root_pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket in LISTEN state owned by ``root_pid`` or its descendants."""
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for process in processes:
        try:
            connections = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
    return found


def _wait_listening(root_pid: int, port: int, timeout_s: float) -> set[tuple[str, int]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        addresses = _listening_addresses(root_pid)
        if any(p == port for _, p in addresses):
            return addresses
        time.sleep(0.5)
    raise AssertionError(f"nothing of pid {root_pid} listens on port {port} after {timeout_s:.0f}s")


# -- servers bind to loopback ---------------------------------------------------------------------

@pytest.mark.integration
def test_embedded_triton_listens_on_loopback_only(tmp_path):
    pytest.importorskip("pytriton")
    from serving.repository import ModelRepository
    from serving.server import EmbeddedTriton

    with EmbeddedTriton(ModelRepository(tmp_path / "models"), tmp_path / "triton", allow_http=True) as server:
        addresses = _wait_listening(server.process.pid, server.grpc_port, 30)
    ports = {server.http_port, server.grpc_port, server.metrics_port}
    assert ports <= {p for _, p in addresses}, addresses  # HTTP, gRPC and metrics all found
    assert {ip for ip, _ in addresses} <= LOOPBACK, addresses


@pytest.mark.integration
def test_fer_ui_mlflow_server_listens_on_loopback_only(workspace):
    from serving.server import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "fer_cli", "ui", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        addresses = _wait_listening(process.pid, port, 120)
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the MLflow server and its workers
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert {ip for ip, _ in addresses} <= LOOPBACK, addresses


@pytest.mark.integration
def test_local_prefect_server_listens_on_loopback_only(tmp_path):
    from flows.local_server import LocalPrefectServer

    with LocalPrefectServer(tmp_path / "prefect") as server:
        addresses = _wait_listening(server.process.pid, server.port, 30)
    assert {ip for ip, _ in addresses} <= LOOPBACK, addresses


# -- checkpoints ----------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs ``os.system``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint with a valid sidecar hash (so only the unpickler stands in the way)."""
    save_checkpoint({"model_state": {}, "recipe": {}}, path)
    torch.save({"format_version": 1, "payload": _Payload(marker)}, path)
    import hashlib

    path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    return path


def test_malicious_pickle_in_a_checkpoint_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious_checkpoint(tmp_path / "best.pt", marker)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    assert not marker.exists()


def _logged_run(workspace, checkpoint: Path) -> str:
    """A FINISHED MLflow run of ``ca_resnet`` whose ``checkpoint/`` artifact is ``checkpoint`` (+ sidecar)."""
    import mlflow

    from registry.tracking import get_or_create_experiment, setup_tracking

    setup_tracking(workspace)
    with mlflow.start_run(experiment_id=get_or_create_experiment("ca_resnet", workspace)) as run:
        mlflow.set_tags({"network": "ca_resnet", "data_version": "fer@" + "0" * 32})
        for path in (checkpoint, checkpoint.with_name(checkpoint.name + ".sha256")):
            mlflow.log_artifact(str(path), "checkpoint")
    return run.info.run_id


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "malicious_pickle"])
def test_fer_register_refuses_a_bad_checkpoint_with_one_line(workspace, tmp_path, capsys, damage):
    from fer_core.models import create_model

    path, marker = tmp_path / "ckpt" / "best.pt", tmp_path / "pwned"
    model = create_model("ca_resnet", width=4)
    save_checkpoint({"network": "ca_resnet", "model_kwargs": {"width": 4}, "model_state": model.state_dict(),
                     "recipe": {"network": "ca_resnet"}}, path)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 3])
    elif damage == "flipped_byte":
        path.write_bytes(raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:])
    else:
        _malicious_checkpoint(path, marker)
    run_id = _logged_run(workspace, path)
    capsys.readouterr()
    assert main(["register", "ca_resnet", "--run", run_id]) == 2
    err = capsys.readouterr().err.strip()
    expected = "cannot be loaded safely" if damage == "malicious_pickle" else "corrupted or truncated"
    assert err.startswith("fer: error:") and expected in err and "Traceback" not in err, err
    assert not marker.exists()
    from registry import models as reg

    assert reg.list_versions("ca_resnet", workspace) == []  # nothing was registered


# -- paths never leave a root ---------------------------------------------------------------------

def test_manifest_references_cannot_leave_the_dataset_root(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("outside")
    (root / "images" / "link.png").symlink_to(tmp_path / "secret.txt")
    (root / "images" / "dirlink").symlink_to(tmp_path)
    assert resolve_reference(root, "images/a.png")[0] == (root / "images" / "a.png").resolve()
    assert resolve_reference(root, "arrays/p.npy#3")[1] == 3
    for ref in ("../secret.txt", "images/../../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd",
                "images/link.png", "images/dirlink/secret.txt", ""):
        with pytest.raises(ValueError, match="outside the dataset root|relative path inside"):
            resolve_reference(root, ref)


def _png(path: Path) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((48, 48), 128, np.uint8))
    return path


@pytest.mark.parametrize("listed", ["../../outside.png", "ABSOLUTE", "images/link.png"])
def test_au_table_refuses_images_outside_its_source(tmp_path, listed):
    source = tmp_path / "deep" / "src"
    outside = _png(tmp_path / "deep" / "outside.png")
    _png(source / "images" / "a.png")
    (source / "images" / "link.png").symlink_to(outside)
    listed = str(outside) if listed == "ABSOLUTE" else listed.replace("../../", "../")
    pd.DataFrame({"image": ["images/a.png", listed], "AU1": [1, 0]}).to_csv(source / "table.csv", index=False)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="outside the source folder"):
        formats.adapt("au_table", source, out, name="au")
    assert not (out / "images" / "external").exists()
    # The explicit option copies it (the previous behaviour, now opt-in).
    formats.adapt("au_table", source, tmp_path / "out2", name="au", allow_outside_source=True)
    assert len(list((tmp_path / "out2" / "images").rglob("*.png"))) == 2


def test_image_folder_refuses_a_symlink_out_of_the_source(tmp_path):
    source = tmp_path / "src"
    for i in range(2):
        _png(source / "train" / "happy" / f"{i}.png")
    outside = _png(tmp_path / "elsewhere" / "secret.png")
    (source / "train" / "happy" / "link.png").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the source folder"):
        formats.adapt("image_folder", source, tmp_path / "out", name="faces")


def test_micro_sheet_filename_cannot_escape_the_source(tmp_path):
    source = formats.get_format("casme2").write_synthetic(tmp_path / "casme2", size=6)
    sheet = next(source.glob("*.xlsx"))
    table = pd.read_excel(sheet)
    column = next(c for c in table.columns if c.strip().lower() == "filename")
    table[column] = table[column].astype(object)
    table.loc[0, column] = "../../../../escaped"
    table.to_excel(sheet, index=False, engine="openpyxl")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="leaves the source folder"):
        formats.adapt("casme2", source, out, name="casme2")
    assert not any(tmp_path.glob("escaped*")) and not any(tmp_path.parent.glob("escaped*"))


# Extractors that exist, each with its slip test below.
EXTRACTORS = {"data_checks/vendor/refresh.py"}  # development-time npm vendoring of the Data Docs assets


def test_no_code_extracts_archives():
    """Archive slip needs an extractor; only the listed ones exist (a new one must bring its own slip test)."""
    pattern = re.compile(r"\b(tarfile|zipfile|shutil\.unpack_archive|extractall)\b")
    offenders = []
    for folder in ("fer_core", "fer_platform", "data_checks", "registry", "serving", "flows", "fer_cli", "bench"):
        for path in (PROJECT_ROOT / folder).rglob("*.py"):
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(PROJECT_ROOT)))
    assert set(offenders) == EXTRACTORS, offenders


@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/fer-absolute-escape.txt", "package/link"])
def test_the_npm_vendoring_extractor_refuses_members_that_leave_its_folder(tmp_path, member):
    import io
    import tarfile

    from data_checks.vendor.refresh import unpack_npm_tarball

    tarball = tmp_path / "evil.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        if member.endswith("link"):
            info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
            tar.addfile(info)
        else:
            data = b"slip"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "dest"
    if member.startswith("/"):  # the filter strips the leading "/": the file lands inside dest
        unpack_npm_tarball(tarball, dest)
        assert (dest / member.lstrip("/")).read_bytes() == b"slip"
    else:
        with pytest.raises(tarfile.FilterError):
            unpack_npm_tarball(tarball, dest)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/fer-absolute-escape.txt").exists()
    assert not any(p.is_symlink() for p in dest.rglob("*")) if dest.exists() else True


# -- secrets --------------------------------------------------------------------------------------

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIA" + "FERTESTKEY7Q2ZXW",  # split: the repository scan below must not flag this file
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-Zq81vKp0oQ",
    "MLFLOW_TRACKING_USERNAME": "fer-admin-user-77",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-Yx93LmQ1",
    "POSTGRES_PASSWORD": "pg-pw-Hh47Ks0Ta",
    "PREFECT_API_AUTH_STRING": "admin:prefect-pw-Tt61Vb",
    # A URI given through the environment may carry a password (settings mask it when logged).
    "FER_S3_ENDPOINT_URL": "http://minio-user:" + "uri-pw-Rk28Nc@127.0.0.1:9",
}
SECRET_STRINGS = ["s3cr3t-aws-Zq81vKp0oQ", SECRETS["AWS_ACCESS_KEY_ID"], "mlflow-pw-Yx93LmQ1", "pg-pw-Hh47Ks0Ta",
                  "prefect-pw-Tt61Vb", "uri-pw-Rk28Nc"]
# Not a secret: MLflow records MLFLOW_TRACKING_USERNAME as the run's user (who ran it), by design.


@pytest.mark.slow  # a whole train/register run (~20 s)
def test_secrets_in_the_environment_never_reach_logs_or_tracking(workspace, tmp_path, capfd, monkeypatch):
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking

    assert main(["data", "synth", "fer2013", str(tmp_path / "src"), "--size", "140"]) == 0
    source = next((tmp_path / "src").rglob("*.csv*")).parent
    assert main(["data", "add", "fer", str(source), "--format", "fer2013"]) == 0
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "ca_resnet", "--data", "fer", "--set", "epochs=1", "--set", "max_steps_per_epoch=2",
                 "--set", "batch_size=16", "--set", "model_kwargs.width=4"]) == 0
    out, err = capfd.readouterr()
    run_id = out.split("mlflow run")[1].split()[0]
    setup_tracking(workspace)
    client = MlflowClient()
    run = client.get_run(run_id)
    texts = [out, err, repr(run.data.params), repr(run.data.tags), repr(run.data.metrics), repr(run.info)]
    for key in ("PASSWORD", "SECRET", "AUTH_STRING"):
        assert not any(key in k.upper() for k in list(run.data.params) + list(run.data.tags))
    artifacts = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    files += [p for p in workspace.root.rglob("*") if p.is_file()]  # MLflow DB, DVC store, runs, GX docs
    assert len(files) > 10
    leaks = [(str(path), secret) for path in files for secret in SECRET_STRINGS
             if secret.encode() in path.read_bytes()]
    leaks += [("console/run", secret) for text in texts for secret in SECRET_STRINGS if secret in text]
    assert leaks == []


def test_the_git_repository_holds_no_secrets():
    listed = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [PROJECT_ROOT / f for f in listed.stdout.split()]
    assert not any(f.name == ".env" for f in files), "a .env file is committed"
    patterns = {
        "AWS access key id": re.compile(rb"\bAKIA[0-9A-Z]{16}\b"),
        "private key": re.compile(rb"-----BEGIN (RSA |EC |OPENSSH )?PRIVATE KEY-----"),
        # Placeholders (``user:secret@``, ``${VAR}``, ``***``) are fine; tests hold deliberate fakes.
        "password in a URI": re.compile(rb"://[A-Za-z0-9_.-]+:(?!\$|\*\*\*|secret@|password@)[^@/\s'\"]{6,}@"),
    }
    found = []
    for path in files:
        if not path.is_file() or path.suffix in (".png", ".jpg", ".parquet", ".npz", ".onnx"):
            continue
        data = path.read_bytes()
        found += [(str(path.relative_to(PROJECT_ROOT)), name) for name, pattern in patterns.items()
                  if pattern.search(data) and not (name == "password in a URI" and path.parent.name == "tests")]
    assert found == [], found
    example = PROJECT_ROOT / ".env.example"
    if example.is_file():  # the example holds placeholders only
        for line in example.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.lstrip().startswith("#") and re.search(r"PASSWORD|SECRET|AUTH_STRING", key):
                assert value.strip() == "" or "change-me" in value, line
