"""Soak: steady load through the ensemble of a real ``fer serve`` while the champion is swapped every
minute, ``tritonserver`` is SIGKILLed every three minutes and a second client sends hostile requests.

    python bench/soak.py --minutes 10 --rate 50

* ``fer serve`` (the CLI, a subprocess, HTTP on with ``--http``) serves two tiny ``ca_resnet``
  versions with different weights, so every answer is attributed to exactly one version (see
  :mod:`bench.promotion_under_load`).
* Every ``--promote-every`` seconds the champion swaps 1↔2 on the live server: the Triton side of a
  promotion (:func:`bench.promotion_under_load.swap`, keyed endpoint from the state file), under the
  network's promotion lock. The registry gates are not part of this bench (``tests/test_promotion*.py``).
* Every ``--kill-every`` seconds ``tritonserver`` is SIGKILLed; ``fer serve`` restarts it. A restart
  window lasts from the kill until the ensemble answers again.
* The hostile client loops over unauthenticated model control (HTTP load with ``file:1/model.py``,
  unload of the ensemble, gRPC load of ``../../../x/evil``), the 100-byte absurd-shape request over
  HTTP and gRPC, and a 20000² TIFF bomb.

Pass criteria (exit 0): no wrong answer (each answer matches the champion of its time; either
version inside a swap window), no unauthorised load (every hostile control call refused, the
injected code never ran, no foreign model in the index), errors only inside restart windows, and
the server's memory (tritonserver + stubs, RSS) at the end within 25% (+50 MiB) of its first sample
after warm-up of the same server process. Loopback only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.promotion_under_load import (  # noqa: E402
    NETWORK, LoadGenerator, reference_probabilities, swap, test_images, tiny_versions,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _tiff_bomb() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, "TIFF", compression="tiff_deflate")
    return buffer.getvalue()


class Hostile:
    """The second client: hostile requests in a loop; counts what was refused and what got through."""

    def __init__(self, live, marker: Path, period_s: float = 0.5) -> None:
        self.live, self.marker, self.period_s = live, marker, period_s
        self.sent: dict[str, int] = {}
        self.accepted: list[str] = []  # control calls that succeeded: unauthorised loads/unloads
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hostile", daemon=True)
        self.bomb = _tiff_bomb()

    def _http(self, path: str, body: bytes) -> int:
        request = urllib.request.Request(f"http://{self.live.host}:{self.live.http_port}{path}", data=body,
                                         method="POST", headers={"Content-Type": "text/plain",
                                                                 "Origin": "http://evil.example"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return -1  # down (a restart window)

    def _cases(self):
        import tritonclient.grpc as grpcclient

        code = base64.b64encode(f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('x')\n".encode())
        config = json.dumps({"backend": "python"})
        load = json.dumps({"parameters": {"config": config, "file:1/model.py": code.decode()}}).encode()
        absurd = json.dumps({"inputs": [{"name": "image", "shape": [2147483648, 1, 48, 48], "datatype": "FP32",
                                         "data": [1]}]}).encode()
        client = grpcclient.InferenceServerClient(self.live.grpc_url)

        def grpc_call(fn):
            try:
                fn()
                return 200
            except Exception:  # noqa: BLE001 -- refused (restricted, invalid) or down
                return 403

        def bomb():
            tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[self.bomb]], dtype=object))
            client.infer(f"{NETWORK}_ensemble", [tensor])

        def absurd_grpc():
            tensor = grpcclient.InferInput("image", [2147483648, 1, 48, 48], "FP32")
            tensor._raw_content = b"\0\0\0\0"  # one value, like the HTTP case
            client.infer(NETWORK, [tensor])

        return [
            ("http_load_code", True, lambda: self._http("/v2/repository/models/evil/load", load)),
            ("http_replace_champion", True, lambda: self._http(f"/v2/repository/models/{NETWORK}/load", load)),
            ("http_unload_ensemble", True, lambda: self._http(f"/v2/repository/models/{NETWORK}_ensemble/unload",
                                                              b"{}")),
            ("grpc_load_traversal", True, lambda: grpc_call(lambda: client.load_model("../../../x/evil"))),
            ("grpc_unload_ensemble", True, lambda: grpc_call(lambda: client.unload_model(f"{NETWORK}_ensemble"))),
            ("http_absurd_shape", False, lambda: self._http(f"/v2/models/{NETWORK}/infer", absurd)),
            ("grpc_absurd_shape", False, lambda: grpc_call(absurd_grpc)),
            ("grpc_tiff_bomb", False, lambda: grpc_call(bomb)),
        ]

    def _run(self) -> None:
        cases = self._cases()
        k = 0
        while not self.stop_event.wait(self.period_s):
            name, control, call = cases[k % len(cases)]
            k += 1
            status = call()
            self.sent[name] = self.sent.get(name, 0) + 1
            if 200 <= status < 300:
                self.accepted.append(name)

    def start(self) -> "Hostile":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)


def _rss_mib(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def _build(home: Path):
    from serving.export import export_onnx
    from serving.repository import ModelRepository

    repo = ModelRepository(home / "triton" / "models")
    models = tiny_versions()
    for version, model in models.items():
        onnx = export_onnx(model, home.parent / "onnx" / f"v{version}.onnx")
        if version == 1:
            repo.install(NETWORK, 1, onnx)
        else:
            repo.write_model(NETWORK, 2, onnx, keep_versions=[1])
    repo.set_served_versions(NETWORK, [1])
    images = test_images()
    return repo, images, {v: reference_probabilities(m, images) for v, m in models.items()}, \
        list(models[1].metadata.label_names)


def run(minutes: float, rate_hz: float, promote_every_s: float, kill_every_s: float) -> dict[str, object]:
    import torch

    from fer_platform.workspace import Workspace
    from registry.promotion import promotion_lock
    from serving.live import find_live

    torch.set_num_threads(1)
    seconds = minutes * 60
    with tempfile.TemporaryDirectory(prefix="fer-soak-") as tmp:
        home = Path(tmp) / "home"
        repo, images, references, labels = _build(home)
        env = {**os.environ, "FER_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}
        env.pop("FER_TRITON_URL", None)
        serve = subprocess.Popen([sys.executable, "-m", "fer_cli", "serve", "--http", "--http-port", "0",
                                  "--grpc-port", "0", "--metrics-port", "0", "--check-interval", "0.5",
                                  "--reconcile-interval", "2"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 180
            live = None
            while live is None or not live.endpoint().model_ready(f"{NETWORK}_ensemble"):
                if serve.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fer serve did not start: {serve.stderr.read()[-2000:]}")
                time.sleep(0.5)
                live = find_live(repo)[0]
            marker = Path(tmp) / "injected-code-ran"
            load = LoadGenerator(live.grpc_url, images, references, labels, rate_hz=rate_hz,
                                 max_requests=int(seconds * rate_hz) + 10, max_seconds=seconds + 30).start()
            hostile = Hostile(live, marker).start()
            swaps, restarts, memory = [], [], []
            champion, next_swap, next_kill, next_sample = 1, promote_every_s, kill_every_s, 0.0
            workspace = Workspace(home)
            while load.now() < seconds:
                now = load.now()
                if now >= next_sample:
                    state = find_live(repo)[0]
                    if state is not None:
                        memory.append((round(now, 1), state.triton_pid, round(_rss_mib(state.triton_pid), 1)))
                    next_sample += 5.0
                if now >= next_swap:
                    next_swap += promote_every_s
                    state = find_live(repo)[0]
                    if state is not None:
                        new = 2 if champion == 1 else 1
                        begin = load.now()
                        try:
                            with promotion_lock(NETWORK, workspace):
                                swap(repo, state.endpoint(), champion, new)
                            champion = new
                            swaps.append((begin, load.now(), new))
                        except Exception as exc:  # noqa: BLE001 -- a swap hit a restart window: reported
                            swaps.append((begin, load.now(), f"failed: {str(exc).splitlines()[0]}"))
                            repo.set_served_versions(NETWORK, [champion])  # the repository stays consistent
                            repo.set_champion(NETWORK, champion)
                if now >= next_kill:
                    next_kill += kill_every_s
                    state = find_live(repo)[0]
                    if state is not None:
                        begin = load.now()
                        os.kill(state.triton_pid, signal.SIGKILL)
                        while True:  # the restart window: until the new server's ensemble answers
                            time.sleep(0.2)
                            fresh = find_live(repo)[0]
                            if fresh is not None and fresh.triton_pid != state.triton_pid and \
                                    fresh.endpoint().model_ready(f"{NETWORK}_ensemble"):
                                break
                            if load.now() - begin > 120:
                                break
                        restarts.append((begin, load.now()))
                time.sleep(0.2)
            report = load.stop()
            hostile.stop()
            index = {m["name"] for m in find_live(repo)[0].endpoint().index()} if find_live(repo)[0] else set()
        finally:
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
    return _verdict(report, swaps, restarts, memory, hostile, marker_ran=marker.exists(), index=index,
                    minutes=minutes, rate_hz=rate_hz)


def _verdict(report, swaps, restarts, memory, hostile, *, marker_ran: bool, index: set, minutes: float,
             rate_hz: float) -> dict[str, object]:
    margin = 1.0  # seconds around a restart window: requests in flight when it began or ended
    in_restart = lambda t: any(lo - margin <= t <= hi + margin for lo, hi in restarts)  # noqa: E731
    ok_swaps = [(lo, hi, v) for lo, hi, v in swaps if isinstance(v, int)]

    def champion_at(t: float) -> set[int]:
        """The versions a correct answer to a request sent at ``t`` may come from."""
        current, allowed = 1, None
        for lo, hi, v in ok_swaps:
            if t >= hi:
                current = v
            elif t >= lo - 0.5:  # inside the swap (or in flight when it began): either version
                allowed = {1, 2}
        return allowed or {current}

    wrong = [a for a in report.answers if not a.error and (len(a.versions) != 1 or
                                                             a.versions[0] not in champion_at(a.sent_s))]
    errors_outside = [a for a in report.errors if not in_restart(a.sent_s)]
    by_pid: dict[int, list[float]] = {}
    for t, pid, rss in memory:
        if rss == rss:  # not NaN
            by_pid.setdefault(pid, []).append(rss)
    longest = max(by_pid.values(), key=len, default=[])
    first, last = (longest[1] if len(longest) > 2 else float("nan")), (longest[-1] if longest else float("nan"))
    flat = len(longest) <= 2 or last <= first * 1.25 + 50
    unauthorised = [n for n in hostile.accepted if n.startswith(("http_load", "http_replace", "http_unload",
                                                                  "grpc_load", "grpc_unload"))]
    result = {
        "minutes": minutes, "rate_hz": rate_hz, "requests": len(report.answers),
        "answered": len(report.answers) - len(report.errors), "wrong_answers": len(wrong),
        "errors": len(report.errors), "errors_outside_restart_windows": len(errors_outside),
        "first_errors_outside": [a.error for a in errors_outside[:3]],
        "swaps": [(round(lo, 1), round(hi - lo, 2), v) for lo, hi, v in swaps],
        "restart_windows_s": [(round(lo, 1), round(hi - lo, 2)) for lo, hi in restarts],
        "hostile_sent": hostile.sent, "unauthorised_loads": len(unauthorised) + int(marker_ran) +
        int("evil" in index), "hostile_accepted": hostile.accepted,
        "memory_mib_longest_server": {"first_after_warmup": first, "last": last, "samples": len(longest)},
        "memory_flat": flat, "latency_ms": report.latency(),
    }
    result["passed"] = (result["wrong_answers"] == 0 and result["unauthorised_loads"] == 0
                        and result["errors_outside_restart_windows"] == 0 and flat and result["answered"] > 0)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second (default 50)")
    parser.add_argument("--promote-every", type=float, default=60.0, help="seconds between swaps (default 60)")
    parser.add_argument("--kill-every", type=float, default=180.0, help="seconds between Triton kills (default 180)")
    args = parser.parse_args(argv)
    result = run(args.minutes, args.rate, args.promote_every, args.kill_every)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
