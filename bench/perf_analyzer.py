"""Benchmark: NVIDIA's ``perf_analyzer`` against the embedded Triton, beside the Python bench.

    bench/perf_tools.sh                        # once: the tool venv .venv-perf (see that script)
    .venv/bin/python bench/perf_analyzer.py [--concurrency 1 8 32] [--window-ms 2000] [--json out.json]

Starts the embedded ``tritonserver`` (:class:`serving.server.EmbeddedTriton`) over a fresh
:class:`serving.repository.ModelRepository` holding a random-weight ``ca_resnet`` of the ``quick``
profile and its ensemble, then runs ``perf_analyzer`` over gRPC, one invocation per model and
concurrency level:

* ``ca_resnet``: the network alone, one preprocessed face (FP32 ``[1, 48, 48]``) per request;
* ``ca_resnet_ensemble``: one encoded PNG (BYTES ``[1]``) in, ``FACE_FOUND``/``LABEL``/
  ``PROBABILITIES`` out: pre-processing, the network and post-processing inside Triton.

Both get the same SynthFACS faces through ``--input-data`` (a JSON file written here), with
``validation_data``: the outputs the Python client (tritonclient) got for each face first, so
``perf_analyzer`` checks every response it times and fails on any difference. Throughput and
p50/p99 latency come from its ``-f`` CSV. With ``--python-bench`` (default on) the Python bench's
client loop (``bench/serving.py``'s thread runner) measures the same models, faces and levels on
the same server, so the two tools' figures sit side by side. The load average is printed beside
every level: on a shared CPU the figures measure the load too.

Choices recorded here:

* No control key. ``perf_analyzer`` calls server/model metadata, model config, inference and
  statistics; over gRPC none of them is in ``serving.server.RESTRICTED_APIS`` (model-config stays
  open on purpose, see there). Its ``-H`` option would not help anyway: in 2.41 it adds headers to
  HTTP requests only ("ignored for GRPC requests", ``perf_analyzer --help``), and the embedded
  server has HTTP off.
* BYTES inputs in ``--input-data`` are given as ``{"b64": ...}`` of the *serialized* tensor (each
  element 4-byte little-endian length + bytes, ``tritonclient.utils.serialize_byte_tensor``): the
  decoded b64 is sent as the raw tensor content. ``validation_data`` must name every output of the
  model; with one left out 2.41 fails with "Output size doesn't match expected size".
* Validation at concurrency 1 only. There each request runs alone (batch 1, like the Python
  client's reference answers), so every output must match bit for bit. At higher levels Triton's
  dynamic batcher groups requests, and ONNX Runtime's batched results differ from batch-1 ones in
  the last bits (seen here: "Output doesn't match expected output" at concurrency 8), so there the
  checks are perf_analyzer failing on any error response and the server's failure count staying 0.
* Stability: ``perf_analyzer`` only reports a level once the last 3 windows agree within
  ``--stability`` percent. The default 10 % never settles on this loaded 2-core machine (seen
  here: window throughputs 95, 42, 37, 53 infer/s at concurrency 1), so the bench uses 50 % and
  up to ``--max-trials`` windows; a level that still does not settle is reported as unstable
  (and the bench exits 1), not dropped silently.
"""

from __future__ import annotations

import argparse
import base64
import csv
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as a script, this file's folder (bench/) is sys.path[0], where bench/serving.py would shadow
# the ``serving`` package: put the project root there instead.
ROOT = Path(__file__).resolve().parent.parent
if sys.path and sys.path[0] == str(ROOT / "bench"):  # not when imported (tests/test_perf_analyzer.py)
    sys.path[0] = str(ROOT)

import numpy as np  # noqa: E402

DEFAULT_TOOL = ROOT / ".venv-perf" / "perf_analyzer"  # written by bench/perf_tools.sh
TOOL_ENV = "FER_PERF_ANALYZER"  # or point this at another perf_analyzer (wrapper)
NETWORK = "ca_resnet"
ENSEMBLE = f"{NETWORK}_ensemble"
UNSTABLE = "Failed to obtain stable measurement"


