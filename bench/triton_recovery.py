"""Time to recovery after ``tritonserver`` is SIGKILLed under load, with ``fer serve``'s supervisor.

A tiny two-version ``ca_resnet`` repository (see ``bench/promotion_under_load.py``) is served by the
embedded Triton; :func:`serving.server.supervise` watches it (as ``fer serve`` does) while a load
generator sends one image per request. The server is killed ``--kills`` times; for each kill we
report the seconds until the champion answers again and how many requests failed (each as a
one-line :class:`ServingError`).

    python bench/triton_recovery.py --kills 3 --rate 10 --check-interval 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.promotion_under_load import LoadGenerator, build_platform  # noqa: E402
from serving.server import supervise  # noqa: E402


def run(kills: int, rate_hz: float, check_interval_s: float, settle_s: float = 2.0) -> dict[str, object]:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        server, _, models, images, references = build_platform(Path(tmp))
        labels = list(models[1].metadata.label_names)
        stop, messages = threading.Event(), []
        supervisor = threading.Thread(target=supervise, args=(server,), kwargs=dict(
            check_interval_s=check_interval_s, should_stop=stop.is_set, on_failure=messages.append))
        supervisor.start()
        load = LoadGenerator(server.grpc_url, images, references, labels, rate_hz=rate_hz,
                             max_requests=100_000, max_seconds=kills * 180).start()
        recoveries = []
        try:
            for _ in range(kills):
                time.sleep(settle_s)
                killed_at = load.now()
                os.kill(server.process.pid, signal.SIGKILL)
                deadline = time.monotonic() + 150
                while time.monotonic() < deadline:
                    ok = [a for a in load.report.answers if a.sent_s > killed_at and a.versions == (1,)]
                    if ok:
                        failed = [a for a in load.report.answers if killed_at < a.sent_s < ok[0].sent_s and a.error]
                        recoveries.append({"recovery_s": round(ok[0].sent_s - killed_at, 2),
                                           "failed_requests": len(failed),
                                           "example_error": failed[0].error if failed else ""})
                        break
                    time.sleep(0.1)
                else:
                    recoveries.append({"recovery_s": None, "failed_requests": None})
            time.sleep(settle_s)
        finally:
            report = load.stop()
            stop.set()
            supervisor.join(60)
            server.stop()
    times = [r["recovery_s"] for r in recoveries if r["recovery_s"] is not None]
    return {"kills": kills, "rate_hz": rate_hz, "check_interval_s": check_interval_s, "recoveries": recoveries,
            "recovery_s_mean": float(np.mean(times)) if times else None,
            "recovery_s_max": max(times) if times else None, "requests": len(report.answers),
            "unattributed_answers": len(report.unattributed), "supervisor_messages": messages[:6]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second (default 10)")
    parser.add_argument("--check-interval", type=float, default=0.5, help="supervisor period in s (default 0.5)")
    args = parser.parse_args(argv)
    result = run(args.kills, args.rate, args.check_interval)
    print(json.dumps(result, indent=2))
    return 0 if all(r["recovery_s"] is not None for r in result["recoveries"]) else 1


if __name__ == "__main__":
    sys.exit(main())
