"""Benchmark: ca_resnet through the embedded Triton vs ONNX Runtime in-process vs PyTorch eager.

    .venv/bin/python bench/serving.py [--profile quick|paper] [--seconds 3] [--max-requests 2000]

1. Triton (gRPC on loopback, dynamic batching, the Python-based ``onnxruntime`` backend) at
   concurrency 1, 8 and 32: each client thread sends one preprocessed face per request, as an
   ensemble step would; throughput and p50/p95/p99 latency.
2. ONNX Runtime in-process on the same requests: the same number of threads, each calling
   ``session.run`` on the same single-sample inputs (one shared session).
3. ONNX Runtime vs PyTorch eager on whole batches (1 and 32).

Each level is bounded by ``--seconds`` and ``--max-requests``. Numbers depend on the machine's
load: on a shared CPU, say so when quoting them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and its name would shadow the ``serving``
# package: put the project root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fer_core.data.preprocess import HaarFaceDetector  # noqa: E402
from fer_core.data.synthfacs import SynthFACS  # noqa: E402
from fer_core.models import create_model  # noqa: E402
from serving.ensembles.processing import prepare_image  # noqa: E402
from serving.export import check_parity, export_onnx  # noqa: E402
from serving.repository import ModelRepository  # noqa: E402
from serving.server import EmbeddedTriton  # noqa: E402

PROFILES = {"quick": {"layers": [1, 1, 1, 1], "width": 16}, "paper": {"layers": [2, 2, 2, 2]}}


def _percentiles(latencies: list[float]) -> tuple[float, float, float]:
    ms = np.array(latencies) * 1e3
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
    p50, p95, p99 = _percentiles(latencies)
    return {"requests": len(latencies), "throughput": len(latencies) / wall, "p50": p50, "p95": p95, "p99": p99}


def _eager_vs_ort(model, onnx_path: Path, samples: np.ndarray, seconds: float) -> list[str]:
    """Median time of one batch through PyTorch eager and ONNX Runtime, one thread each.

    One thread each: on a shared, loaded CPU multi-threaded OpenMP barriers make eager PyTorch
    times swing by orders of magnitude (seen here), which would measure the load, not the runtimes.
    """
    import onnxruntime as ort

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per level")
    parser.add_argument("--max-requests", type=int, default=2000, help="request budget per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-queue-delay-us", type=int, default=0)
    args = parser.parse_args()

    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    torch.manual_seed(0)
    model = create_model("ca_resnet", **PROFILES[args.profile]).eval()
    params = sum(p.numel() for p in model.parameters())
    detector = HaarFaceDetector()
    faces = SynthFACS(0, image_size=96).expression_set(64).images
    samples = np.stack([prepare_image(f, model.metadata, detector).tensor for f in faces])
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "ca_resnet.onnx")
        parity = check_parity(model, onnx_path, samples[:16])
        repo = ModelRepository(Path(tmp) / "models")
        repo.write_model("ca_resnet", 1, onnx_path, max_batch_size=64, max_queue_delay_us=args.max_queue_delay_us)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        print(f"ca_resnet ({args.profile}: {params / 1e6:.2f} M params, input {model.metadata.input.shape}); "
              f"ONNX parity on {len(samples[:16])} faces: max |diff| {parity.max_abs_diff:.1e}")
        eager_lines = _eager_vs_ort(model, onnx_path, samples, args.seconds)  # on a quiet process
        rows = []
        with EmbeddedTriton(repo, Path(tmp) / "workspace", models=["ca_resnet"]) as server:
            for concurrency in args.concurrency:
                def triton_worker(i: int):
                    client = grpcclient.InferenceServerClient(server.grpc_url)
                    x = samples[i % len(samples)][None]
                    tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
                    tensor.set_data_from_numpy(x)
                    output = grpcclient.InferRequestedOutput("logits")
                    return lambda: client.infer("ca_resnet", [tensor], outputs=[output])

                def ort_worker(i: int):
                    x = samples[i % len(samples)][None]
                    return lambda: session.run(["logits"], {"image": x})

                triton = _run_threads(concurrency, triton_worker, args.seconds, args.max_requests)
                local = _run_threads(concurrency, ort_worker, args.seconds, args.max_requests)
                rows.append((concurrency, triton, local))
            stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("ca_resnet", as_json=True)
        batches = stats["model_stats"][0].get("batch_stats", [])
        executed = sum(int(b["compute_infer"]["count"]) for b in batches)
        inferred = sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in batches)

    print(f"\n{'path':24s} {'conc':>4s} {'req':>6s} {'req/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s}")
    for concurrency, triton, local in rows:
        for name, r in (("Triton gRPC (embedded)", triton), ("ORT in-process", local)):
            print(f"{name:24s} {concurrency:4d} {r['requests']:6d} {r['throughput']:9.1f} "
                  f"{r['p50']:8.2f} {r['p95']:8.2f} {r['p99']:8.2f}")
    print(f"Triton formed batches of {inferred / max(executed, 1):.2f} samples on average ({executed} executions)")
    print("\nratio Triton / in-process throughput:")
    for concurrency, triton, local in rows:
        ratio = triton["throughput"] / local["throughput"]
        target = "  (target >= 0.8)" if concurrency == 8 else ""
        print(f"  concurrency {concurrency:3d}: {ratio:.2f}{target}")

    print()
    print("\n".join(eager_lines))
    print("\nmeasured on a shared machine unless stated otherwise")


if __name__ == "__main__":
    main()