@dataclass(frozen=True)
class Level:
    """One ``perf_analyzer`` (or Python bench) measurement of one model at one concurrency."""

    tool: str
    model: str
    concurrency: int
    ok: bool
    throughput: float = 0.0  # inferences per second
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    load_before: float = 0.0  # 1-minute load average when the level started
    load_after: float = 0.0
    error: str = ""


def find_perf_analyzer(explicit: str | None = None) -> Path | None:
    """``--perf-analyzer``, else ``$FER_PERF_ANALYZER``, else the wrapper bench/perf_tools.sh writes."""
    candidate = Path(explicit or os.environ.get(TOOL_ENV) or DEFAULT_TOOL)
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def _tensor_json(array: np.ndarray, datatype: str) -> dict:
    """One tensor of one request (no batch axis) in perf_analyzer's JSON data format."""
    from tritonclient.utils import serialize_byte_tensor

    if datatype == "BYTES":
        serialized = serialize_byte_tensor(np.asarray(array, dtype=object))
        # tritonclient >= 2.4x returns a 0-d object array holding the bytes, older ones a uint8 array.
        entry = _b64(serialized.item() if serialized.dtype == object else serialized.tobytes())
    else:
        entry = _b64(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
    return {**entry, "shape": list(array.shape)}


def infer_inputs(request: dict[str, np.ndarray], datatypes: dict[str, str]) -> list:
    """tritonclient gRPC inputs of one request (batch of 1) from per-item arrays."""
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, value in request.items():
        array = np.asarray(value, dtype=object if datatypes[name] == "BYTES" else None)[None]
        tensor = grpcclient.InferInput(name, list(array.shape), datatypes[name])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def input_data(url: str, model: str, requests: list[dict[str, np.ndarray]]) -> tuple[dict, dict]:
    """perf_analyzer's ``--input-data`` JSON for ``model``: one step per request (no batch axis);
    returned twice, the second time with ``validation_data``: every output the Python client got
    for each request from the server at ``url``."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        metadata = client.get_model_metadata(model, as_json=True)
        datatypes = {t["name"]: t["datatype"] for t in metadata["inputs"] + metadata["outputs"]}
        outputs = [t["name"] for t in metadata["outputs"]]
        data, validation = [], []
        for request in requests:
            tensors = infer_inputs(request, datatypes)
            result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
            data.append({name: _tensor_json(np.asarray(value), datatypes[name]) for name, value in request.items()})
            validation.append({n: _tensor_json(result.as_numpy(n)[0], datatypes[n]) for n in outputs})
    finally:
        client.close()
    return {"data": data}, {"data": data, "validation_data": validation}


def parse_csv(path: Path) -> tuple[float, float, float]:
    """(inferences/s, p50 ms, p99 ms) from a ``perf_analyzer -f`` report (latencies are in µs)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) != 1:
        raise ValueError(f"{path}: expected one measurement row, got {len(rows)}")
    row = rows[0]
    return float(row["Inferences/Second"]), float(row["p50 latency"]) / 1e3, float(row["p99 latency"]) / 1e3


def perf_analyzer_command(tool: Path, url: str, model: str, data_file: Path, concurrency: int, csv_file: Path,
                          window_ms: int, stability: int, max_trials: int) -> list[str]:
    return [str(tool), "-m", model, "-u", url, "-i", "grpc", "--input-data", str(data_file),
            "--concurrency-range", str(concurrency), "-p", str(window_ms), "-s", str(stability),
            "-r", str(max_trials), "-f", str(csv_file)]


def run_perf_analyzer(command: list[str], model: str, concurrency: int, csv_file: Path, timeout_s: float) -> Level:
    load_before = os.getloadavg()[0]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired:
        output, rc = f"timed out after {timeout_s:.0f}s", -1
    load_after = os.getloadavg()[0]
    common = dict(tool="perf_analyzer", model=model, concurrency=concurrency, load_before=load_before,
                  load_after=load_after)
    if rc != 0 or not csv_file.is_file():
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        reason = next((line for line in lines if UNSTABLE in line), lines[-1] if lines else f"exit {rc}")
        return Level(ok=False, error=f"exit {rc}: {reason}", **common)
    throughput, p50, p99 = parse_csv(csv_file)
    return Level(ok=True, throughput=throughput, p50_ms=p50, p99_ms=p99, **common)


