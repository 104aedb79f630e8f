"""MLflow and Prefect on a real PostgreSQL, configured the way docker/compose.yaml configures them.

A throw-away cluster is started from Debian's ``postgresql`` binaries in a temporary folder,
listening on 127.0.0.1 on a free port only, with password (SCRAM) authentication over TCP like the
stack, and its databases are created by the stack's own ``docker/scripts/postgres-init.sh``. As
root it runs as the ``postgres`` system user (PostgreSQL refuses to run as root).

- training → tracking → registry: the toy trainer with ``registry.tracking.MlflowCallback`` on
  ``FER_TRACKING_URI=postgresql://...`` (psycopg2), then ``mlflow.register_model`` + an alias, and
  the rows checked in PostgreSQL itself;
- Prefect: ``prefect server start`` on ``postgresql+asyncpg`` with basic-auth (the compose
  environment variables), a flow run through its API, its state checked in PostgreSQL.

Skipped with the reason when PostgreSQL or a driver is missing on a developer machine; with ``CI``
set, that is a failure instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
INIT_SCRIPT = ROOT / "docker" / "scripts" / "postgres-init.sh"
USER = "fer"
# Characters that must be URL-quoted inside a connection URI, as a real password may have.
PASSWORD = "s3cret:p@ss/word"


def unavailable(reason: str) -> None:
    """Skip on a developer machine; fail in CI, where the backend must be installed."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it: see docs/deployment.md, 'Testing the backends')")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin_dir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@dataclass
