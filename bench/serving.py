"""Benchmark: ca_resnet and its ensemble through the embedded Triton vs the same work in-process.

    .venv/bin/python bench/serving.py [--profile quick|paper] [--seconds 3] [--rounds 3] [--untuned] [--json out.json]

One run reports, at concurrency 1, 8 and 32 (client threads, one sample per request):

1. **network**: one preprocessed face (FP32 ``[1, 48, 48]``) per request, through Triton (gRPC on
   loopback, dynamic batching, the Python-based ``onnxruntime`` backend), then the limits: ONNX
   Runtime in-process with the same number of threads each calling ``session.run`` on one sample
   (one shared session with the ORT threads Triton's instances get), and one batched ``session.run`` of ``concurrency``
   samples (its throughput is ``concurrency / time``);
   With ``--shm`` (default on) the network is also measured with system shared-memory inputs and
   outputs (``tritonclient.utils.shared_memory``: one region per client thread, registered once
   with the workspace's control key, since shared-memory registration is a restricted API here):
   what a local client saves by not sending the tensor over gRPC;
2. **ensemble**: one encoded PNG per request through ``ca_resnet_ensemble`` in the configured layout
   (``FER_TRITON_ENSEMBLE``; ``fused``, the CPU default: one ``ca_resnet_pipeline`` step), then
   in-process the same decode + pre-process + ORT + post-processing per request on threads, and
   batched (all decodes, one ORT call, one post-processing call); ``ensemble_other`` serves the other
   layout beside it (``ca_resnet_other_ensemble``), so both layouts are measured in one run;
3. per level: throughput, p50/p99, CPU milliseconds per request (this process, i.e. the clients
   or the in-process work, plus the ``tritonserver`` process tree with its stubs, from psutil: on a
   shared, loaded CPU throughput measures the neighbours too, the CPU cost per request much less), the batches Triton formed (average samples per execution of
   each model) and where the time went, from Triton's statistics extension: per request the queue
   wait and per execution the compute (input, infer, output) of each model; the network's compute
   per execution beside ONNX Runtime's own time for a batch of the same size in-process, so what
   the Python backend and its stub round trip add is a measured figure, not a guess;
4. the issue's targets as ratios (network >= 0.9x in-process threads at 8 and 32, >= 0.6x the
   batched limit at 32; ensemble >= 0.8x in-process threads at 8; p99 at 8 no worse than
   in-process), each marked met or missed, with the ratio of every round (``--rounds``) beside it;
5. where NVIDIA's ``perf_analyzer`` is available (``bench/perf_tools.sh``, or ``$FER_PERF_ANALYZER``),
   its figures for both models at the same levels against the same server (``bench/perf_analyzer.py``
   does the input data and parsing; no validation here, that bench validates);
6. ONNX Runtime vs PyTorch eager on whole batches (1 and 32);
7. ``ceiling`` (a workload, on by default): the Python-based backend's own limit, an ``Identity``
   graph served with the network's very config (same backend, instances, threads, batching) through
   the same gRPC client, beside the network's in-process threads; the CPU-bound limit that implies
   (cores / (ORT's CPU + the identity's CPU per request)); and at the lowest concurrency a
   per-request split (client + gRPC, batcher queue, Triton <-> stub input/output, the stub round
   trip with execute) for the network and the identity, with ONNX Runtime's own batch-1 time.
   ``ensemble_ceiling`` (also on by default) does the same for the ensemble: three identities
   chained in an ensemble (as many stub crossings and hand-offs as pre-process -> network ->
   post-process, nothing computed), and the bound cores / (in-process pipeline CPU + its CPU);
   ``fused_ceiling`` the same with one identity in an ensemble (the fused layout's one crossing).
   With ``--shm`` the ensemble is also driven through :class:`serving.client.FERClient`, plain and
   with ``shared_memory=True``.

The repository is written with :class:`serving.tuning.ServingTuning` from the environment
(``FER_TRITON_*``; defaults from this machine's cores); ``--untuned`` writes the configuration this
platform used before that existed (one instance per model, ORT's default threads, no queue delay),
so before/after can be measured in one sitting. Each level is bounded by ``--seconds`` and
``--max-requests``, measured in ``--rounds`` slices (default 3) that take turns with every other
level's, so the Triton and in-process figures of a level come from the same minutes of a CPU whose
speed drifts (a shared VM); the 1-minute load average and the share of CPU time the hypervisor stole
(``/proc/stat``) are printed beside every level: on a shared CPU the figures measure both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and its name would shadow the ``serving``
# package: put the project root there instead (imported, as the tests do, sys.path stays as it is).
if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402

PROFILES = {"quick": {"layers": [1, 1, 1, 1], "width": 16}, "paper": {"layers": [2, 2, 2, 2]}}
NETWORK = "ca_resnet"
ENSEMBLE = f"{NETWORK}_ensemble"
# The other ensemble layout (FER_TRITON_ENSEMBLE: fused / steps) is served beside the configured
# one under this stem, so one run measures both: <network>_other_ensemble.
OTHER_STEM = f"{NETWORK}_other"
IDENTITY = "fer_backend_ceiling"  # an Identity graph in the network's own config: see write_identity_model
IDENTITY_ENSEMBLE = "fer_ensemble_ceiling"  # three identity steps chained: see write_identity_ensemble
IDENTITY_ENSEMBLE_1 = "fer_fused_ceiling"  # one identity step in an ensemble: the fused layout's crossing
# Ceiling workload -> (Triton model, the ensemble layout whose stub crossings it reproduces).
ENSEMBLE_CEILINGS = {"ensemble_ceiling": (IDENTITY_ENSEMBLE, "steps"), "fused_ceiling": (IDENTITY_ENSEMBLE_1, "fused")}
# The targets (ratio name -> minimum).
TARGETS = {
    "network / in-process threads, c=8": 0.9,
    "network / in-process threads, c=32": 0.9,
    "network / in-process batched, c=32": 0.6,
    "ensemble / in-process threads, c=8": 0.8,
    "in-process p99 / network p99, c=8": 1.0,
}


def _percentiles(latencies: list[float]) -> tuple[float, float, float]:
    ms = np.array(latencies or [0.0]) * 1e3
    return tuple(float(np.percentile(ms, q)) for q in (50, 95, 99))  # type: ignore[return-value]


def _run_threads(concurrency: int, make_worker, seconds: float, max_requests: int) -> dict[str, float]:
    """Run ``concurrency`` workers until the time or request budget is spent."""
    latencies: list[float] = []
    lock, stop = threading.Lock(), threading.Event()
    counter = [0]

    def loop(worker_index: int) -> None:
        call = make_worker(worker_index)
        call()  # warm-up, not timed
        while not stop.is_set():
            with lock:
                if counter[0] >= max_requests:
                    return
                counter[0] += 1
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    for t in threads:
        t.join()
    timer.cancel()
    wall = time.perf_counter() - start
    return _summary(latencies, wall)


def _summary(latencies: list[float], wall: float) -> dict:
    p50, p95, p99 = _percentiles(latencies)
    return {"requests": len(latencies), "throughput": len(latencies) / wall, "p50": p50, "p95": p95, "p99": p99,
            "mean": float(np.mean(latencies)) * 1e3 if latencies else 0.0, "wall": wall, "latencies": latencies}


def _merge_slices(slices: list[dict]) -> dict[str, float]:
    """One level from its ``--rounds`` slices: requests, time and CPU summed, latencies pooled (a
    batched level: its call times pooled, throughput = batch / median); the load of the last slice."""
    if "times" in slices[0]:
        times = [t for part in slices for t in part["times"]]
        merged = _batched_summary(times, slices[0]["batch"])
    else:
        merged = _summary([x for part in slices for x in part["latencies"]], sum(p["wall"] for p in slices))
        del merged["latencies"]
    merged["cpu_ms"] = sum(p["cpu_s"] for p in slices) * 1e3 / max(merged["requests"], 1)
    merged["steal"] = steal_percent((0, 0), (sum(p.get("steal_ticks", 0) for p in slices),
                                             sum(p.get("all_ticks", 0) for p in slices)))
    merged["load"] = slices[-1]["load"]
    merged["slices"] = len(slices)
    merged["round_throughputs"] = [p["throughput"] for p in slices]
    return merged


class _CpuMeter:
    """CPU seconds (user + system) used by this process and, optionally, a server's process tree."""

    def __init__(self, server_pid: int | None = None) -> None:
        import psutil

        self.me = psutil.Process()
        self.server = psutil.Process(server_pid) if server_pid else None

    def seconds(self) -> float:
        import psutil

        processes = [self.me] + ([self.server, *self.server.children(recursive=True)] if self.server else [])
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total


