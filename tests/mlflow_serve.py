"""Shared by the tests that run ``mlflow models serve``: wait until its HTTP server answers."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest


def wait_for_ping(server: subprocess.Popen, port: int, timeout_s: float) -> None:
    """Poll ``/ping`` until it answers; fail the test with the server's stderr if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(1)