def _python_bench():
    """bench/serving.py as a module (its thread runner is the Python bench's measurement loop)."""
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "bench" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    path = list(sys.path)
    spec.loader.exec_module(module)
    sys.path[:] = path  # it rewrites sys.path[0] as a script does; keep ours
    return module


def run_python_bench(url: str, model: str, requests: list[dict[str, np.ndarray]], datatypes: dict[str, str],
                     concurrency: int, seconds: float, max_requests: int) -> Level:
    import tritonclient.grpc as grpcclient

    bench = _python_bench()

    def worker(i: int):
        client = grpcclient.InferenceServerClient(url)
        tensors = infer_inputs(requests[i % len(requests)], datatypes)
        return lambda: client.infer(model, tensors)

    load_before = os.getloadavg()[0]
    result = bench._run_threads(concurrency, worker, seconds, max_requests)
    return Level(tool="Python bench", model=model, concurrency=concurrency, ok=result["requests"] > 0,
                 throughput=result["throughput"], p50_ms=result["p50"], p99_ms=result["p99"],
                 load_before=load_before, load_after=os.getloadavg()[0])


def build_repository(root: Path, faces: int, face: str):
    """A repository with a random-weight quick ``ca_resnet`` (version 1) and its ensemble; the
    requests for both models (preprocessed tensors / encoded PNGs of the same SynthFACS faces)."""
    import torch

    from fer_core.data.preprocess import HaarFaceDetector
    from fer_core.data.synthfacs import SynthFACS
    from fer_core.models import create_model
    from fer_core.models.catalog import get_network
    from serving.client import encode_image
    from serving.ensembles.processing import prepare_image
    from serving.export import export_onnx
    from serving.repository import ModelRepository

    torch.manual_seed(0)
    kwargs = dict(get_network(NETWORK).recipe("quick").model_kwargs)
    model = create_model(NETWORK, **kwargs).eval()
    onnx_path = export_onnx(model, root / f"{NETWORK}.onnx")
    repo = ModelRepository(root / "models", face_detection=face)
    repo.install(NETWORK, 1, onnx_path, max_batch_size=64)
    images = SynthFACS(0, image_size=96).expression_set(faces).images
    detector = HaarFaceDetector() if face == "haar" else None
    input_name = model.metadata.input.name
    network_requests = [{input_name: prepare_image(f, model.metadata, detector).tensor.astype(np.float32)}
                        for f in images]
    ensemble_requests = [{"IMAGE": np.array([encode_image(f)], dtype=object)} for f in images]
    return repo, kwargs, {NETWORK: network_requests, ENSEMBLE: ensemble_requests}