def host_ticks(stat: str = "/proc/stat") -> tuple[int, int]:
    """(steal, all) CPU ticks of the whole machine since boot, from the first line of ``/proc/stat``;
    (0, 0) where there is none. Steal is time the hypervisor gave this VM's virtual CPUs to someone
    else: the load average does not show it, and it slows both sides of a ratio."""
    try:
        with open(stat) as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of the machine's CPU time stolen between two :func:`host_ticks` readings, in %."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else 0.0


def _measured(meter: _CpuMeter, run) -> dict[str, float]:
    """``run()``'s figures plus ``cpu_ms``: CPU milliseconds per request (samples, when batched),
    and the host's steal/all ticks over the run."""
    start, ticks = meter.seconds(), host_ticks()
    result = run()
    result["cpu_s"] = meter.seconds() - start
    result["cpu_ms"] = result["cpu_s"] * 1e3 / max(result["requests"], 1)
    end = host_ticks()
    result["steal_ticks"], result["all_ticks"] = end[0] - ticks[0], end[1] - ticks[1]
    return result


def _run_batched(call, batch: int, seconds: float, runs: int = 50) -> dict[str, float]:
    """One call doing ``batch`` samples, repeated: throughput = batch / median time."""
    call()  # warm-up
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < runs and time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return _batched_summary(times, batch)


def _batched_summary(times: list[float], batch: int) -> dict:
    median = statistics.median(times)
    return {"requests": batch * len(times), "throughput": batch / median, "p50": median * 1e3, "p95": 0.0,
            "p99": max(times) * 1e3, "times": times, "batch": batch}


def statistics_delta(pairs: list[tuple[dict, dict]]) -> dict[str, dict[str, float]]:
    """Per model, what happened between each pair of ``get_inference_statistics(as_json=True)``
    answers (a level's slices), summed: requests, executions, samples per execution, queue wait per
    request (µs) and compute per execution (µs: input, infer, output, from the per-batch-size
    statistics)."""
    totals: dict[str, dict[str, float]] = {}
    for before, after in pairs:
        for name, raw in _raw_delta(before, after).items():
            into = totals.setdefault(name, dict.fromkeys(raw, 0))
            for key, value in raw.items():
                into[key] += value
    out = {}
    for name, t in totals.items():
        requests, executions = t["requests"], t["executions"]
        out[name] = {
            "requests": int(requests), "executions": int(executions),
            "batch": t["samples"] / executions if executions else 0.0,
            "queue_us": t["queue"] / requests / 1e3 if requests else 0.0,
            "request_us": t["served"] / requests / 1e3 if requests else 0.0,
            **{f"{k}_us": t[k] / executions / 1e3 if executions else 0.0
               for k in ("compute_input", "compute_infer", "compute_output")},
        }
    return out


