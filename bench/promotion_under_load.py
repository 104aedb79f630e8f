"""Serving during a champion swap: steady load through the ensemble while the champion is promoted
to a new version and rolled back; every answer must come from exactly the old or the new version.

The Triton side of a promotion is what :func:`registry.promotion.promote` does after its registry
gates: the new version is installed beside the champion and loaded, the ensemble is re-pinned
(:meth:`ModelRepository.set_champion`), the old version is retired; a rollback is the same in
reverse. Two tiny ``ca_resnet`` versions with different random weights make every answer
attributable: each response's probabilities are compared with each version's PyTorch output.

    python bench/promotion_under_load.py --seconds 20 --rate 40

Reports requests, failures, unattributable ("half-loaded") answers, answers per version, and
latency p50/p99 overall and inside the swap windows. Loopback only; bounded in count and time.
:class:`LoadGenerator` is reused by ``tests/test_reliability_serving.py`` and ``bench/triton_recovery.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.client import FERClient, ServingError  # noqa: E402

NETWORK = "ca_resnet"
TINY_KWARGS = {"width": 4}


@dataclass
class Answer:
    """One request: when it was sent (seconds since the load started), how long it took, and either
    the versions whose reference it matched or the one-line error."""

    sent_s: float
    latency_ms: float
    versions: tuple[int, ...] = ()
    error: str = ""


@dataclass
class LoadReport:
    answers: list[Answer] = field(default_factory=list)

    @property
    def errors(self) -> list[Answer]:
        return [a for a in self.answers if a.error]

    @property
    def unattributed(self) -> list[Answer]:
        """Answers that match no version or several: what a half-loaded model would give."""
        return [a for a in self.answers if not a.error and len(a.versions) != 1]

    def per_version(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for a in self.answers:
            if not a.error and len(a.versions) == 1:
                counts[a.versions[0]] = counts.get(a.versions[0], 0) + 1
        return counts

    def latency(self, windows: Sequence[tuple[float, float]] = ()) -> dict[str, float]:
        """p50/p99/max latency (ms) of the answered requests, restricted to ``windows`` if given."""
        times = [a.latency_ms for a in self.answers if not a.error
                 and (not windows or any(lo <= a.sent_s <= hi for lo, hi in windows))]
        if not times:
            return {"count": 0}
        return {"count": len(times), "p50_ms": float(np.percentile(times, 50)),
                "p99_ms": float(np.percentile(times, 99)), "max_ms": float(max(times))}

    def summary(self, windows: Sequence[tuple[float, float]] = ()) -> dict[str, object]:
        return {"requests": len(self.answers), "errors": len(self.errors), "unattributed": len(self.unattributed),
                "per_version": self.per_version(), "latency_all": self.latency(),
                "latency_during_swaps": self.latency(windows) if windows else None,
                "first_errors": [a.error for a in self.errors[:3]]}


class LoadGenerator:
    """Sends one image per request at ``rate_hz`` from a background thread, until :meth:`stop`,
    ``max_requests`` or ``max_seconds``. ``references[version]`` holds the probabilities each
    version must answer for ``images[i]`` (rows in the order of ``labels``)."""

    def __init__(self, url: str, images: Sequence[bytes], references: Mapping[int, np.ndarray],
                 labels: Sequence[str], *, network: str = NETWORK, rate_hz: float = 20.0,
                 max_requests: int = 2000, max_seconds: float = 120.0, atol: float = 1e-4) -> None:
        if rate_hz <= 0 or max_requests < 1 or max_seconds <= 0:
            raise ValueError("rate_hz and max_seconds must be > 0 and max_requests >= 1")
        self.url, self.images, self.network = url, list(images), network
        self.references, self.labels, self.atol = dict(references), list(labels), atol
        self.rate_hz, self.max_requests, self.max_seconds = rate_hz, max_requests, max_seconds
        self.report = LoadReport()
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-generator", daemon=True)

    def now(self) -> float:
        """Seconds since the load started (the clock of :attr:`Answer.sent_s`)."""
        return time.perf_counter() - self.started

    def start(self) -> "LoadGenerator":
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> LoadReport:
        self._stop.set()
        self._thread.join(self.max_seconds + 60)
        return self.report

    def _match(self, probabilities: Mapping[str, float], index: int) -> tuple[int, ...]:
        got = np.array([probabilities[name] for name in self.labels])
        return tuple(v for v, ref in self.references.items() if np.abs(got - ref[index]).max() <= self.atol)

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        client = FERClient(self.url)
        try:
            for k in range(self.max_requests):
                due = self.started + k * period
                if self._stop.wait(max(0.0, due - time.perf_counter())) or self.now() > self.max_seconds:
                    return
                index = k % len(self.images)
                sent = self.now()
                try:
                    (prediction,) = client.predict([self.images[index]], network=self.network)
                    answer = Answer(sent, (self.now() - sent) * 1e3, self._match(prediction.probabilities, index))
                except ServingError as exc:
                    answer = Answer(sent, (self.now() - sent) * 1e3, error=str(exc))
                    client.close()
                    client = FERClient(self.url)  # a fresh channel after a failure (e.g. a restarted server)
                self.report.answers.append(answer)
        finally:
            client.close()


# -- the benchmark's two-version platform ---------------------------------------------------------

def tiny_versions(seeds: Sequence[int] = (1, 2)) -> dict[int, "object"]:
    """Version number → a tiny eval-mode ``ca_resnet`` with seed-dependent weights and BN statistics."""
    import torch
    from torch import nn

    from fer_core.models import create_model

    models = {}
    for version, seed in enumerate(seeds, start=1):
        torch.manual_seed(seed)
        model = create_model(NETWORK, **TINY_KWARGS)
        g = torch.Generator().manual_seed(seed)
        for m in model.modules():  # spread-out outputs, so the versions are told apart
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
        models[version] = model.eval()
    return models


def reference_probabilities(model, encoded: Sequence[bytes]) -> np.ndarray:
    """What the ensemble must answer with ``model`` as champion: the same pre-processing, PyTorch, softmax."""
    import torch

    from serving.ensembles import processing

    # The repository's default pre-processing (face detection off): requests are face crops.
    prepared = [processing.prepare([data], model.metadata, None) for data in encoded]
    with torch.no_grad():
        logits = model(torch.from_numpy(np.stack([p.tensor for p in prepared]))).numpy()
    return processing.postprocess({"logits": logits}, model.metadata,
                                  np.stack([p.to_input for p in prepared]))["PROBABILITIES"]


def test_images(count: int = 6) -> list[bytes]:
    from fer_core.data.synthfacs import SynthFACS
    from serving.client import encode_image

    return [encode_image(face) for face in SynthFACS(0, image_size=96).expression_set(count).images]


def swap(repository, endpoint, old: int, new: int) -> None:
    """The Triton side of a promotion (or rollback) from ``old`` to ``new`` (both on disk)."""
    repository.set_served_versions(NETWORK, [old, new])
    endpoint.load(NETWORK)  # new loads beside old; old keeps answering through the ensemble
    repository.set_champion(NETWORK, new, endpoint)
    repository.set_served_versions(NETWORK, [new])
    endpoint.load(NETWORK)  # old is unloaded


def build_platform(root: Path):
    """(server, repository, models, images, references): v1 champion, v2 on disk, Triton started."""
    from serving.export import export_onnx
    from serving.repository import ModelRepository
    from serving.server import EmbeddedTriton

    models = tiny_versions()
    repository = ModelRepository(root / "models")
    for version, model in models.items():
        onnx = export_onnx(model, root / "onnx" / f"v{version}.onnx")
        if version == 1:
            repository.install(NETWORK, 1, onnx)
        else:
            repository.write_model(NETWORK, version, onnx, keep_versions=[1])
    repository.set_served_versions(NETWORK, [1])
    server = EmbeddedTriton(repository, root / "triton", models=repository.load_order()).start()
    images = test_images()
    references = {v: reference_probabilities(m, images) for v, m in models.items()}
    return server, repository, models, images, references


def run(seconds: float, rate_hz: float, swaps: int) -> dict[str, object]:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        server, repository, models, images, references = build_platform(Path(tmp))
        try:
            labels = list(models[1].metadata.label_names)
            endpoint = server.endpoint()
            load = LoadGenerator(server.grpc_url, images, references, labels, rate_hz=rate_hz,
                                 max_requests=int(seconds * rate_hz) + 10, max_seconds=seconds + 60).start()
            windows, durations = [], []
            pause = seconds / (2 * swaps + 1)
            champion = 1
            for _ in range(2 * swaps):  # promote 1 -> 2, roll back 2 -> 1, ...
                time.sleep(pause)
                new = 2 if champion == 1 else 1
                begin = load.now()
                swap(repository, endpoint, champion, new)
                windows.append((begin, load.now()))
                durations.append(windows[-1][1] - begin)
                champion = new
            time.sleep(pause)
            report = load.stop()
        finally:
            server.stop()
    return {"seconds": seconds, "rate_hz": rate_hz, "swaps": len(windows), "swap_seconds": durations,
            **report.summary(windows)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration (default 20)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second (default 40)")
    parser.add_argument("--swaps", type=int, default=2, help="promote+rollback pairs (default 2)")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.rate, args.swaps)
    print(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 and result["unattributed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
