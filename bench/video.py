"""Benchmark: ``fer annotate``'s pipeline on a generated 640x480 video, locally and through Triton.

    .venv/bin/python bench/video.py [--seconds 600] [--faces 1 4] [--url grpc://HOST:8001 | --embedded-triton]
                                    [--model FILE.onnx] [--json OUT.json]

For each face count (a SynthFACS video at 30 FPS, ``--seconds`` long, generated once into a temporary
folder) and each path -- ONNX Runtime in-process, and Triton when ``--url`` names a server serving
``--network`` (or ``--embedded-triton`` starts one on the same model) -- it runs what ``fer annotate``
runs: decode, detect, track, crop, recognise (batched, ``--in-flight`` requests at once), draw, encode
the MP4 and write the CSV table. Two modes (``--modes``):

* ``throughput``: the file is read as fast as the pipeline takes it (``fer annotate`` on a file);
  frames per second = frames / wall time. Latency here is mostly time spent waiting in the
  pipeline's queues, so it is reported but not the number to quote.
* ``realtime``: frames are handed over at the video's 30 FPS, as a camera delivers them; latency per
  frame (frame available -> annotations ready) p50/p95 is what a live viewer waits, and FPS below 30
  means the pipeline cannot keep up (frames then queue and latency grows).

Resident memory is sampled every ``--sample-s`` seconds over each run: this process's RSS and, for
the embedded Triton, the server's process tree. "Flat" is read from the slope of a line fitted to
the samples after the first tenth of the run (warm-up: ONNX Runtime arenas, codec buffers).

Without ``--model`` the network is a random-weight ``ca_resnet`` of the ``quick`` recipe (the weights
do not change the cost). ``os.getloadavg()`` is printed beside every run: on a shared CPU the numbers
are upper bounds on the time the pipeline needs, say so when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and bench/serving.py would shadow the
# ``serving`` package: put the project root there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from fer_core.video.output import AnnotatedVideoWriter, FexTableWriter  # noqa: E402
from fer_core.video.overlay import draw_faces  # noqa: E402
from fer_core.video.pipeline import FrameProcessor, PipelineConfig, annotate_stream  # noqa: E402
from fer_core.video.source import VideoSource  # noqa: E402
from fer_core.video.synthetic import write_synthfacs_video  # noqa: E402

FPS = 30.0
SIZE = (640, 480)


@dataclass
class RunResult:
    path: str
    mode: str
    faces: int
    frames: int
    faces_seen: int
    seconds: float
    fps: float
    p50_ms: float
    p95_ms: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    rss_mib: dict[str, dict] = field(default_factory=dict)  # process -> start/peak/end/slope/series (s, MiB)


class RssSampler:
    """RSS of named process trees, sampled on a thread every ``period_s`` seconds."""

    def __init__(self, pids: dict[str, int], period_s: float) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.period_s = period_s
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @staticmethod
    def _tree_mib(proc: psutil.Process) -> float:
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:  # a child that ended between the listing and the read
                pass
        return total / 2**20

    def _run(self) -> None:
        start = time.monotonic()
        while True:
            now = time.monotonic() - start
            for name, proc in self.procs.items():
                self.samples[name].append((now, self._tree_mib(proc)))
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for name, proc in self.procs.items():  # one last sample at the very end
            self.samples[name].append((self.samples[name][-1][0] + 1e-3, self._tree_mib(proc)))

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, samples in self.samples.items():
            t = np.array([s[0] for s in samples])
            mib = np.array([s[1] for s in samples])
            steady = t >= 0.1 * t[-1]
            slope = float(np.polyfit(t[steady], mib[steady], 1)[0]) * 60 if steady.sum() >= 3 else float("nan")
            out[name] = {"start": float(mib[steady][0]), "peak": float(mib.max()), "end": float(mib[-1]),
                         "slope_mib_per_min": slope, "samples": int(len(samples)),
                         "series": [(round(x, 1), round(y, 1)) for x, y in samples]}
        return out


def _load() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]


def _paced(source: VideoSource):
    """The frames of ``source`` handed over at its own frame rate, as a camera would."""
    start = time.monotonic()
    for frame in source:
        delay = frame.time_s - (time.monotonic() - start)
        if delay > 0:
            time.sleep(delay)
        yield frame


def run_once(video: Path, recognizer, config: PipelineConfig, work: Path, path_name: str, mode: str, faces: int,
             pids: dict[str, int], sample_s: float) -> RunResult:
    """``fer annotate``'s work on ``video`` (the same calls as fer_cli.app._annotate), timed."""
    load_before = _load()
    source = VideoSource(str(video))
    out = work / f"{path_name.split()[0].lower()}-{mode}-{faces}.mp4"
    writer = AnnotatedVideoWriter(out, source.fps, (source.width, source.height))
    table = FexTableWriter(out.with_suffix(".csv"), recognizer.layout(), str(video))

    def on_frame(frame, annotations) -> None:
        writer.write(draw_faces(frame.pixels, annotations))
        table.write_frame(frame.index, frame.time_s, annotations)

    processor = FrameProcessor(recognizer, config=config)
    try:
        with RssSampler(pids, sample_s) as sampler:
            stats = annotate_stream(_paced(source) if mode == "realtime" else source, processor, on_frame)
        writer.commit()
        table.commit()
    finally:
        source.close()
    for produced in (out, out.with_suffix(".csv")):
        produced.unlink(missing_ok=True)  # a 10-minute run's output is not kept
    return RunResult(path_name, mode, faces, stats.frames, stats.faces, stats.seconds, stats.fps, stats.latency_ms(50),
                     stats.latency_ms(95), load_before, _load(), sampler.summary())