def _raw_delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
    """Per model, the counts and nanoseconds Triton added between two statistics answers."""
    def index(stats: dict) -> dict[str, dict]:
        return {m["name"]: m for m in stats.get("model_stats", [])}

    def ns(entry: dict, key: str) -> int:
        return int(entry.get(key, {}).get("ns", 0))

    old, out = index(before), {}
    for name, model in index(after).items():
        prior = old.get(name, {})
        requests = int(model["inference_stats"].get("success", {}).get("count", 0)) - \
            int(prior.get("inference_stats", {}).get("success", {}).get("count", 0)) if prior else \
            int(model["inference_stats"].get("success", {}).get("count", 0))
        queue = ns(model["inference_stats"], "queue") - ns(prior.get("inference_stats", {}), "queue")
        # Time in the server per request, from arrival to response (Triton's "success" duration).
        served = ns(model["inference_stats"], "success") - ns(prior.get("inference_stats", {}), "success")
        batches = {int(b["batch_size"]): b for b in model.get("batch_stats", [])}
        prior_batches = {int(b["batch_size"]): b for b in prior.get("batch_stats", [])}
        executions = samples = 0
        compute = {"compute_input": 0, "compute_infer": 0, "compute_output": 0}
        for size, b in batches.items():
            p = prior_batches.get(size, {})
            count = int(b["compute_infer"]["count"]) - int(p.get("compute_infer", {}).get("count", 0))
            executions += count
            samples += size * count
            for key in compute:
                compute[key] += ns(b, key) - ns(p, key)
        out[name] = {"requests": requests, "executions": executions, "samples": samples, "queue": queue,
                     "served": served, **compute}
    return out


THROUGHPUT_TARGETS = {  # target -> (numerator level, denominator level)
    "network / in-process threads, c=8": (("network", "triton", 8), ("network", "threads", 8)),
    "network / in-process threads, c=32": (("network", "triton", 32), ("network", "threads", 32)),
    "network / in-process batched, c=32": (("network", "triton", 32), ("network", "batched", 32)),
    "ensemble / in-process threads, c=8": (("ensemble", "triton", 8), ("ensemble", "threads", 8)),
}


def round_ratios(rows: dict[tuple[str, str, int], dict]) -> dict[str, list[float]]:
    """Each throughput target's ratio per ``--rounds`` slice (the two sides of a round were measured
    minutes apart at most): how much of a run's ratio is the VM's drift."""
    out = {}
    for name, (top, bottom) in THROUGHPUT_TARGETS.items():
        if top in rows and bottom in rows:
            pairs = zip(rows[top].get("round_throughputs", []), rows[bottom].get("round_throughputs", []))
            out[name] = [a / b for a, b in pairs if b > 0]
    return out


def ratios(rows: dict[tuple[str, str, int], dict[str, float]]) -> dict[str, float]:
    """The issue's target ratios from the measured levels (keys: (workload, path, concurrency))."""
    def tp(*key) -> float:
        return rows[key]["throughput"] if key in rows else float("nan")

    out = {name: tp(*top) / tp(*bottom) for name, (top, bottom) in THROUGHPUT_TARGETS.items()}
    if ("network", "triton", 8) in rows and ("network", "threads", 8) in rows:
        out["in-process p99 / network p99, c=8"] = rows[("network", "threads", 8)]["p99"] / rows[("network", "triton", 8)]["p99"]
    return out


def _eager_vs_ort(model, onnx_path: Path, samples: np.ndarray, seconds: float) -> list[str]:
    """Median time of one batch through PyTorch eager and ONNX Runtime, one thread each.

    One thread each: on a shared, loaded CPU multi-threaded OpenMP barriers make eager PyTorch
    times swing by orders of magnitude (seen here), which would measure the load, not the runtimes.
    """
    import onnxruntime as ort
    import torch

    torch.set_num_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    lines = [f"{'batch':>5s} {'PyTorch ms':>11s} {'ORT ms':>8s} {'ORT speed-up':>13s}   (1 thread each)"]
    for batch in (1, 32):
        x = np.ascontiguousarray(np.resize(samples, (batch, *samples.shape[1:])))
        timings = {}
        for name, fn in (("torch", lambda: model(torch.from_numpy(x))),
                         ("ort", lambda: session.run(["logits"], {"image": x}))):
            with torch.no_grad():
                fn()
                runs, start = [], time.perf_counter()
                while len(runs) < 50 and time.perf_counter() - start < seconds:
                    t0 = time.perf_counter()
                    fn()
                    runs.append(time.perf_counter() - t0)
            timings[name] = statistics.median(runs) * 1e3
        lines.append(f"{batch:5d} {timings['torch']:11.2f} {timings['ort']:8.2f} {timings['torch'] / timings['ort']:12.2f}x")
    return lines


class _SharedMemoryWorkers:
    """Client threads whose input and output tensors travel through system shared memory."""

    def __init__(self, server, samples: np.ndarray, classes: int) -> None:
        self.server, self.samples, self.classes = server, samples, classes
        self.regions: list[tuple[object, str, object]] = []  # (handle, name, client)
        self.lock = threading.Lock()

    def make(self, i: int):
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        headers = self.server.endpoint().headers  # shared-memory registration needs the control key
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        x = np.ascontiguousarray(self.samples[i % len(self.samples)][None])
        tag = f"fer-bench-{os.getpid()}-{i}-{len(self.regions)}"
        out_shape, out_bytes = (1, self.classes), self.classes * 4  # FP32 logits
        handle = shm.create_shared_memory_region(tag, f"/{tag}", x.nbytes + out_bytes)
        shm.set_shared_memory_region(handle, [x])
        client.register_system_shared_memory(tag, f"/{tag}", x.nbytes + out_bytes, headers=headers)
        with self.lock:
            self.regions.append((handle, tag, client))
        tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
        tensor.set_shared_memory(tag, x.nbytes)
        output = grpcclient.InferRequestedOutput("logits")
        output.set_shared_memory(tag, out_bytes, offset=x.nbytes)

        def call():
            client.infer(NETWORK, [tensor], outputs=[output])
            return shm.get_contents_as_numpy(handle, np.float32, out_shape, offset=x.nbytes)
        return call

    def __enter__(self) -> "_SharedMemoryWorkers":
        return self

    def __exit__(self, *exc: object) -> None:
        import tritonclient.utils.shared_memory as shm

        headers = self.server.endpoint().headers
        for handle, tag, client in self.regions:
            # Triton can still hold the region for a moment after the last response ("currently in use").
            for attempt in range(50):
                try:
                    client.unregister_system_shared_memory(tag, headers=headers)
                    break
                except Exception:  # noqa: BLE001 -- InferenceServerException
                    if attempt == 49:
                        raise
                    time.sleep(0.02)
            shm.destroy_shared_memory_region(handle)


