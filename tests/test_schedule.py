"""Schedules fire on a real local Prefect server: ``prefect server start`` on 127.0.0.1 (free port,
temporary PREFECT_HOME), a tiny flow served with a short interval, a completed run within a bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from prefect import flow  # noqa: E402

from flows.local_server import LocalPrefectServer, api_healthy  # noqa: E402

pytestmark = pytest.mark.integration  # starts a local Prefect server

REPO = Path(__file__).resolve().parent.parent
FIRE_WITHIN_S = 120  # server start is separate; serve start-up + first scheduled run + its completion


@flow(name="schedule-tick")
def tick() -> int:
    return 42

SERVE = ("import os, sys; sys.path.insert(0, os.getcwd()); from tests.test_schedule import tick; "
         "tick.serve(name='tick-every-2s', interval=2, print_starting_message=False)")


def _completed_runs(api_url: str) -> list[dict]:
    body = {"flows": {"name": {"any_": ["schedule-tick"]}},
            "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}, "limit": 10}
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_served_flow_runs_on_its_schedule(tmp_path):
    home = tmp_path / "prefect-home"
    server = LocalPrefectServer(home).start(reuse=False)
    serve = None
    try:
        assert server.api_url.startswith("http://127.0.0.1:") and api_healthy(server.api_url)
        again = LocalPrefectServer(home).start()  # a second `fer pipeline serve` reuses it
        assert again.reused and again.api_url == server.api_url
        env = {**os.environ, "PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(home),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
        serve = subprocess.Popen([sys.executable, "-c", SERVE], cwd=REPO, env=env, start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "wb"))
        deadline = time.monotonic() + FIRE_WITHIN_S
        runs: list[dict] = []
        while time.monotonic() < deadline and not runs:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            runs = _completed_runs(server.api_url)
            time.sleep(1.0)
        assert runs, f"no scheduled run completed within {FIRE_WITHIN_S}s; " + (tmp_path / "serve.log").read_text()[-2000:]
        assert runs[0]["deployment_id"] is not None  # it came from the served deployment's schedule
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()
        server.stop()
    assert not api_healthy(server.api_url)
