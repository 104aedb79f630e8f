"""A local Prefect API server (``prefect server start``) for schedules, started or reused.

Schedules never fire on Prefect's temporary in-process API: ``flow.serve(cron=...)`` needs a
server that outlives the process that serves. :class:`LocalPrefectServer` runs one on 127.0.0.1
with its database under ``PREFECT_HOME`` and records its URL in ``<home>/local-server.json``,
so a second ``fer pipeline serve`` reuses a healthy server instead of starting another.

No Prefect import here: the API URL must be known before Prefect is imported (it reads its
settings once), and health checks are plain HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STATE_FILE = "local-server.json"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def api_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    """Does ``<api_url>/health`` answer 200?"""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class LocalPrefectServer:
    """``prefect server start`` as a child process bound to ``host`` (loopback by default)."""

    def __init__(self, home: Path, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 120.0) -> None:
        self.home = Path(home).resolve()
        self.host, self.port = host, port
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.reused = False

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def _recorded(self) -> str | None:
        state = self.home / STATE_FILE
        try:
            return str(json.loads(state.read_text())["api_url"])
        except (OSError, ValueError, KeyError):
            return None

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"PREFECT_HOME": str(self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_API_HOST": self.host, "PREFECT_SERVER_API_PORT": str(self.port)})
        env.pop("PREFECT_API_URL", None)  # the server itself must not act as a client of another API
        return env

    def start(self, reuse: bool = True) -> "LocalPrefectServer":
        """Reuse the healthy server recorded in ``home`` (``reuse``), else start one and wait for it."""
        self.home.mkdir(parents=True, exist_ok=True)
        recorded = self._recorded() if reuse else None
        if recorded and api_healthy(recorded):
            self.port = int(recorded.rsplit(":", 1)[1].split("/")[0])
            self.reused = True
            return self
        self.port = self.port or free_port(self.host)
        exe = Path(sys.executable).with_name("prefect")
        cmd = [str(exe) if exe.exists() else "prefect", "server", "start", "--host", self.host, "--port", str(self.port)]
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._environment(),
                                            cwd=self.home, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while not api_healthy(self.api_url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
                self.stop()
                raise RuntimeError(f"prefect server did not become healthy at {self.api_url}; log {self.log_path}:\n"
                                   + "\n".join(tail))
            time.sleep(0.5)
        (self.home / STATE_FILE).write_text(json.dumps({"api_url": self.api_url, "pid": self.process.pid}))
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop a server this object started (a reused one is left running)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: uvicorn workers included
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        (self.home / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> "LocalPrefectServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