def _image_dims(config: str) -> str:
    """The ``dims`` of the ``image`` input in a ``config.pbtxt``, as written there (``[1, 48, 48]``)."""
    import re

    return re.search(r'\{ name: "image"[^}]*dims: (\[[^]]*\])', config).group(1)


def _cpu_bound(own_ms: float, serving_ms: float) -> float:
    """Requests/s the cores allow when each costs ``own_ms`` of work plus ``serving_ms`` of serving,
    clients and server sharing the cores."""
    return (os.cpu_count() or 1) * 1e3 / (own_ms + serving_ms)


def write_identity_model(repo, network: str = NETWORK, name: str = IDENTITY) -> str:
    """The ceiling of the Python-based backend: ``name`` in ``repo``, the ``network``'s own
    ``config.pbtxt`` (same backend, instances, ORT threads, dynamic batching) but an ONNX graph that
    is one ``Identity`` (image in, the same image out as ``logits``), so what Triton spends on it
    is gRPC, the batcher and the stub round trip, with next to nothing computed."""
    import re

    import onnx
    from onnx import TensorProto, helper

    config = (repo.root / network / "config.pbtxt").read_text()
    dims = _image_dims(config)
    config = re.sub(r'^name: "[^"]*"', f'name: "{name}"', config, count=1, flags=re.M)
    config = re.sub(r'(\{ name: "logits"[^}]*dims: )\[[^]]*\]', lambda m: m.group(1) + dims, config)
    config = re.sub(r'label_filename: "[^"]*"', "", config)
    config = re.sub(r"versions: \[[^]]*\]", "versions: [1]", config)
    shape = ["batch"] + [int(d) for d in dims.strip("[] ").split(",")]
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], name,
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (repo.root / name / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(repo.root / name / "1" / "model.onnx"))
    (repo.root / name / "config.pbtxt").write_text(config)
    return name


def write_identity_ensemble(repo, step: str = IDENTITY, name: str = IDENTITY_ENSEMBLE, steps: int = 3) -> str:
    """The ceiling of the ensemble path: ``name`` chains ``steps`` copies of the identity model
    ``step`` (written by :func:`write_identity_model`), so a request crosses as many Python stubs and
    ensemble hand-offs as the real ensemble's pre-process -> network -> post-process, with nothing
    decoded or computed. It carries the network's input tensor (a few KB) where the real ensemble
    carries a PNG in and a label out: a lower bound on the ensemble's serving cost, not its copy."""
    import re

    config = (repo.root / step / "config.pbtxt").read_text()
    dims = _image_dims(config)
    max_batch = re.search(r"max_batch_size: (\d+)", config).group(1)
    names = ["image"] + [f"hop{i}" for i in range(1, steps)] + ["logits"]
    chained = ",\n".join(
        f'  {{ model_name: "{step}" model_version: -1 input_map {{ key: "image" value: "{names[i]}" }} '
        f'output_map {{ key: "logits" value: "{names[i + 1]}" }} }}' for i in range(steps))
    (repo.root / name / "1").mkdir(parents=True, exist_ok=True)
    (repo.root / name / "config.pbtxt").write_text(
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
        f'input [ {{ name: "image" data_type: TYPE_FP32 dims: {dims} }} ]\n'
        f'output [ {{ name: "logits" data_type: TYPE_FP32 dims: {dims} }} ]\n'
        f"ensemble_scheduling {{\n step [\n{chained}\n ]\n}}\n")
    return name


