"""Serving under load and during change, against the real embedded ``tritonserver`` (no mocks).

One module-scoped server over two tiny ``ca_resnet`` versions with different weights (v1 champion,
v2 on disk), so every answer can be attributed to exactly one version by comparing it with each
version's PyTorch output. Tests run in file order and leave v1 as the champion:

* a promotion and a rollback under steady load: no failed request, no answer from a half-loaded model;
* fuzzed images and tensors: each gets an error or a valid answer, the server stays up;
* ``tritonserver`` SIGKILLed mid-load: clear one-line errors, :func:`serving.server.supervise`
  (``fer serve``'s loop) restarts it and the champion answers again without a manual step;
* a power cut during a promotion (SIGKILL of the writing process, mid-copy and between writing the
  version and loading it): after a restart the repository holds only complete versions and Triton
  serves the previous champion.

Concurrent promotions (one wins, one is refused) are tested with the real registry in
``tests/test_promotion.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bench.promotion_under_load import NETWORK, LoadGenerator, build_platform, swap
from serving.client import FERClient, ServingError, encode_image
from serving.server import supervise

pytestmark = pytest.mark.integration  # starts the embedded tritonserver

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NUMBERS: dict[str, object] = {}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reliability-serving")
    server, repository, models, images, references = build_platform(root)
    labels = list(models[1].metadata.label_names)
    assert np.abs(references[1] - references[2]).max() > 1e-2  # the versions are told apart
    try:
        yield SimpleNamespace(root=root, server=server, repo=repository, models=models, images=images,
                              references=references, labels=labels)
    finally:
        server.stop()
        print("\nreliability (2 shared CPU cores, inflated by other load):", json.dumps(NUMBERS, default=str))


def _load(platform, **kwargs) -> LoadGenerator:
    return LoadGenerator(platform.server.grpc_url, platform.images, platform.references, platform.labels, **kwargs)


def _answers_from(platform, version: int) -> None:
    with FERClient(platform.server.grpc_url) as client:
        predictions = client.predict(platform.images, network=NETWORK)
    got = np.array([[p.probabilities[n] for n in platform.labels] for p in predictions])
    assert np.abs(got - platform.references[version]).max() <= 1e-4


def test_promotion_and_rollback_under_load_lose_no_request(platform):
    endpoint = platform.server.endpoint()
    load = _load(platform, rate_hz=20.0, max_requests=400, max_seconds=60).start()
    windows = []
    for old, new in ((1, 2), (2, 1)):  # promote, then roll back
        time.sleep(1.0)
        begin = load.now()
        swap(platform.repo, endpoint, old, new)
        windows.append((begin, load.now()))
    time.sleep(1.0)
    report = load.stop()
    summary = report.summary(windows)
    NUMBERS["swap under load"] = summary
    assert report.errors == [], summary
    assert report.unattributed == [], summary  # every answer came from exactly one whole version
    counts = report.per_version()
    assert counts.get(1, 0) >= 5 and counts.get(2, 0) >= 5, counts  # both versions really answered
    # Attribution follows the swaps: only v1 before the promotion and after the rollback.
    assert all(a.versions == (1,) for a in report.answers if a.sent_s > windows[1][1])
    assert all(a.versions == (1,) for a in report.answers if a.sent_s + a.latency_ms / 1e3 < windows[0][0])
    assert platform.repo.champion(NETWORK) == 1 and endpoint.served_versions(NETWORK) == [1]


# -- fuzzing --------------------------------------------------------------------------------------

def _valid_png(platform) -> bytes:
    return platform.images[0]


_HUGE = cv2.imencode(".png", np.zeros((4200, 4200), np.uint8))[1].tobytes()  # 17.6 Mpx in a small file
_IMAGES = st.one_of(
    st.binary(max_size=3000),  # garbage, zero-size included
    st.tuples(st.integers(1, 300), st.integers(1, 300), st.sampled_from([1, 3]), st.sampled_from([".png", ".jpg"]))
    .map(lambda t: encode_image(np.random.default_rng(t[0] * t[1]).integers(0, 256, (t[0], t[1], 3)[: 2 if t[2] == 1 else 3],
                                                                             dtype=np.uint8), t[3])),
    st.integers(0, 100).map(lambda pct: ("TRUNCATE", pct)),  # a valid face cut short
    st.just(_HUGE),
)
_TENSORS = st.tuples(st.sampled_from(["FP32", "INT32", "UINT8", "BYTES"]),
                     st.lists(st.integers(0, 3), min_size=1, max_size=3))


def _fuzz_request(platform, client: FERClient, item) -> str:
    """Send one fuzzed input; 'error' or 'answer' (checked); anything else fails the test."""
    if isinstance(item, tuple) and item[0] == "TRUNCATE":
        good = _valid_png(platform)
        item = good[: len(good) * item[1] // 100]
    try:
        (prediction,) = client.predict([item], network=NETWORK, validate=False)
    except ServingError as exc:
        assert "\n" not in str(exc) and str(exc), exc
        return "error"
    total = sum(prediction.probabilities.values())
    assert abs(total - 1.0) < 1e-3 and prediction.label in platform.labels, prediction
    return "answer"


def test_fuzzed_images_and_tensors_get_an_error_or_a_valid_answer(platform):
    endpoint = platform.server.endpoint()
    outcomes: dict[str, int] = {}
    with FERClient(platform.server.grpc_url) as client:

        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(item=_IMAGES)
        def images(item):
            kind = _fuzz_request(platform, client, item)
            outcomes[kind] = outcomes.get(kind, 0) + 1
            assert endpoint.server_live()

        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(spec=_TENSORS)
        def tensors(spec):
            dtype, shape = spec
            numpy_type = {"FP32": np.float32, "INT32": np.int32, "UINT8": np.uint8, "BYTES": object}[dtype]
            array = np.zeros(shape, dtype=numpy_type)
            if dtype == "BYTES":
                array.flat[:] = [b"\x00garbage"] * array.size
            for model, name in ((f"{NETWORK}_ensemble", "IMAGE"), (NETWORK, "image")):
                tensor = endpoint.module.InferInput(name, list(array.shape), dtype)
                try:
                    tensor.set_data_from_numpy(array)
                    endpoint.client.infer(model, [tensor])
                    outcomes["tensor answer"] = outcomes.get("tensor answer", 0) + 1
                except Exception as exc:  # noqa: BLE001 -- tritonclient's InferenceServerException
                    assert "Traceback" not in str(exc)
                    outcomes["tensor error"] = outcomes.get("tensor error", 0) + 1
            assert endpoint.server_live()

        images()
        tensors()
    NUMBERS["fuzz outcomes"] = outcomes
    assert outcomes.get("error", 0) >= 5 and outcomes.get("tensor error", 0) >= 10, outcomes
    _answers_from(platform, 1)  # still answering good requests, correctly


# -- Triton killed --------------------------------------------------------------------------------

def test_killed_triton_is_restarted_by_the_supervisor_and_serves_the_champion(platform):
    server = platform.server
    old_pid = server.process.pid
    stop, messages, restarts = threading.Event(), [], []
    supervisor = threading.Thread(target=lambda: restarts.append(
        supervise(server, check_interval_s=0.5, should_stop=stop.is_set, on_failure=messages.append)))
    supervisor.start()
    load = _load(platform, rate_hz=10.0, max_requests=1500, max_seconds=150).start()
    try:
        time.sleep(1.0)
        killed_at = load.now()
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            recovered = [a for a in load.report.answers if a.sent_s > killed_at and a.versions == (1,)]
            if recovered:
                break
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        report = load.stop()
        stop.set()
        supervisor.join(60)
    after = [a for a in report.answers if a.sent_s > killed_at]
    recovered = [a for a in after if a.versions == (1,)]
    assert recovered, f"no answer after the kill; supervisor said {messages}"
    recovery_s = recovered[0].sent_s - killed_at
    failed = [a for a in after if a.error]
    NUMBERS["recovery after SIGKILL s"] = round(recovery_s, 2)
    NUMBERS["requests failed during recovery"] = len(failed)
    assert restarts == [1] and any("died" in m for m in messages), messages
    assert server.running and server.process.pid != old_pid
    assert failed, "the client must see the outage as errors"
    assert all(isinstance(a.error, str) and "\n" not in a.error and a.error for a in failed)
    assert report.unattributed == []  # no garbage answers around the crash either
    first_ok = recovered[0].sent_s
    assert all(a.versions == (1,) for a in after if a.sent_s > first_ok and not a.error)
    _answers_from(platform, 1)


# -- power cut during a promotion -----------------------------------------------------------------

_WRITER = r"""
import shutil, sys, time
from serving.repository import ModelRepository