class PostgresServer:
    """A running cluster; ``uri(db)`` is the SQLAlchemy/MLflow URI with the quoted password."""

    root: Path
    port: int
    bin_dir: Path
    run_as: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def uri(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{self.port}/{database}"

    def _run(self, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.run_as, *cmd], capture_output=True, text=True, env=env, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr or proc.stdout}")
        return proc

    @classmethod
    def start(cls) -> "PostgresServer":
        bin_dir = _bin_dir()
        if bin_dir is None:
            unavailable("PostgreSQL is not installed (Debian: apt-get install -y postgresql)")
        run_as: list[str] = []
        root = Path(tempfile.mkdtemp(prefix="fer-pg-"))  # under /tmp: traversable by the postgres user
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("running as root and there is no 'postgres' user to run PostgreSQL as")
            os.chown(root, account.pw_uid, account.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        server = cls(root=root, port=free_port(), bin_dir=bin_dir, run_as=run_as)
        pwfile = root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if run_as:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        server._run(str(bin_dir / "initdb"), "-D", str(server.data), "-U", USER, f"--pwfile={pwfile}",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        options = f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        server._run(str(bin_dir / "pg_ctl"), "-D", str(server.data), "-o", options, "-l", str(root / "log"),
                    "-w", "-t", "60", "start")
        # The stack's own init script creates the databases (as the image's entrypoint would).
        env = {**os.environ, "POSTGRES_USER": USER, "PGHOST": str(root), "PGPORT": str(server.port),
               "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        server._run("/bin/sh", str(INIT_SCRIPT), env=env)
        return server

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def query(self, database: str, sql: str, *params) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD,
                              dbname=database) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def postgres():
    try:
        import psycopg2  # noqa: F401  MLflow's postgresql:// driver
    except ImportError:
        unavailable("psycopg2 is not installed (requirement: psycopg2-binary, see docker/requirements-deploy.txt)")
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


def test_the_init_script_created_one_database_per_state_holder(postgres):
    names = {row[0] for row in postgres.query("postgres", "SELECT datname FROM pg_database")}
    assert {"mlflow", "mlflow_auth", "prefect"} <= names


# -- MLflow -----------------------------------------------------------------------------------------
def test_training_tracking_and_registry_on_postgresql(postgres, workspace, tmp_path, monkeypatch):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    sys.path.insert(0, str(Path(__file__).parent))
    from training_toy import ToyTask, toy_recipe

    from fer_platform.settings import Settings
    from fer_platform.workspace import Workspace
    from fer_core.training.trainer import Trainer
    from registry.tracking import MlflowCallback, setup_tracking

    torch.set_num_threads(1)
    monkeypatch.setenv("FER_TRACKING_URI", postgres.uri("mlflow"))
    monkeypatch.setenv("FER_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    assert "s3cret" not in repr(Settings.load())  # the URI's password never shows
    workspace = Workspace.load()  # the context of the environment above

    callback = MlflowCallback("toy_net", tmp_path / "run", data_ref="toy@0123456789abcdef", workspace=workspace)
    Trainer(toy_recipe(epochs=2), ToyTask(), tmp_path / "run", callbacks=[callback]).fit()
    assert setup_tracking(workspace) == postgres.uri("mlflow")
    client = MlflowClient()
    run = client.get_run(callback.run_id)
    assert run.info.status == "FINISHED" and run.data.params["network"] == "toy_net"
    assert [m.step for m in client.get_metric_history(callback.run_id, "val/accuracy")] == [1, 2]
    assert run.info.artifact_uri.startswith((tmp_path / "artifacts" / "toy_net").resolve().as_uri())

    version = mlflow.register_model(callback.model_info.model_uri, "fer-toy_net")
    client.set_registered_model_alias("fer-toy_net", "champion", version.version)
    champion = mlflow.pytorch.load_model("models:/fer-toy_net@champion")
    x = torch.randn(4, 1, 8, 8)
    trained = mlflow.pytorch.load_model(callback.model_info.model_uri)
    assert torch.allclose(champion(x)["logits"] if isinstance(champion(x), dict) else champion(x),
                          trained(x)["logits"] if isinstance(trained(x), dict) else trained(x))

    # The state really is in PostgreSQL (not in a SQLite file MLflow fell back to).
    assert postgres.query("mlflow", "SELECT status FROM runs WHERE run_uuid = %s", callback.run_id) == [("FINISHED",)]
    rows = postgres.query("mlflow", "SELECT name, version, run_id FROM model_versions")
    assert ("fer-toy_net", int(version.version), callback.run_id) in rows
    assert postgres.query("mlflow", "SELECT alias FROM registered_model_aliases WHERE name = %s",
                          "fer-toy_net") == [("champion",)]
    assert not list(workspace.root.rglob("*.db"))


# -- Prefect ----------------------------------------------------------------------------------------
_FLOW = textwrap.dedent('''
    from prefect import flow, task

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow(name="fer-backend-check")
    def check(x: int = 21) -> int:
        return double(x)

    if __name__ == "__main__":
        state = check(return_state=True)
        print("FLOW_RUN_ID", state.state_details.flow_run_id, state.result())
''')


def _prefect_env(postgres, tmp_path: Path, port: int) -> dict[str, str]:
    # Exactly the variables docker/compose.yaml gives the prefect-server service.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
        "PREFECT_SERVER_DATABASE_HOST": "127.0.0.1",
        "PREFECT_SERVER_DATABASE_PORT": str(postgres.port),
        "PREFECT_SERVER_DATABASE_USER": USER,
        "PREFECT_SERVER_DATABASE_PASSWORD": PASSWORD,
        "PREFECT_SERVER_DATABASE_NAME": "prefect",
        "PREFECT_SERVER_API_AUTH_STRING": "admin:prefect-pw",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_AUTH_STRING": "admin:prefect-pw",
    })
    return env


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    token = b64encode(b"admin:prefect-pw").decode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    pytest.fail(f"prefect server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def test_prefect_server_on_postgresql_runs_a_flow(postgres, tmp_path):
    import psycopg2  # noqa: F401

    port = free_port()
    env = _prefect_env(postgres, tmp_path, port)
    prefect = Path(sys.executable).with_name("prefect")
    log = tmp_path / "prefect-server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/api/health", server, log)
        # basic-auth is on: no credentials, no API (only the health routes are open)
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/admin/version", timeout=5)
        assert denied.value.code == 401

        script = tmp_path / "check_flow.py"
        script.write_text(_FLOW)
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(l for l in proc.stdout.splitlines() if l.startswith("FLOW_RUN_ID"))
        _, flow_run_id, result = line.split()
        assert result == "42"
        rows = postgres.query("prefect", "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                                         "WHERE r.id = %s", flow_run_id)
        assert rows == [("fer-backend-check", "COMPLETED")]
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