def _perf_analyzer_levels(url: str, tmp: Path, samples: np.ndarray, pngs: list[bytes], args) -> list[str]:
    """perf_analyzer's table for the network and the ensemble, or nothing when the tool is absent."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_perf_analyzer", Path(__file__).with_name("perf_analyzer.py"))
    pa = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    path = list(sys.path)
    sys.modules[spec.name] = pa  # its dataclasses look their module up there
    spec.loader.exec_module(pa)
    sys.path[:] = path
    tool = pa.find_perf_analyzer()
    if tool is None:
        print("(perf_analyzer not installed: bench/perf_tools.sh installs it; its figures are left out)")
        return []
    requests = {NETWORK: [{"image": s.astype(np.float32)} for s in samples[:8]],
                ENSEMBLE: [{"IMAGE": np.array([p], dtype=object)} for p in pngs[:8]]}
    levels = []
    for model in (NETWORK, ENSEMBLE):
        plain, _ = pa.input_data(url, model, requests[model])
        data_file = tmp / f"pa-{model}.json"
        data_file.write_text(json.dumps(plain))
        for concurrency in args.concurrency:
            csv_file = tmp / f"pa-{model}-{concurrency}.csv"
            command = pa.perf_analyzer_command(tool, url, model, data_file, concurrency, csv_file,
                                               window_ms=int(args.seconds * 1000), stability=50, max_trials=6)
            levels.append(pa.run_perf_analyzer(command, model, concurrency, csv_file, timeout_s=120))
            print(pa.format_table(levels[-1:]).splitlines()[1], flush=True)
    return [pa.format_table(levels)]


def _tuning(args):
    from fer_platform.settings import Settings
    from serving.tuning import ServingTuning

    if args.untuned:  # the configuration written before serving.tuning existed
        return ServingTuning(instances=1, intra_op_threads=0, inter_op_threads=0, allow_spinning=True,
                             max_queue_delay_us=0, preferred_batch_sizes=(), preprocess_instances=1,
                             postprocess_instances=1)
    return ServingTuning.load(env=Settings.load().serving_tuning)  # this entry point's settings


def _config_summary(repo) -> str:
    import re

    text = (repo.root / NETWORK / "config.pbtxt").read_text()
    parts = [m.group(0) for m in re.finditer(r"count: \d+|max_queue_delay_microseconds: \d+|preferred_batch_size: \[[^]]*\]", text)]
    parts += [f"{k}={v}" for k, v in re.findall(r'key: "([^"]+)" value: \{ string_value: "([^"]*)" \}', text)]
    first = repo.step_models(NETWORK)[0]
    pre = re.search(r"count: \d+", (repo.root / first / "config.pbtxt").read_text())
    return (f"{NETWORK}: " + ", ".join(parts) + f"; ensemble layout {repo.ensemble_layout()} "
            f"({first} instances {pre.group(0) if pre else '?'})")


def _layout_models(repo, stem: str) -> tuple[str, ...]:
    """The models one ensemble request runs through (Triton statistics per step)."""
    steps = repo.step_models(stem)
    return (steps[0], NETWORK, steps[1]) if len(steps) == 2 else tuple(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per level")
    parser.add_argument("--max-requests", type=int, default=4000, help="request budget per level")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every level in this many slices, the workloads taking turns (the "
                             "figures of a level are its slices pooled)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workloads", nargs="+",
                        choices=["network", "ceiling", "ensemble", "ensemble_other", "ensemble_ceiling", "fused_ceiling"],
                        default=["network", "ceiling", "ensemble", "ensemble_other", "ensemble_ceiling",
                                 "fused_ceiling"],
                        help="ceiling: an Identity graph in the network's own config (the Python backend's "
                             "limit); ensemble: the configured layout (FER_TRITON_ENSEMBLE); ensemble_other: the "
                             "other layout, served beside it; ensemble_ceiling: three identities chained in an "
                             "ensemble (the steps layout's stub crossings); fused_ceiling: one identity in an ensemble (the "
                             "fused layout's)")
    parser.add_argument("--untuned", action="store_true",
                        help="the configuration before serving.tuning (1 instance, ORT default threads, no delay)")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="also time PyTorch eager vs ONNX Runtime on whole batches")
    parser.add_argument("--shm", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the network with system shared-memory inputs/outputs")
    parser.add_argument("--perf-analyzer", action=argparse.BooleanOptionalAction, default=True,
                        help="also run NVIDIA's perf_analyzer when bench/perf_tools.sh has installed it")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    import tritonclient.grpc as grpcclient

    from fer_core.data.pipeline import make_detector
    from fer_core.data.synthfacs import SynthFACS
    from fer_core.models import create_model
    from serving.client import encode_image
    from serving.ensembles import processing
    from serving.export import check_parity, export_onnx
    from serving.repository import ModelRepository
    from serving.server import EmbeddedTriton

    torch.manual_seed(0)
    model = create_model(NETWORK, **PROFILES[args.profile]).eval()
    metadata = model.metadata
    params = sum(p.numel() for p in model.parameters())
    faces = SynthFACS(0, image_size=96).expression_set(64).images
    pngs = [encode_image(f) for f in faces]
    tuning = _tuning(args)
    rows: dict[tuple[str, str, int], dict[str, float]] = {}
    splits: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
    ort_batch_ms: dict[int, float] = {}
    streams: dict[bool, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / f"{NETWORK}.onnx")
        repo = ModelRepository(Path(tmp) / "models", face_detection="off", tuning=tuning)
        repo.install(NETWORK, 1, onnx_path, max_batch_size=64)
        pipeline = repo.pipeline(NETWORK, 1).with_face("off")
        detector = make_detector(pipeline)
        samples = np.stack([processing.prepare([p], metadata, detector, pipeline=pipeline).tensor for p in pngs])
        parity = check_parity(model, onnx_path, samples[:16])
        # The in-process limit runs ONNX Runtime with the threads Triton's instances get (ORT's own
        # defaults under --untuned), so the ratios measure serving, not a thread setting.
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = tuning.intra_op_threads, tuning.inter_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if tuning.allow_spinning else "0")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        print(f"{NETWORK} ({args.profile}: {params / 1e6:.2f} M params, input {metadata.input.shape}); "
              f"ONNX parity on 16 faces: max |diff| {parity.max_abs_diff:.1e}; {os.cpu_count()} cores")
        print(f"tuning ({'--untuned' if args.untuned else 'ServingTuning.load()'}): {tuning}")
        print(_config_summary(repo))
        eager_lines = _eager_vs_ort(model, onnx_path, samples, args.seconds) if args.eager else []

        def in_process_ensemble(encoded: list[bytes]):
            prepared = [processing.prepare([e], metadata, detector, pipeline=pipeline) for e in encoded]
            (logits,) = session.run(["logits"], {"image": np.stack([p.tensor for p in prepared])})
            return processing.postprocess({"logits": logits}, metadata, np.stack([p.to_input for p in prepared]))

        other_layout = "steps" if repo.ensemble_layout() == "fused" else "fused"
        extra = []
        if "ensemble_other" in args.workloads:
            import dataclasses

            other_repo = ModelRepository(repo.root, face_detection="off",
                                         tuning=dataclasses.replace(tuning, ensemble_layout=other_layout))
            other_repo.write_ensemble(NETWORK, 1, stem=OTHER_STEM)
            extra += [*other_repo.step_models(OTHER_STEM), f"{OTHER_STEM}_ensemble"]
        if {"ceiling", *ENSEMBLE_CEILINGS} & set(args.workloads):
            extra.append(write_identity_model(repo))
        if "ensemble_ceiling" in args.workloads:
            extra.append(write_identity_ensemble(repo))
        if "fused_ceiling" in args.workloads:
            extra.append(write_identity_ensemble(repo, name=IDENTITY_ENSEMBLE_1, steps=1))
        with EmbeddedTriton(repo, Path(tmp) / "workspace", models=repo.load_order() + extra) as server:
            stats_client = grpcclient.InferenceServerClient(server.grpc_url)
            served_meter, own_meter = _CpuMeter(server.process.pid), _CpuMeter()
            run_ticks = host_ticks()
            print(f"load average at start {os.getloadavg()[0]:.2f}\n")
            print(f"{'workload':9s} {'path':22s} {'conc':>4s} {'req':>6s} {'req/s':>8s} {'p50 ms':>8s} "
                  f"{'p99 ms':>8s} {'CPU ms/req':>10s} {'load':>5s} {'steal%':>6s}")
            # --rounds: every level is measured in that many slices, the workloads taking turns, so a
            # drift of this shared VM's CPU over minutes falls on Triton and in-process alike.
            slice_s, slice_requests = args.seconds / args.rounds, max(1, args.max_requests // args.rounds)
            parts: dict[tuple[str, str, int], list[dict]] = {}
            pairs: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
            for round_index in range(args.rounds):
                for workload in args.workloads:
                    for concurrency in args.concurrency:
                        if workload in ("network", "ceiling", *ENSEMBLE_CEILINGS):
                            triton_model = {"network": NETWORK, "ceiling": IDENTITY,
                                            **{w: m for w, (m, _) in ENSEMBLE_CEILINGS.items()}}[workload]

                            def triton_worker(i: int, model_name: str = triton_model):
                                client = grpcclient.InferenceServerClient(server.grpc_url)
                                x = samples[i % len(samples)][None]
                                tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
                                tensor.set_data_from_numpy(x)
                                output = grpcclient.InferRequestedOutput("logits")
                                return lambda: client.infer(model_name, [tensor], outputs=[output])

                            def thread_worker(i: int):
                                x = samples[i % len(samples)][None]
                                return lambda: session.run(["logits"], {"image": x})

                            batch = np.ascontiguousarray(np.resize(samples, (concurrency, *samples.shape[1:])))
                            batched_call = lambda: session.run(["logits"], {"image": batch})  # noqa: E731
                        else:
                            triton_model = ENSEMBLE if workload == "ensemble" else f"{OTHER_STEM}_ensemble"

                            def triton_worker(i: int, model_name: str = triton_model):
                                client = grpcclient.InferenceServerClient(server.grpc_url)
                                x = np.array([[pngs[i % len(pngs)]]], dtype=object)
                                tensor = grpcclient.InferInput("IMAGE", list(x.shape), "BYTES")
                                tensor.set_data_from_numpy(x)
                                output = grpcclient.InferRequestedOutput("LABEL")
                                return lambda: client.infer(model_name, [tensor], outputs=[output])

                            def thread_worker(i: int):
                                encoded = [pngs[i % len(pngs)]]
                                return lambda: in_process_ensemble(encoded)

                            batch_pngs = [pngs[i % len(pngs)] for i in range(concurrency)]
                            batched_call = lambda: in_process_ensemble(batch_pngs)  # noqa: E731
                        if round_index == 0 and concurrency == args.concurrency[0]:  # first runs allocate: untimed
                            _run_threads(8, triton_worker, 1.0, 400)
                        before = stats_client.get_inference_statistics("", as_json=True)
                        triton = _measured(served_meter, lambda: _run_threads(concurrency, triton_worker, slice_s,
                                                                             slice_requests))
                        triton["load"] = os.getloadavg()[0]
                        after = stats_client.get_inference_statistics("", as_json=True)
                        pairs.setdefault((workload, concurrency), []).append((before, after))
                        if workload == "ensemble" and args.shm:  # FERClient itself, plain and shared memory
                            for path, shared in (("fercli", False), ("fercli_shm", True)):
                                clients: list = []

                                def fer_worker(i: int, shared: bool = shared, clients: list = clients):
                                    from serving.client import FERClient

                                    client = FERClient(server.grpc_url, key=server.key, shared_memory=shared)
                                    clients.append(client)
                                    data = [pngs[i % len(pngs)]]
                                    return lambda: client.predict(data, network=NETWORK, validate=False)
                                r = _measured(served_meter, lambda: _run_threads(concurrency, fer_worker, slice_s,
                                                                                 slice_requests))
                                for client in clients:
                                    client.close()
                                r["load"] = os.getloadavg()[0]
                                parts.setdefault((workload, path, concurrency), []).append(r)
                        if workload == "network" and args.shm:
                            with _SharedMemoryWorkers(server, samples, metadata.outputs[0].shape[0]) as shm_workers:
                                shm = _measured(served_meter, lambda: _run_threads(
                                    concurrency, shm_workers.make, slice_s, slice_requests))
                            shm["load"] = os.getloadavg()[0]
                            parts.setdefault((workload, "shm", concurrency), []).append(shm)
                        parts.setdefault((workload, "triton", concurrency), []).append(triton)
                        if workload not in ("ceiling", *ENSEMBLE_CEILINGS, "ensemble_other"):  # their in-process sides: the real ones
                            threads = _measured(own_meter, lambda: _run_threads(concurrency, thread_worker, slice_s,
                                                                                slice_requests))
                            threads["load"] = os.getloadavg()[0]
                            batched = _measured(own_meter, lambda: _run_batched(batched_call, concurrency, slice_s))
                            batched["load"] = os.getloadavg()[0]
                            parts.setdefault((workload, "threads", concurrency), []).append(threads)
                            parts.setdefault((workload, "batched", concurrency), []).append(batched)
                        if round_index < args.rounds - 1:
                            continue  # printed once every round of this level is in
                        for path in ("triton", "shm", "fercli", "fercli_shm", "threads", "batched"):
                            if (workload, path, concurrency) in parts:
                                rows[(workload, path, concurrency)] = _merge_slices(parts.pop((workload, path, concurrency)))
                        splits[(workload, concurrency)] = statistics_delta(pairs.pop((workload, concurrency)))
                        for path in ("triton", "shm", "fercli", "fercli_shm", "threads", "batched"):
                            if (workload, path, concurrency) not in rows:
                                continue
                            r = rows[(workload, path, concurrency)]
                            label = {"triton": "Triton gRPC (identity)" if workload == "ceiling" else
                                     "Triton gRPC (3 identities)" if workload == "ensemble_ceiling" else
                                     "Triton gRPC (1 identity ens.)" if workload == "fused_ceiling" else
                                     f"Triton gRPC ({other_layout})" if workload == "ensemble_other" else
                                     f"Triton gRPC ({repo.ensemble_layout()})" if workload == "ensemble" else
                                     "Triton gRPC (net)",
                                     "shm": "Triton gRPC + shm (net)", "fercli": "FERClient (ensemble)",
                                     "fercli_shm": "FERClient + shm (ens.)",
                                     "threads": "in-process, threads", "batched": f"in-process, 1 call x{concurrency}"}[path]
                            p99 = f"{r['p99']:8.2f}" if path != "batched" else f"{'(max)':>4s}{r['p99']:4.1f}"
                            print(f"{workload:9s} {label:22s} {concurrency:4d} {int(r['requests']):6d} "
                                  f"{r['throughput']:8.1f} {r['p50']:8.2f} {p99} {r['cpu_ms']:10.2f} {r['load']:5.2f} "
                                  f"{r['steal']:6.1f}",
                                  flush=True)
            if "ensemble" in args.workloads:  # one client, many requests per predict: plain vs one gRPC stream
                from serving.client import FERClient

                many = [pngs[i % len(pngs)] for i in range(64)]
                for streaming in (False, True):
                    with FERClient(server.grpc_url, batch_size=1, streaming=streaming) as client:
                        client.predict(many[:4], network=NETWORK)
                        times = []
                        for _ in range(5):
                            t0 = time.perf_counter()
                            client.predict(many, network=NETWORK, validate=False)
                            times.append(time.perf_counter() - t0)
                    streams[streaming] = (64 / statistics.median(times), os.getloadavg()[0])
            layout_models = {"ensemble": _layout_models(repo, NETWORK),
                             "ensemble_other": _layout_models(other_repo, OTHER_STEM)
                             if "ensemble_other" in args.workloads else ()}
            perf_levels = _perf_analyzer_levels(server.grpc_url, Path(tmp), samples, pngs, args) \
                if args.perf_analyzer else []
            # ORT's own time for the batch sizes Triton formed, to set beside its compute per execution.
            sizes = {1} | {max(1, round(s[NETWORK]["batch"])) for s in splits.values() if s.get(NETWORK, {}).get("executions")}
            for size in sorted(sizes):
                one = np.ascontiguousarray(np.resize(samples, (size, *samples.shape[1:])))
                ort_batch_ms[size] = _run_batched(lambda: session.run(["logits"], {"image": one}), size, 1.0)["p50"]

    print("\nwhere the time went (Triton statistics per level; queue per request, compute per execution, µs)")
    print(f"{'workload':9s} {'conc':>4s} {'model':22s} {'execs':>6s} {'batch':>6s} {'queue':>8s} "
          f"{'input':>7s} {'infer':>8s} {'output':>7s}   ORT alone on that batch")
    for (workload, concurrency), split in splits.items():
        for name in {"ensemble": layout_models["ensemble"], "ensemble_other": layout_models["ensemble_other"],
                     "ceiling": (IDENTITY,), "ensemble_ceiling": (IDENTITY,),
                     "fused_ceiling": (IDENTITY,)}.get(workload, (NETWORK,)):
            s = split.get(name)
            if not s or not s["executions"]:
                continue
            alone = ort_batch_ms.get(max(1, round(s["batch"]))) if name == NETWORK else None
            note = f"   {alone * 1e3:8.0f}" if alone else ""
            print(f"{workload:9s} {concurrency:4d} {name:22s} {s['executions']:6d} {s['batch']:6.2f} "
                  f"{s['queue_us']:8.0f} {s['compute_input_us']:7.0f} {s['compute_infer_us']:8.0f} "
                  f"{s['compute_output_us']:7.0f}{note}")

    print("\nthe issue's targets (ratios of this run):")
    measured, per_round = ratios(rows), round_ratios(rows)
    for name, value in measured.items():
        if value == value:  # not NaN: both sides measured
            verdict = "met" if value >= TARGETS[name] else "MISSED"
            rounds = (f"; per round {' / '.join(f'{r:.2f}' for r in per_round[name])}"
                      if len(per_round.get(name, [])) > 1 else "")
            print(f"  {name:38s} {value:5.2f}  (target >= {TARGETS[name]:.1f}: {verdict}{rounds})")
    ceiling = {c: rows[("ceiling", "triton", c)] for c in args.concurrency if ("ceiling", "triton", c) in rows}
    if ceiling:
        print("the Python backend's ceiling (Identity graph, the network's config) / in-process threads (network):")
        for c, r in ceiling.items():
            other = rows.get(("network", "threads", c))
            if other:
                verdict = "below 0.9x: the serving path alone caps it" if r["throughput"] < 0.9 * other["throughput"] else "not below 0.9x"
                print(f"  c={c:<3d} {r['throughput']:8.1f} / {other['throughput']:8.1f} req/s = "
                      f"{r['throughput'] / other['throughput']:.2f}  (load {r['load']:.2f} / {other['load']:.2f}: {verdict})")
        # On a machine whose cores the clients share with the server, throughput is bounded by CPU:
        # a served request costs at least ORT's CPU (in-process) plus what the identity costs.
        print("CPU-bound limit of the network through this serving path (cores / (ORT CPU + identity CPU per request)):")
        for c, r in ceiling.items():
            other = rows.get(("network", "threads", c))
            if other and r.get("cpu_ms"):
                bound = _cpu_bound(other["cpu_ms"], r["cpu_ms"])
                print(f"  c={c:<3d} {other['cpu_ms']:.2f} + {r['cpu_ms']:.2f} ms -> <= {bound:7.0f} req/s = "
                      f"{bound / other['throughput']:.2f}x in-process threads (load {r['load']:.2f})")
    for c in args.concurrency:
        alt, threads = rows.get(("ensemble_other", "triton", c)), rows.get(("ensemble", "threads", c))
        mine = rows.get(("ensemble", "triton", c))
        if alt and threads and mine:
            print(f"ensemble layouts at c={c}: {repo.ensemble_layout()} (configured) {mine['throughput']:.0f} req/s = "
                  f"{mine['throughput'] / threads['throughput']:.2f}x in-process threads, {mine['cpu_ms']:.2f} ms CPU/req; "
                  f"{other_layout} {alt['throughput']:.0f} req/s = {alt['throughput'] / threads['throughput']:.2f}x, "
                  f"{alt['cpu_ms']:.2f} ms CPU/req (load {mine['load']:.2f} / {alt['load']:.2f})")
    layouts = {repo.ensemble_layout(): "ensemble", other_layout: "ensemble_other"}
    for workload, (_, layout) in ENSEMBLE_CEILINGS.items():
        ceilings = {c: rows[(workload, "triton", c)] for c in args.concurrency if (workload, "triton", c) in rows}
        if not ceilings:
            continue
        # The same bound for the ensemble: a served request costs at least the in-process pipeline's
        # CPU (decode + preprocess + ORT + postprocess) plus what the layout's stub crossings cost.
        crossing = "3 chained identities" if layout == "steps" else "1 identity in an ensemble"
        print(f"CPU-bound limit of the {layout} ensemble layout "
              f"(cores / (in-process pipeline CPU + {crossing}, CPU per request)):")
        for c, r in ceilings.items():
            other = rows.get(("ensemble", "threads", c))
            served = rows.get((layouts[layout], "triton", c))
            if other and r.get("cpu_ms"):
                bound = _cpu_bound(other["cpu_ms"], r["cpu_ms"])
                got = f"; measured {served['throughput'] / other['throughput']:.2f}x" if served else ""
                print(f"  c={c:<3d} {other['cpu_ms']:.2f} + {r['cpu_ms']:.2f} ms -> <= {bound:7.0f} req/s = "
                      f"{bound / other['throughput']:.2f}x in-process threads{got}; the identities alone "
                      f"{r['throughput']:.0f} req/s (load {r['load']:.2f})")
    one = min(args.concurrency)
    net, ident = splits.get(("network", one), {}).get(NETWORK), splits.get(("ceiling", one), {}).get(IDENTITY)
    if net and ident and ("network", "triton", one) in rows:
        client_ms = rows[("network", "triton", one)]["mean"]
        ident_ms = rows[("ceiling", "triton", one)]["mean"]
        print(f"\nper-request latency at c={one}, mean ms (network | identity): client-side {client_ms:.3f} | {ident_ms:.3f}")
        for label, key in (("in the server (arrival to response)", "request_us"), ("queue (batcher wait)", "queue_us"),
                           ("compute input (Triton -> stub)", "compute_input_us"),
                           ("compute infer (stub round trip + execute)", "compute_infer_us"),
                           ("compute output (stub -> Triton)", "compute_output_us")):
            print(f"  {label:42s} {net[key] / 1e3:7.3f} | {ident[key] / 1e3:7.3f}")
        print(f"  {'client + gRPC (client-side - in the server)':42s} {client_ms - net['request_us'] / 1e3:7.3f} | "
              f"{ident_ms - ident['request_us'] / 1e3:7.3f}")
        if 1 in ort_batch_ms:
            print(f"  {'ONNX Runtime alone, batch 1, in-process':42s} {ort_batch_ms[1]:7.3f}")
    print("CPU cost per request, in-process threads / Triton (less load-sensitive than throughput):")
    for (workload, path, concurrency), r in rows.items():
        other = rows.get((workload, "threads", concurrency))
        if path in ("triton", "shm", "fercli", "fercli_shm") and other and r.get("cpu_ms"):
            print(f"  {workload:8s} {path:6s} c={concurrency:<3d} {other['cpu_ms']:6.2f} / {r['cpu_ms']:6.2f} ms "
                  f"= {other['cpu_ms'] / r['cpu_ms']:.2f}")
    if streams:
        print(f"\nFERClient.predict of 64 images, one request each (batch_size=1), one client: plain "
              f"{streams[False][0]:.0f} images/s (load {streams[False][1]:.2f}), one gRPC stream "
              f"{streams[True][0]:.0f} images/s (load {streams[True][1]:.2f})")
    if perf_levels:
        print("\nNVIDIA perf_analyzer (gRPC, same server, same faces):")
        print(perf_levels[0])
    if eager_lines:
        print()
        print("\n".join(eager_lines))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, CPU steal over the "
          f"measurements {steal_percent(run_ticks, host_ticks()):.1f} % (a shared machine: the figures measure "
          "the load and the hypervisor too)")
    if args.json:
        args.json.write_text(json.dumps({
            "levels": [{"workload": w, "path": p, "concurrency": c, **r} for (w, p, c), r in rows.items()],
            "split": {f"{w}@{c}": s for (w, c), s in splits.items()}, "ratios": measured, "round_ratios": per_round,
            "tuning": {k: v for k, v in tuning.__dict__.items()}}, indent=1, default=list))


if __name__ == "__main__":
    main()