root, onnx, mode = sys.argv[1:4]
repository = ModelRepository(root)
if mode == "mid-copy":
    def half_copy(src, dst, *args, **kwargs):  # the power goes out halfway through the ONNX copy
        data = open(src, "rb").read()
        with open(dst, "wb") as handle:
            handle.write(data[: len(data) // 2])
        print("CUT", flush=True)
        time.sleep(120)
    shutil.copyfile = half_copy
repository.write_model("ca_resnet", 3, onnx, keep_versions=[1])  # promote(): install beside the champion
print("CUT", flush=True)  # ... the next step would load it into Triton
time.sleep(120)
"""


@pytest.mark.parametrize("moment", ["mid-copy", "between-write-and-load"])
def test_power_cut_during_promotion_leaves_complete_versions_and_the_old_champion(platform, moment):
    from serving.export import export_onnx
    from bench.promotion_under_load import tiny_versions

    server, repo = platform.server, platform.repo
    onnx = platform.root / "onnx" / "v3.onnx"
    if not onnx.is_file():
        export_onnx(tiny_versions(seeds=(3,))[1], onnx)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(repo.root), str(onnx), moment], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = writer.stdout.readline()
        assert line.strip() == "CUT", writer.stderr.read()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    assert writer.returncode == -signal.SIGKILL
    if moment == "mid-copy":
        staged = list(repo.staging_dir.rglob("model.onnx"))
        assert staged and staged[0].stat().st_size < onnx.stat().st_size  # a half-written file exists...
        assert 3 not in repo.versions(NETWORK)  # ...but never inside the repository
    # The machine comes back: the server restarts over the repository as it was left.
    server.stop()
    server.start()
    assert not repo.staging_dir.exists() or not any(repo.staging_dir.iterdir())
    for version in repo.versions(NETWORK):  # only complete versions
        model_file = repo.root / NETWORK / str(version) / "model.onnx"
        expected = onnx if version == 3 else platform.root / "onnx" / f"v{version}.onnx"
        assert model_file.read_bytes() == expected.read_bytes(), version
    assert repo.champion(NETWORK) == 1
    _answers_from(platform, 1)  # the previous champion answers through the ensemble
    if moment == "between-write-and-load":
        # The complete v3 stays on disk, unpinned; removing it puts the repository back exactly.
        repo.set_served_versions(NETWORK, [1])
        repo.remove_version(NETWORK, 3)
        server.endpoint().load(NETWORK)
        assert repo.versions(NETWORK) == [1, 2]
