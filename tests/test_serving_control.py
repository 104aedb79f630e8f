"""Closed model control, no crash from one request, one server per workspace (issue 11 items 1, 2, 5, 6).

Against a real ``fer serve`` (a subprocess of the CLI, HTTP on with ``--http``) over a workspace whose
repository holds one tiny ``ca_resnet`` (v1 served, v2 on disk), attacked as a local user who can
reach the ports but does not hold the workspace's control key:

* model control over HTTP (``curl``-style requests with ``text/plain`` and a foreign ``Origin``,
  incl. the ``file:1/model.py`` code injection) and gRPC (``tritonclient``, incl. ``../../`` model
  names) is refused; the injected code never runs and the champion keeps answering v1;
* the 100-byte HTTP request with shape ``[2147483648,1,48,48]`` that aborted Triton 2.51 is refused
  before its body is parsed; the same shapes over gRPC are ``INVALID_ARGUMENT``; the server lives;
* image bombs in every accepted format are refused before decoding, as ``INVALID_ARG``, fast;
* request buffers (``/dev/shm`` segments) are private, a crashed server's leftovers are removed;
* a model unloaded or a version swapped behind the platform's back is repaired by ``fer serve``'s
  reconciliation, with an alert in its log and in ``fer models`` (which reports Triton's index);
* a second ``fer serve`` of the workspace, or one on busy ports, refuses with one line and exit 1.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

import tritonclient.grpc as grpcclient  # noqa: E402

from bench.promotion_under_load import NETWORK, reference_probabilities, tiny_versions  # noqa: E402
from bench.promotion_under_load import test_images as face_images  # noqa: E402
from serving.client import FERClient, ServingError  # noqa: E402
from serving.live import find_live, reconcile  # noqa: E402
from serving.repository import ModelRepository  # noqa: E402
from serving.server import (  # noqa: E402
    CONTROL_HEADER, KEY_PLACEHOLDER, EmbeddedTriton, ServingError as ServerError, TritonEndpoint)

pytestmark = pytest.mark.integration
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MARKER_CODE = "import pathlib; pathlib.Path({path!r}).write_text('pwned')\n"


def _fer(home: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "FER_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}
    for var in ("FER_TRITON_URL", "FER_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-m", "fer_cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_live(repo: ModelRepository, proc: subprocess.Popen, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        live, _ = find_live(repo)
        if live is not None:
            endpoint = live.endpoint()
            if endpoint.model_ready(f"{NETWORK}_ensemble"):
                return live
        time.sleep(0.5)
    raise AssertionError("fer serve did not come up")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import torch

    from serving.export import export_onnx

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("control")
    home = root / "home"
    repo = ModelRepository(home / "triton" / "models")
    models = tiny_versions()
    for version, model in models.items():
        onnx = export_onnx(model, root / "onnx" / f"v{version}.onnx")
        if version == 1:
            repo.install(NETWORK, 1, onnx)
        else:
            repo.write_model(NETWORK, 2, onnx, keep_versions=[1])
    repo.set_served_versions(NETWORK, [1])
    images = face_images()
    references = {v: reference_probabilities(m, images) for v, m in models.items()}
    proc = _fer(home, "serve", "--http", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                "--check-interval", "0.5", "--reconcile-interval", "1", "--duration", "900")
    try:
        live = _wait_live(repo, proc)
        yield SimpleNamespace(root=root, home=home, repo=repo, proc=proc, live=live, images=images,
                              references=references, labels=list(models[1].metadata.label_names),
                              key=(home / "triton" / "control.key").read_text().strip())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _champion_answers_v1(served) -> None:
    with FERClient(served.live.grpc_url) as client:
        predictions = client.predict(served.images, network=NETWORK)
    got = np.array([[p.probabilities[n] for n in served.labels] for p in predictions])
    assert np.abs(got - served.references[1]).max() <= 1e-4


def _http(served, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, str]:
    url = f"http://{served.live.host}:{served.live.http_port}{path}"
    request = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _load_body(marker: Path) -> bytes:
    code = base64.b64encode(MARKER_CODE.format(path=str(marker)).encode()).decode()
    config = json.dumps({"backend": "python", "max_batch_size": 0,
                         "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [1]}],
                         "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [1]}]})
    return json.dumps({"parameters": {"config": config, "file:1/model.py": code}}).encode()


# -- item 1: model control is closed ---------------------------------------------------------------

def test_unauthenticated_model_control_over_http_is_refused(served, tmp_path):
    marker = tmp_path / "pwned"
    hostile = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    attempts = [
        ("POST", "/v2/repository/models/evil/load", _load_body(marker)),
        ("POST", f"/v2/repository/models/{NETWORK}/load", _load_body(marker)),  # replace the champion
        ("POST", f"/v2/repository/models/{NETWORK}_ensemble/unload", b"{}"),
        ("POST", "/v2/repository/models/..%2F..%2F..%2Fx%2Fevil/load", b"{}"),
        ("POST", "/v2/repository/index", b"{}"),
        ("POST", "/v2/logging", json.dumps({"log_file": str(tmp_path / "x.log")}).encode()),
        ("POST", "/v2/trace/setting", json.dumps({"trace_file": str(tmp_path / "t")}).encode()),
        ("GET", "/v2/systemsharedmemory/status", b""),
    ]
    for method, path, body in attempts:
        for headers in (hostile, {**hostile, CONTROL_HEADER: "0" * 64}):  # no key, a wrong key
            status, text = _http(served, method, path, body, headers)
            assert status in (400, 403), (path, status, text)
            assert "restricted" in text, (path, text)
    time.sleep(1.5)  # a load would have run initialize() by now
    assert not marker.exists()
    index = {m["name"]: m.get("state") for m in served.live.endpoint().index()}
    assert "evil" not in index and index[f"{NETWORK}_ensemble"] == "READY"
    _champion_answers_v1(served)


def test_unauthenticated_model_control_over_grpc_is_refused(served, tmp_path):
    marker = tmp_path / "pwned"
    client = grpcclient.InferenceServerClient(served.live.grpc_url)
    code = MARKER_CODE.format(path=str(marker)).encode()
    config = json.loads(_load_body(marker))["parameters"]["config"]
    calls = [
        lambda h: client.load_model("evil", config=config, files={"file:1/model.py": code}, headers=h),
        lambda h: client.load_model(NETWORK, config=config, files={"file:1/model.py": code}, headers=h),
        lambda h: client.load_model("../../../x/evil", headers=h),
        lambda h: client.unload_model(f"{NETWORK}_ensemble", headers=h),
        lambda h: client.get_model_repository_index(headers=h),
        lambda h: client.update_log_settings({"log_file": str(tmp_path / "x.log")}, headers=h),
        lambda h: client.get_system_shared_memory_status(headers=h),
    ]
    wrong = {f"triton-grpc-protocol-{CONTROL_HEADER}": "0" * 64}
    for call in calls:
        for headers in (None, wrong):
            with pytest.raises(Exception, match="restricted"):
                call(headers)
    time.sleep(1.5)
    assert not marker.exists()
    _champion_answers_v1(served)
    assert served.live.endpoint().served_versions(NETWORK) == [1]


def test_control_key_is_hidden_from_the_process_table(served):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the argv scrubber is not built (fer serve warns)")
    cmdline = Path(f"/proc/{served.live.triton_pid}/cmdline").read_bytes()
    assert b"--grpc-restricted-protocol=" in cmdline and b"--http-restricted-api=" in cmdline
    assert served.key.encode() not in cmdline
    # the key never entered argv: the preload read it from the key file (serving/backends/scrub_argv.c)
    assert cmdline.count(f"{CONTROL_HEADER}={KEY_PLACEHOLDER}\0".encode()) == 2
    assert served.key.encode() not in Path(f"/proc/{served.live.triton_pid}/environ").read_bytes()
    _champion_answers_v1(served)  # Triton parsed the real arguments: the key still works ...
    assert served.live.endpoint().index()  # ... for the platform
    status, text = _http(served, "POST", "/v2/repository/index", b"{}", {CONTROL_HEADER: KEY_PLACEHOLDER})
    assert status in (400, 403) and "restricted" in text  # ... and the placeholder text is no key


def test_control_key_is_private_and_never_logged(served):
    key_file = served.home / "triton" / "control.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    log = (served.home / "triton" / "triton.log").read_text(errors="replace")
    assert served.key not in log
    state = (served.home / "triton" / "serve.json")
    assert served.key not in state.read_text() and state.stat().st_mode & 0o777 == 0o600


# -- item 2: one request cannot abort the server --------------------------------------------------

ABSURD = [2147483648, 1, 48, 48]


def test_absurd_shapes_are_refused_and_the_server_lives(served):
    body = json.dumps({"inputs": [{"name": "image", "shape": ABSURD, "datatype": "FP32", "data": [1]}]}).encode()
    assert len(body) < 120  # the 100-byte request of the issue
    for model in (NETWORK, f"{NETWORK}_ensemble"):
        status, text = _http(served, "POST", f"/v2/models/{model}/infer", body)
        assert status in (400, 403) and "restricted" in text, (status, text)
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    import grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.live.grpc_url))
    for model, name, dtype, shape in ((NETWORK, "image", "FP32", ABSURD), (f"{NETWORK}_ensemble", "IMAGE", "BYTES",
                                                                           [2147483648, 1])):
        for typed in (False, True):
            request = service_pb2.ModelInferRequest(model_name=model)
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = name, dtype
            tensor.shape.extend(shape)
            if not typed:
                request.raw_input_contents.append(b"\0\0\0\0" if dtype == "FP32" else b"\1\0\0\0x")
            elif dtype == "FP32":
                tensor.contents.fp32_contents.append(1.0)
            else:
                tensor.contents.bytes_contents.append(b"x")
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    time.sleep(1.0)
    assert served.proc.poll() is None
    live, _ = find_live(served.repo)
    assert live is not None and live.triton_pid == served.live.triton_pid  # not restarted: it never died
    _champion_answers_v1(served)


def test_http_is_off_by_default(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    with EmbeddedTriton(repo, tmp_path / "triton") as server:
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5)
        assert server.endpoint().server_ready()
        with pytest.raises(ServerError, match="without HTTP"):
            server.endpoint("http")


# -- item 5: image bombs and client faults ---------------------------------------------------------

def _bomb(fmt: str) -> bytes:
    from PIL import Image

    side = 16383 if fmt == "WEBP" else 20000  # WebP's own maximum
    buffer = io.BytesIO()
    options = {"TIFF": {"compression": "tiff_deflate"}, "WEBP": {"lossless": True}}.get(fmt, {})
    Image.new("L", (side, side)).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["TIFF", "WEBP", "GIF", "PNG"])
def test_image_bombs_are_refused_before_decoding_as_invalid_arg(served, fmt):
    data = _bomb(fmt)
    assert len(data) < 1_000_000
    client = grpcclient.InferenceServerClient(served.live.grpc_url)
    tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data]], dtype=object))
    start = time.perf_counter()
    with pytest.raises(Exception) as err:
        client.infer(f"{NETWORK}_ensemble", [tensor])
    seconds = time.perf_counter() - start
    assert "INVALID_ARG" in str(err.value.status()), err.value
    assert "pixel" in str(err.value.message()) and "\n" not in str(err.value.message())
    assert seconds < 2.0, seconds  # the 20000² TIFF took 3.5 s and ~1 GB before
    _champion_answers_v1(served)


def test_bad_images_over_http_are_400_not_500(served):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"{served.live.host}:{served.live.http_port}")
    for data in (b"not an image", _bomb("TIFF")):
        tensor = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=object))
        with pytest.raises(Exception) as err:
            client.infer(f"{NETWORK}_ensemble", [tensor], headers={CONTROL_HEADER: served.key})
        assert str(err.value.status()) == "400", err.value
    with FERClient(f"http://{served.live.host}:{served.live.http_port}", protocol="http", key=served.key) as fc:
        with pytest.raises(ServingError, match="cannot decode"):
            fc.predict([b"not an image"], network=NETWORK)


def test_request_buffers_are_private(served):
    segments = [p for p in Path("/dev/shm").glob("fer*") if p.stat().st_uid == os.getuid()]
    ours = [p for p in segments if f"_{served.live.pid}_" in p.name]
    assert ours, segments
    time.sleep(0.5)  # the guard thread's period is 0.2 s
    assert all(p.stat().st_mode & 0o077 == 0 for p in ours), [(p.name, oct(p.stat().st_mode)) for p in ours]


def test_a_crashed_servers_segments_are_removed_at_start(tmp_path):
    from serving.server import _workspace_tag

    triton_dir = tmp_path / "triton"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = Path("/dev/shm") / f"fer{_workspace_tag(triton_dir)}_{dead.pid}_1_python_backend_shm_region_x"
    other = Path("/dev/shm") / f"ferdeadbeef00_{dead.pid}_1_other_workspace"
    leftover.write_bytes(b"request pixels")
    other.write_bytes(b"not ours")
    try:
        with EmbeddedTriton(ModelRepository(tmp_path / "models"), triton_dir):
            assert not leftover.exists()
            assert other.exists()  # another workspace's segments are left alone
    finally:
        leftover.unlink(missing_ok=True)
        other.unlink(missing_ok=True)


# -- item 1 (cont.): reconciliation and fer models -------------------------------------------------

def _wait(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_fer_serve_reloads_an_unloaded_champion_and_alerts(served):
    endpoint = served.live.endpoint()  # an operator (or a crash) unloads the ensemble behind the platform
    endpoint.unload(f"{NETWORK}_ensemble")
    _wait(lambda: not endpoint.model_ready(f"{NETWORK}_ensemble"), 30)
    _wait(lambda: endpoint.model_ready(f"{NETWORK}_ensemble"), 60)  # reconciled within seconds
    _champion_answers_v1(served)
    live, _ = find_live(served.repo)
    assert any(f"{NETWORK}_ensemble: not loaded" in a for a in live.alerts), live.alerts
    out = _fer(served.home, "models")
    stdout, stderr = out.communicate(timeout=180)
    assert out.returncode == 0, stderr
    assert "alert:" in stdout and f"{NETWORK}_ensemble" in stdout
    assert f"Triton serves [1]; ensemble READY" in stdout, stdout


def test_reconcile_drops_a_foreign_version_and_repins_the_ensemble(served):
    endpoint = served.live.endpoint()
    config = endpoint.model_config(NETWORK)
    config["version_policy"] = {"specific": {"versions": [2]}}
    endpoint.client.load_model(NETWORK, config=json.dumps(config), headers=endpoint.headers)  # v2 only
    assert endpoint.served_versions(NETWORK) == [2]
    messages = reconcile(endpoint, served.repo)
    assert any("foreign version" in m for m in messages), messages
    assert endpoint.served_versions(NETWORK) == [1]
    _champion_answers_v1(served)


def test_fer_models_without_a_server_says_nothing_is_served(tmp_path):
    proc = _fer(tmp_path / "empty-home", "models")
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert "Triton: none running" in stdout or "no registered models" in stdout


# -- item 6 / issue 14: busy ports, one server per workspace ---------------------------------------

def test_a_second_fer_serve_of_the_workspace_refuses(served):
    proc = _fer(served.home, "serve", "--grpc-port", "0", "--metrics-port", "0", "--duration", "5")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, (stdout, stderr)
    assert stderr.strip().count("\n") == 0 and "already serves this workspace" in stderr
    assert "Triton serving" not in stdout


def test_fer_serve_on_busy_ports_refuses_and_never_drives_the_other_server(served, tmp_path):
    other = tmp_path / "other-home"
    repo = ModelRepository(other / "triton" / "models")
    repo.root.mkdir(parents=True)
    before = {(m["name"], m.get("version"), m.get("state")) for m in served.live.endpoint().index()}
    proc = _fer(other, "serve", "--grpc-port", str(served.live.grpc_port), "--metrics-port", "0", "--duration", "5")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, (stdout, stderr)
    assert "port in use" in stderr and stderr.strip().count("\n") == 0, stderr
    assert "Triton serving" not in stdout
    after = {(m["name"], m.get("version"), m.get("state")) for m in served.live.endpoint().index()}
    assert after == before
    with pytest.raises(ServerError, match="port in use"):
        EmbeddedTriton(repo, other / "triton", grpc_port=served.live.grpc_port).start()


def test_fer_serve_url_checks_the_server_is_this_repositorys(served, tmp_path):
    url = f"grpc://{served.live.grpc_url}"
    proc = _fer(served.home, "serve", "--url", url)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and f"{NETWORK}_ensemble" in stdout, stderr
    other = tmp_path / "foreign-home"  # a workspace with another network: this server is not its
    ModelRepository(other / "triton" / "models").root.mkdir(parents=True)
    (other / "triton" / "models" / "resnet18").mkdir()
    (other / "triton" / "models" / "resnet18" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    proc = _fer(other, "serve", "--url", url)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and ("control key" in stderr or "does not serve" in stderr), (stdout, stderr)