def _default_model(folder: Path) -> Path:
    import torch

    from fer_core.models import create_model
    from fer_core.training.tasks import get_recipe
    from serving.export import export_onnx

    torch.manual_seed(0)
    model = create_model("ca_resnet", **get_recipe("ca_resnet", "quick").model_kwargs).eval()
    return export_onnx(model, folder / "ca_resnet.onnx")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="video length (default 600: the 10-minute run)")
    parser.add_argument("--faces", type=int, nargs="+", default=[1, 4], choices=(1, 2, 4))
    parser.add_argument("--modes", nargs="+", default=["throughput", "realtime"], choices=("throughput", "realtime"))
    parser.add_argument("--model", type=Path, default=None, help="ONNX file (default: a random quick ca_resnet)")
    parser.add_argument("--network", default="ca_resnet", help="the served network to ask with --url")
    parser.add_argument("--url", default=None, help="a Triton serving --network (grpc://HOST:PORT)")
    parser.add_argument("--embedded-triton", action="store_true",
                        help="start the embedded tritonserver on the same model and measure through it too")
    parser.add_argument("--local", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the in-process ONNX Runtime path (default on)")
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling period")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.url and args.embedded_triton:
        parser.error("--url and --embedded-triton are alternatives")

    from serving.recognizers import OnnxRecognizer, TritonRecognizer

    config = PipelineConfig(batch_size=args.batch_size, in_flight=args.in_flight)
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="fer-bench-video-") as tmp:
        tmp = Path(tmp)
        model = args.model or _default_model(tmp)
        videos = {}
        for faces in args.faces:
            start = time.perf_counter()
            videos[faces] = tmp / f"faces-{faces}.mp4"
            write_synthfacs_video(videos[faces], num_faces=faces, seconds=args.seconds, fps=FPS, size=SIZE)
            print(f"generated {args.seconds:.0f} s of {SIZE[0]}x{SIZE[1]} video with {faces} face(s) "
                  f"in {time.perf_counter() - start:.1f}s", flush=True)
        server = None
        paths = []
        if args.local:
            paths.append(("ONNX Runtime in-process", lambda: OnnxRecognizer(model), {}))
        if args.embedded_triton:
            from serving.repository import ModelRepository
            from serving.server import EmbeddedTriton

            repo = ModelRepository(tmp / "models")
            repo.install(args.network, 1, model)
            server = EmbeddedTriton(repo, tmp / "triton", models=repo.load_order()).start()
            url = server.grpc_url
        else:
            url = args.url
        try:
            if url:
                triton_pids = {"tritonserver": server.process.pid} if server is not None else {}
                paths.append((f"Triton gRPC {url}", lambda: TritonRecognizer(url, args.network,
                                                                             batch_size=args.batch_size), triton_pids))
            for name, make, extra_pids in paths:
                for mode in args.modes:
                    for faces in args.faces:
                        recognizer = make()
                        try:
                            result = run_once(videos[faces], recognizer, config, tmp, name, mode, faces,
                                              {"bench": os.getpid(), **extra_pids}, args.sample_s)
                        finally:
                            recognizer.close()
                        results.append(result)
                        _print(result)
        finally:
            if server is not None:
                server.stop()
    print(f"\n{'path':30s} {'mode':10s} {'faces':>5s} {'frames':>6s} {'FPS':>7s} {'p50 ms':>7s} {'p95 ms':>7s}  "
          f"{'RSS MiB start/peak/end (slope MiB/min)':40s} load 1/5/15 min")
    for r in results:
        rss = "; ".join(f"{k} {v['start']:.0f}/{v['peak']:.0f}/{v['end']:.0f} ({v['slope_mib_per_min']:+.1f})"
                        for k, v in r.rss_mib.items())
        print(f"{r.path[:30]:30s} {r.mode:10s} {r.faces:5d} {r.frames:6d} {r.fps:7.1f} {r.p50_ms:7.1f} {r.p95_ms:7.1f}  "
              f"{rss:40s} {' '.join(f'{x:.2f}' for x in r.load_after)}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "size": SIZE, "fps_of_video": FPS,
                                         "results": [asdict(r) for r in results]}, indent=2))
    return 0


def _print(r: RunResult) -> None:
    print(f"{r.path}, {r.mode}, {r.faces} face(s): {r.frames} frames ({r.faces_seen} faces) in {r.seconds:.1f}s = {r.fps:.1f} FPS, "
          f"latency p50 {r.p50_ms:.0f} ms p95 {r.p95_ms:.0f} ms; load {r.load_before} -> {r.load_after}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
