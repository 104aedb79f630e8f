"""Serving performance settings: instances, ONNX Runtime threads and dynamic batching per machine.

What is tuned for one CPU is a setting, so one model repository stays portable: every value has an
environment variable, and its default is derived from ``os.cpu_count()`` and the networks'
``instance_group`` kind (``KIND_CPU`` here; ``KIND_GPU`` on NVIDIA's container gets its own).

==================================  ==========================  =====================================
variable                            ``KIND_CPU`` default        ``KIND_GPU`` default
==================================  ==========================  =====================================
``FER_TRITON_INSTANCES``            cores (1..4)                2 (per GPU: copies overlap compute)
``FER_TRITON_INTRA_OP_THREADS``     1                           1
``FER_TRITON_INTER_OP_THREADS``     1                           1
``FER_TRITON_ALLOW_SPINNING``       0                           0
``FER_TRITON_QUEUE_DELAY_US``       0                           ``auto``
``FER_TRITON_PREFERRED_BATCH``      (none)                      8,16,32
``FER_TRITON_PREPROCESS_INSTANCES`` cores (1..4)                cores (1..4)
``FER_TRITON_POSTPROCESS_INSTANCES`` 1                          1
``FER_TRITON_ENSEMBLE``             ``fused``                   ``steps``
==================================  ==========================  =====================================

Why these defaults (measured with ``bench/serving.py`` on the 2-core machine this was built on):

* One ONNX Runtime thread per instance and one instance per core. ORT's default (a pool of one
  thread per core whose threads spin while waiting) fights the Python-backend stubs, Triton's own
  threads and the clients for the same cores; with two stubs, one can compute while the other
  marshals its batch.
* ``max_queue_delay_microseconds`` is 0 on CPU, *measured*: Triton's batcher waits the full delay
  even for a lone request, so at concurrency 1 every request paid it (0.64 ms of a 2.2 ms round trip
  at a derived 522 us), and on 2 cores a wait never paid back: in back-to-back ``bench/serving.py``
  runs delay 0 beat the derived delay at every level (network 558/1467/1821 vs 436/835/1038 req/s
  at concurrency 1/8/32, ensemble 262/748/882 vs 227/566/464). With no delay, batches still form
  from what queued while both instances were busy (2.2 samples per execution at 8, 5.7 at 32).
  ``auto`` (the ``KIND_GPU`` default, or ``FER_TRITON_QUEUE_DELAY_US=auto``) times the network
  (ONNX Runtime, batch 1, the configured threads) when its version is installed and waits about
  one such execution (:func:`queue_delay_from_latency`): where a batch of 8 costs about one of 1.
* The ensemble's layout: ``fused`` on CPU, one Python-backend model ``<net>_pipeline`` that decodes,
  pre-processes, runs ONNX Runtime and post-processes a whole dynamic batch in one execute (one
  stub crossing per batch); ``steps`` on GPU, ``<net>_preprocess`` -> the network on its own
  backend (NVIDIA's native ``onnxruntime`` on the GPU there) -> ``<net>_postprocess``. On 2 shared
  cores every stub crossing costs CPU the pipeline needs (three identity steps chained cost
  0.9-1.1 ms per request, as much as two thirds of the whole pipeline's work in-process); on a GPU
  the network step belongs on the GPU's backend, not in a CPU stub.
* No preferred batch sizes on CPU: there a batch of any size costs about its samples' time, so
  cutting a batch at a preferred size buys nothing; on a GPU a batch of 8..32 costs about one of 1.

``auto`` falls back to :data:`FALLBACK_QUEUE_DELAY_US` when the input has dynamic dimensions (a
clip's frame count) and the network cannot be timed on a made-up input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from fer_core.errors import UsageError

__all__ = ["ServingTuning", "ENSEMBLE_LAYOUTS", "queue_delay_from_latency", "measure_latency", "FALLBACK_QUEUE_DELAY_US", "ENV"]

FALLBACK_QUEUE_DELAY_US = 500
# The derived delay stays within these bounds: below ~50 us Triton's batcher hardly waits at all,
# and above 5 ms a single client's latency is dominated by the wait.
MIN_QUEUE_DELAY_US, MAX_QUEUE_DELAY_US = 50, 5000
MAX_DEFAULT_INSTANCES = 4

ENV = {
    "instances": "FER_TRITON_INSTANCES",
    "intra_op_threads": "FER_TRITON_INTRA_OP_THREADS",
    "inter_op_threads": "FER_TRITON_INTER_OP_THREADS",
    "allow_spinning": "FER_TRITON_ALLOW_SPINNING",
    "max_queue_delay_us": "FER_TRITON_QUEUE_DELAY_US",
    "preferred_batch_sizes": "FER_TRITON_PREFERRED_BATCH",
    "preprocess_instances": "FER_TRITON_PREPROCESS_INSTANCES",
    "postprocess_instances": "FER_TRITON_POSTPROCESS_INSTANCES",
    "ensemble_layout": "FER_TRITON_ENSEMBLE",
}
ENSEMBLE_LAYOUTS = ("fused", "steps")


def queue_delay_from_latency(latency_s: float) -> int:
    """Dynamic batching's ``max_queue_delay_microseconds`` for a network whose batch-1 execution
    takes ``latency_s``: about one execution, within [MIN_QUEUE_DELAY_US, MAX_QUEUE_DELAY_US]."""
    if not latency_s > 0:
        return FALLBACK_QUEUE_DELAY_US
    return int(min(MAX_QUEUE_DELAY_US, max(MIN_QUEUE_DELAY_US, round(latency_s * 1e6))))


def _int(env: Mapping[str, str], field: str, minimum: int) -> int | None:
    raw = env.get(ENV[field], "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{ENV[field]} must be an integer >= {minimum}, got {raw!r}") from None
    if value < minimum:
        raise UsageError(f"{ENV[field]} must be an integer >= {minimum}, got {raw!r}")
    return value


@dataclass(frozen=True)
class ServingTuning:
    """Per-machine serving performance settings; build with :meth:`load` (environment over defaults)."""

    instances: int
    """Instances of each network (``instance_group`` count)."""
    intra_op_threads: int
    """ONNX Runtime intra-op threads per instance (0 = ORT's choice: one per core)."""
    inter_op_threads: int
    """ONNX Runtime inter-op threads per instance."""
    allow_spinning: bool
    """Whether ORT's pool threads spin while waiting (``session.intra_op.allow_spinning``)."""
    max_queue_delay_us: int | None
    """Dynamic batching's queue delay; ``None`` = derived from the network's measured latency."""
    preferred_batch_sizes: tuple[int, ...]
    """Dynamic batching's preferred sizes (empty: none)."""
    preprocess_instances: int
    """Instances of the ensembles' pre-processing (decoding is the ensemble's heaviest step)."""
    postprocess_instances: int
    """Instances of the ensembles' post-processing (cheap: one is enough)."""
    ensemble_layout: str = "steps"
    """``fused`` (one ``<net>_pipeline`` model: decode -> ORT -> label in one execute) or ``steps``
    (``<net>_preprocess`` -> network -> ``<net>_postprocess``); see the module docstring."""

    def __post_init__(self) -> None:
        for name in ("instances", "preprocess_instances", "postprocess_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_queue_delay_us is not None and self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.ensemble_layout not in ENSEMBLE_LAYOUTS:
            raise ValueError(f"ensemble_layout must be one of {ENSEMBLE_LAYOUTS}, got {self.ensemble_layout!r}")
        if any(size < 1 for size in self.preferred_batch_sizes):
            raise ValueError(f"preferred batch sizes must be >= 1, got {list(self.preferred_batch_sizes)}")

    @classmethod
    def defaults(cls, instance_kind: str = "KIND_CPU", cpu_count: int | None = None) -> "ServingTuning":
        """The defaults for ``instance_kind`` on a machine of ``cpu_count`` cores (see the module table)."""
        cores = max(1, min(MAX_DEFAULT_INSTANCES, cpu_count or os.cpu_count() or 1))
        gpu = instance_kind == "KIND_GPU"
        return cls(instances=2 if gpu else cores, intra_op_threads=1, inter_op_threads=1, allow_spinning=False,
                   max_queue_delay_us=None if gpu else 0, preferred_batch_sizes=(8, 16, 32) if gpu else (),
                   preprocess_instances=cores, postprocess_instances=1,
                   ensemble_layout="steps" if gpu else "fused")

    @classmethod
    def load(cls, instance_kind: str = "KIND_CPU", env: Mapping[str, str] | None = None,
             cpu_count: int | None = None) -> "ServingTuning":
        """The ``FER_TRITON_*`` variables of ``env`` over :meth:`defaults`. Entry points pass
        ``Settings.serving_tuning`` (the platform context); ``None`` reads ``os.environ``.

        A malformed value raises :class:`fer_core.errors.UsageError` (a ``ValueError``; the CLI
        prints it as one line, exit 2) naming the variable.
        """
        env = os.environ if env is None else env
        base = cls.defaults(instance_kind, cpu_count)
        values: dict[str, object] = {}
        for name in ("instances", "preprocess_instances", "postprocess_instances"):
            values[name] = _int(env, name, 1)
        for name in ("intra_op_threads", "inter_op_threads"):
            values[name] = _int(env, name, 0)
        spinning = env.get(ENV["allow_spinning"], "").strip().lower()
        if spinning:
            if spinning not in ("0", "1", "true", "false", "yes", "no"):
                raise UsageError(f"{ENV['allow_spinning']} must be 0 or 1, got {spinning!r}")
            values["allow_spinning"] = spinning in ("1", "true", "yes")
        delay = env.get(ENV["max_queue_delay_us"], "").strip().lower()
        if delay == "auto":
            base = cls(**{**base.__dict__, "max_queue_delay_us": None})
        elif delay:
            values["max_queue_delay_us"] = _int(env, "max_queue_delay_us", 0)
        preferred = env.get(ENV["preferred_batch_sizes"], "").strip()
        if preferred:
            try:
                sizes = tuple(int(p) for p in preferred.replace(" ", "").split(",") if p)
            except ValueError:
                raise UsageError(f"{ENV['preferred_batch_sizes']} must be comma-separated integers, "
                                 f"got {preferred!r}") from None
            if any(s < 1 for s in sizes):
                raise UsageError(f"{ENV['preferred_batch_sizes']} must hold sizes >= 1, got {preferred!r}")
            values["preferred_batch_sizes"] = sizes
        layout = env.get(ENV["ensemble_layout"], "").strip().lower()
        if layout:
            if layout not in ENSEMBLE_LAYOUTS:
                raise UsageError(f"{ENV['ensemble_layout']} must be one of {', '.join(ENSEMBLE_LAYOUTS)}, got {layout!r}")
            values["ensemble_layout"] = layout
        values = {k: v for k, v in values.items() if v is not None}
        return cls(**{**base.__dict__, **values})  # type: ignore[arg-type]

    def preferred_for(self, max_batch_size: int) -> tuple[int, ...]:
        """The preferred sizes Triton accepts for ``max_batch_size`` (none above it)."""
        return tuple(sorted({s for s in self.preferred_batch_sizes if s <= max_batch_size}))


def measure_latency(onnx_path: str, input_specs: list[tuple[str, str, tuple[int, ...]]], *,
                    intra_op_threads: int = 1, inter_op_threads: int = 1, runs: int = 20,
                    budget_s: float = 1.0) -> float | None:
    """Seconds of the fastest of ``runs`` batch-1 ONNX Runtime runs of ``onnx_path`` on zeros, with
    the threads it will be served with; ``None`` when an input has a dynamic dimension (nothing to
    make up). The fastest, not the median: on a shared CPU the median measures the load (seen here:
    1.6 ms median at load 4 for a network that runs in 0.35 ms).

    ``input_specs`` are (name, numpy dtype name, per-sample shape). Bounded by ``runs`` and ``budget_s``.
    """
    import time

    import numpy as np
    import onnxruntime as ort

    if any(int(d) < 1 for _, _, shape in input_specs for d in shape):
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = intra_op_threads, inter_op_threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    feed = {name: np.zeros((1, *shape), dtype=np.dtype(dtype)) for name, dtype, shape in input_specs}
    session.run(None, feed)  # warm-up: the first run allocates
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < runs and time.perf_counter() < deadline:
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return min(times)