def format_table(levels: list[Level]) -> str:
    lines = [f"{'tool':14s} {'model':20s} {'conc':>4s} {'infer/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} "
             f"{'load 1m':>11s}  note"]
    for r in levels:
        figures = (f"{r.throughput:9.1f} {r.p50_ms:8.2f} {r.p99_ms:8.2f}" if r.ok else f"{'-':>9s} {'-':>8s} {'-':>8s}")
        lines.append(f"{r.tool:14s} {r.model:20s} {r.concurrency:4d} {figures} "
                     f"{r.load_before:5.1f}>{r.load_after:<5.1f}  {r.error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--perf-analyzer", help=f"the binary or wrapper (default: ${TOOL_ENV}, else {DEFAULT_TOOL})")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--models", nargs="+", choices=[NETWORK, ENSEMBLE], default=[NETWORK, ENSEMBLE])
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer's measurement window (-p)")
    parser.add_argument("--stability", type=int, default=50, help="perf_analyzer's -s, in percent (see docstring)")
    parser.add_argument("--max-trials", type=int, default=10, help="perf_analyzer's -r: windows before giving up")
    parser.add_argument("--faces", type=int, default=8, help="distinct faces the requests cycle through")
    parser.add_argument("--face", choices=["off", "haar"], default="off",
                        help="the ensemble's face handling: off = requests are face crops (like training)")
    parser.add_argument("--python-bench", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure with the Python bench's client loop (bench/serving.py)")
    parser.add_argument("--python-seconds", type=float, default=3.0, help="Python bench time budget per level")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)

    tool = find_perf_analyzer(args.perf_analyzer)
    if tool is None:
        looked_at = args.perf_analyzer or os.environ.get(TOOL_ENV) or DEFAULT_TOOL
        print(f"error: perf_analyzer not found (looked at {looked_at}); run bench/perf_tools.sh "
              "(make perf-tools) first", file=sys.stderr)
        return 2
    probe = subprocess.run([str(tool), "--version"], capture_output=True, text=True)
    lines = (probe.stdout + probe.stderr).strip().splitlines()
    if probe.returncode != 0 or not lines:
        print(f"error: {tool} does not run: {lines[-1] if lines else f'exit {probe.returncode}'}", file=sys.stderr)
        return 2
    version = lines[0]  # "Perf Analyzer Version 2.41.0 (commit ...)"

    import tritonclient.grpc as grpcclient

    from serving.server import EmbeddedTriton

    levels: list[Level] = []
    commands: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fer-perf-") as tmp:
        root = Path(tmp)
        repo, kwargs, requests = build_repository(root, args.faces, args.face)
        started = time.perf_counter()
        with EmbeddedTriton(repo, root / "workspace", models=repo.load_order()) as server:
            print(f"{version}; tritonserver (embedded) ready in "
                  f"{time.perf_counter() - started:.1f}s at {server.grpc_url}; {NETWORK} quick {kwargs}, "
                  f"face handling {args.face!r}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            for model in args.models:
                plain, validated = input_data(server.grpc_url, model, requests[model])
                data_files = {False: root / f"{model}.json", True: root / f"{model}-validated.json"}
                data_files[False].write_text(json.dumps(plain))
                data_files[True].write_text(json.dumps(validated))
                meta = grpcclient.InferenceServerClient(server.grpc_url).get_model_metadata(model, as_json=True)
                datatypes = {t["name"]: t["datatype"] for t in meta["inputs"] + meta["outputs"]}
                for concurrency in args.concurrency:
                    csv_file = root / f"{model}-{concurrency}.csv"
                    data_file = data_files[concurrency == 1]
                    command = perf_analyzer_command(tool, server.grpc_url, model, data_file, concurrency, csv_file,
                                                    args.window_ms, args.stability, args.max_trials)
                    commands[model] = " ".join(Path(c).name if c in (str(tool),) else c for c in command)
                    timeout = (args.max_trials + 2) * args.window_ms / 1e3 * 3 + 60
                    levels.append(run_perf_analyzer(command, model, concurrency, csv_file, timeout))
                    print(format_table(levels[-1:]).splitlines()[1], flush=True)
                    if args.python_bench:
                        levels.append(run_python_bench(server.grpc_url, model, requests[model], datatypes, concurrency,
                                                       args.python_seconds, max_requests=100_000))
                        print(format_table(levels[-1:]).splitlines()[1], flush=True)
            client = grpcclient.InferenceServerClient(server.grpc_url)
            served = {m: client.get_inference_statistics(m, as_json=True)["model_stats"][0]["inference_stats"]
                      for m in args.models}
    # Requests the server answered / failed per model over the whole run (both tools, reference calls).
    answered = {m: int(s.get("success", {}).get("count", 0)) for m, s in served.items()}
    failed = {m: int(s.get("fail", {}).get("count", 0)) for m, s in served.items()}

    print()
    print(format_table(levels))
    print()
    for model in args.models:
        steps = " (the ensemble's network steps included)" if model == NETWORK and ENSEMBLE in args.models else ""
        print(f"{model}: {answered[model]} requests answered by the server{steps}, {failed[model]} failed")
    for model, command in commands.items():
        print(f"command ({model}, last level): {command}")
    print("measured on a shared machine (other jobs running): see the load average beside each level")
    if args.json:
        args.json.write_text(json.dumps({"levels": [asdict(r) for r in levels], "answered": answered,
                                         "failed": failed, "commands": commands,
                                         "perf_analyzer": version}, indent=1))
    return 0 if all(r.ok for r in levels) and not any(failed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
