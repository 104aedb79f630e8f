"""Two plain ``prefect worker`` processes drain ``retrain_all``'s trainings in parallel.

Against a real ``prefect server start`` on 127.0.0.1, with this checkout (not an image) as the
code the workers run (``FER_CHECKOUT``), exactly the commands of docs/deployment.md:

    prefect work-pool create fer-training --type process
    prefect --no-prompt deploy --all
    prefect worker start --pool fer-training --type process --limit 1     (twice)

then ``retrain_all(dispatch="pool")`` over a few networks on tiny generated data (quick profile
plus tiny overrides: the machine is shared). Reports the wall time, each ``train`` flow run's
start/end and the overlap of the trainings. ``tests/test_prefect_server.py`` runs it.

    python bench/prefect_workers.py [--networks ca_resnet au_cotrain | --networks all] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flows.local_server import LocalPrefectServer  # noqa: E402  (no Prefect import)

from fer_core.models.catalog import network_specs  # noqa: E402

POOL = "fer-training"
# every default network of the catalog: its dataset name and source format, and a tenth of its
# demo size of generated samples (the machine is shared; the recipes below are tiny anyway)
_SPECS = network_specs(default_only=True)
DATASETS = {spec.name: (spec.dataset, spec.data_format) for spec in _SPECS}
SIZES = {spec.data_format: max(32, spec.demo_size // 10) for spec in _SPECS}
TINY = {"epochs": 1, "max_steps_per_epoch": 3, "batch_size": 16}
OVERRIDES = {name: {**TINY, "model_kwargs.width": 8} if name == "ca_resnet" else TINY for name in DATASETS}
GATES = {"floor": 0.0, "latency_budget_ms": 5000.0, "smoke_samples": 4, "latency_requests": 3}


def environment(work: Path, api_url: str) -> dict[str, str]:
    """What a worker started from this checkout sees: the server, the workspace, the checkout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FER_", "MLFLOW_TRACKING", "MLFLOW_REGISTRY", "PREFECT_"))}
    env.update({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(work / "prefect-client"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "FER_HOME": str(work / "fer-home"),
                "FER_CHECKOUT": str(ROOT), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"})
    return env


def prefect(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("prefect")
    proc = subprocess.run([str(exe), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed ({proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return proc


def documented_commands(section: str = "### Workers from a checkout") -> list[list[str]]:
    """The ``prefect ...`` lines of the bash blocks of docs/deployment.md (all, or one section's)."""
    import re
    import shlex

    text = (ROOT / "docs" / "deployment.md").read_text()
    if section:
        text = text.split(section, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "prefect":
                commands.append(words[1:])
    return commands


def start_worker(argv: list[str], name: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("prefect")
    return subprocess.Popen([str(exe), *argv, "--name", name], env=env, cwd=ROOT, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


DRIVER = """
import json, sys
from flows.retrain_all import retrain_all
args = json.loads(sys.argv[1])
state = retrain_all(networks=args["networks"], sources=args["sources"], overrides=args["overrides"],
                    gates=args["gates"], dispatch="pool", return_state=True)
rows = state.result(raise_on_failure=False)
print("ROWS=" + json.dumps(rows if isinstance(rows, list) else str(rows)))
print("STATE=" + state.type.value + " " + (state.message or ""))
print("RUN=" + str(state.state_details.flow_run_id))
"""


LOSO_DRIVER = """
import json, sys
from pathlib import Path
from fer_core.data.formats import adapt, get_format
from fer_platform.workspace import Workspace
from registry.datasets import DatasetStore
from flows.protocols import loso
work = Path(sys.argv[1])
src = get_format("casme2").write_synthetic(work / "casme2-src", seed=0, size=12, image_size=32, num_frames=5,
                                           num_subjects=3)
adapt("casme2", src, work / "casme2-prep", name="casme2")
ref = DatasetStore(Workspace.load().ensure()).add("casme2", work / "casme2-prep").ref
result = loso("micro_lsh", ref, overrides=json.loads(sys.argv[2]), dispatch="pool")
print("LOSO=" + json.dumps({k: result[k] for k in ("pooled", "per_fold", "parent_run_id", "child_run_ids")}))
"""
# A fold must stay RUNNING longer than the gap between the two workers' polls (up to the 10 s query
# interval, plus ~10 s of imports): with 6 epochs a fold trained for 4 s and two folds never were
# RUNNING at once although both workers held one (measured 2026-12-02); 40 epochs keeps one RUNNING
# for tens of seconds.
TINY_MICRO = {"device": "cpu", "epochs": 40, "batch_size": 8, "max_steps_per_epoch": 1, "early_stopping_patience": 0,
              "model_kwargs.img_size": 24, "model_kwargs.width": 4, "model_kwargs.magnifier_width": 4,
              "model_kwargs.num_mag_frames": 3, "model_kwargs.head_hidden": 16, "augment": {}}


ACTIVE_STATES = ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING"]


def filter_flow_runs(env: dict[str, str], body: dict) -> list[dict]:
    """The server's ``POST /flow_runs/filter`` with ``body`` (Prefect's REST filter)."""
    import urllib.request

    request = urllib.request.Request(f"{env['PREFECT_API_URL']}/flow_runs/filter", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def active_runs(env: dict[str, str]) -> list[dict]:
    """Flow runs not yet final: those a worker holds or is about to take."""
    return filter_flow_runs(env, {"flow_runs": {"state": {"type": {"any_": ACTIVE_STATES}}}, "limit": 100})


def free_the_workers(env: dict[str, str], timeout_s: float = 300) -> list[str]:
    """Cancel every unfinished flow run with Prefect's own CLI (``prefect flow-run cancel``) and wait
    until no worker holds one, so a measurement that needs both workers gets both. Returns the
    ids of the runs cancelled."""
    import urllib.request

    cancelled: dict[str, float] = {}  # run id -> when it was cancelled
    deadline = time.monotonic() + timeout_s
    # a loop, not one pass: a parent cancelled while it dispatches may still create a child run
    while active := active_runs(env):
        if time.monotonic() > deadline:
            raise RuntimeError(f"flow runs still active after {timeout_s} s: "
                               f"{[(r['name'], r['state_type']) for r in active]}")
        for run in active:
            if run["state_type"] != "CANCELLING" and run["id"] not in cancelled:
                prefect("flow-run", "cancel", run["id"], env=env)
                cancelled[run["id"]] = time.monotonic()
            elif run["state_type"] == "CANCELLING" and time.monotonic() - cancelled.get(run["id"], 0.0) > 60:
                # A run whose process ended before the worker saw the cancellation can stay
                # CANCELLING for good (seen once: 300 s): finish it through Prefect's API, forced.
                body = json.dumps({"state": {"type": "CANCELLED"}, "force": True}).encode()
                request = urllib.request.Request(f"{env['PREFECT_API_URL']}/flow_runs/{run['id']}/set_state",
                                                 data=body, headers={"Content-Type": "application/json"},
                                                 method="POST")
                urllib.request.urlopen(request, timeout=30).close()
        time.sleep(2)
    return list(cancelled)


def loso_on_pool(env: dict[str, str], work: Path) -> dict:
    """A LOSO protocol whose folds the pool's workers train (``loso`` with ``dispatch="pool"``); its
    pooled result, the ``loso-fold`` flow runs and how long two of them overlapped. Earlier runs
    still on the pool are cancelled first (each worker takes one run at a time): the overlap
    measures whether two folds train at once, not what else the pool was doing."""
    from datetime import datetime

    cancelled = free_the_workers(env)
    proc = subprocess.run([sys.executable, "-c", LOSO_DRIVER, str(work), json.dumps(TINY_MICRO)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LOSO=")), None)
    if line is None:
        raise RuntimeError(f"loso driver failed: {proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    runs = [r for r in train_runs(env, flow="loso-fold")]
    spans = sorted((datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"]))
                   for r in runs if r.get("start_time") and r.get("end_time"))
    overlap, _ = concurrency_of(spans)
    return {"result": json.loads(line[5:]), "fold_runs": [{"name": r["name"], "state": r["state_type"]} for r in runs],
            "overlap_s": round(overlap, 1), "cancelled_first": cancelled}


def concurrency_of(spans: list[tuple]) -> tuple[float, int]:
    """Seconds during which at least two of the (start, end) spans ran, and the most that ran at once."""
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans], key=lambda e: (e[0], e[1]))
    running, most, together, since = 0, 0, 0.0, None
    for when, step in events:
        if running >= 2 and since is not None:
            together += (when - since).total_seconds()
        running += step
        most = max(most, running)
        since = when
    return together, most


def train_runs(env: dict[str, str], flow: str = "train") -> list[dict]:
    return filter_flow_runs(env, {"flows": {"name": {"any_": [flow]}}, "limit": 50})


def run(work: Path, networks: tuple[str, ...] = ("ca_resnet", "au_cotrain"), after=None) -> dict:
    """The whole bench in ``work``; returns the measurements (and raises if a step fails).
    ``after(env)``: called while the server still runs (the test runs the other documented commands)."""
    from datetime import datetime

    from fer_core.data.formats import get_format

    work.mkdir(parents=True, exist_ok=True)
    # a busy shared machine: a fresh server DB migrates slowly
    server = LocalPrefectServer(work / "prefect-server", startup_timeout_s=400).start(reuse=False)
    workers: list[subprocess.Popen] = []
    try:
        env = environment(work, server.api_url)
        sources = {}
        for network in networks:
            name, fmt = DATASETS[network]
            path = get_format(fmt).write_synthetic(work / "sources" / fmt, seed=0, size=SIZES[fmt])
            sources[network] = (name, fmt, str(path))
        # docs/deployment.md, "Workers from a checkout", as written: the pool, the deployments, workers
        commands = documented_commands()
        assert [c[:2] for c in commands] == [["work-pool", "create"], ["--no-prompt", "deploy"], ["worker", "start"]], commands
        prefect(*commands[0], env=env)
        prefect(*commands[1], env=env, timeout=600)
        workers = [start_worker(commands[2], f"worker-{i}", env, work / f"worker-{i}.log") for i in (1, 2)]
        start = time.monotonic()
        driver = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(
            {"networks": list(networks), "sources": sources, "overrides": OVERRIDES, "gates":
             {n: GATES for n in networks}})], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - start
        out = dict(line.split("=", 1) for line in driver.stdout.splitlines() if line.startswith(("ROWS=", "STATE=", "RUN=")))
        if "STATE" not in out:
            raise RuntimeError(f"retrain_all driver failed: {driver.stdout[-2000:]}{driver.stderr[-3000:]}")
        runs = train_runs(env)
        spans = []
        for r in runs:
            t0, t1 = r.get("start_time"), r.get("end_time")
            spans.append({"name": r["name"], "state": r["state_type"], "parent": r.get("parent_task_run_id"),
                          "start": t0, "end": t1,
                          "seconds": (datetime.fromisoformat(t1) - datetime.fromisoformat(t0)).total_seconds()
                          if t0 and t1 else None})
        overlap, most = concurrency_of([(datetime.fromisoformat(s["start"]), datetime.fromisoformat(s["end"]))
                                        for s in spans if s["start"] and s["end"]])
        if after is not None:
            after(env)
        return {"wall_s": round(wall, 1), "state": out["STATE"].strip(), "rows": json.loads(out.get("ROWS", "[]")),
                "train_runs": spans, "overlap_s": round(overlap, 1), "most_at_once": most, "networks": list(networks),
                "load_average": os.getloadavg(), "worker_logs": [str(work / f"worker-{i}.log") for i in (1, 2)]}
    finally:
        for worker in workers:
            stop(worker)
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["ca_resnet", "au_cotrain"], choices=["all", *sorted(DATASETS)],
                        help="networks retrain_all trains on the pool (all: every default network)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fer-prefect-workers"))
    args = parser.parse_args()
    networks = sorted(DATASETS) if "all" in args.networks else args.networks
    print(f"load average before: {os.getloadavg()}", flush=True)
    result = run(args.out, tuple(networks))
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["state"].startswith("COMPLETED") else 1


if __name__ == "__main__":
    sys.exit(main())
