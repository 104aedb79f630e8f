"""The embedded Triton server and a small endpoint API over tritonclient.

:class:`EmbeddedTriton` runs the real ``tritonserver`` binary shipped in the ``nvidia-pytriton``
wheel (``pytriton/tritonserver/bin/tritonserver``; its libraries live in ``nvidia_pytriton.libs/``,
which goes on ``LD_LIBRARY_PATH``). That build has only the Python backend, so
:func:`build_backend_directory` assembles, under the workspace (site-packages is never touched):

    <workspace>/backends/python/        libtriton_python.so, triton_python_backend_stub, utils
    <workspace>/backends/onnxruntime/   the same three files + serving/backends/onnxruntime/model.py

i.e. a Python-based backend *named* ``onnxruntime``. A repository whose configs say
``backend: "onnxruntime"`` therefore runs here and unchanged on NVIDIA's Triton container (native
ONNX Runtime backend). The Python-backend stub embeds the system ``libpython3.11``, not this
virtual environment, and ignores ``PYTHONPATH``; so the server's environment gets
``FER_TRITON_PYTHONPATH`` = the project root (``fer_core``, ``serving``) + this interpreter's
package folders (numpy, onnxruntime, OpenCV), and every ``model.py`` we write puts those folders at
the front of ``sys.path`` before importing anything. On NVIDIA's container set the same variable
(or install the packages into the container's Python) and mount the project.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Any, Callable, Sequence

from serving.repository import PROJECT_ROOT, PYTHONPATH_ENV, ModelRepository

__all__ = ["ServingError", "TritonEndpoint", "EmbeddedTriton", "TritonInstall", "find_triton",
           "build_backend_directory", "free_port", "supervise"]

_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"


class ServingError(RuntimeError):
    """A serving failure, reported as one line (unreachable server, unknown model, bad input...)."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the pytriton wheel's Triton are."""

    binary: Path
    library_dir: Path
    python_backend: Path
    stub: Path


def find_triton() -> TritonInstall:
    """Locate ``tritonserver`` and its Python backend in the installed ``nvidia-pytriton`` wheel."""
    spec = importlib_util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServingError("the embedded Triton needs the nvidia-pytriton package (pip install nvidia-pytriton)")
    package = Path(list(spec.submodule_search_locations)[0])
    server = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=server / "bin" / "tritonserver",
        library_dir=package.parent / "nvidia_pytriton.libs",
        python_backend=server / "backends" / "python",
        stub=server / "python_backend_stubs" / version / _STUB,
    )
    for path in (install.binary, install.library_dir, install.python_backend, install.stub):
        if not path.exists():
            raise ServingError(f"incomplete Triton install: {path} is missing (Python {version} stub?)")
    return install


def build_backend_directory(target: str | Path, install: TritonInstall | None = None) -> Path:
    """Assemble ``python/`` and the Python-based ``onnxruntime/`` backend under ``target``."""
    install = install or find_triton()
    target = Path(target)
    ort_model = Path(__file__).resolve().parent / "backends" / "onnxruntime" / "model.py"
    for name in ("python", "onnxruntime"):
        folder = target / name
        folder.mkdir(parents=True, exist_ok=True)
        for filename in _BACKEND_FILES:
            _copy_if_changed(install.python_backend / filename, folder / filename)
        _copy_if_changed(install.stub, folder / _STUB)
        (folder / _STUB).chmod(0o755)
    _copy_if_changed(ort_model, target / "onnxruntime" / "model.py")
    return target


def _copy_if_changed(source: Path, target: Path) -> None:
    if target.exists() and target.stat().st_size == source.stat().st_size \
            and target.stat().st_mtime >= source.stat().st_mtime:
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copy2(source, tmp)
    os.replace(tmp, target)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _split_url(url: str, protocol: str | None) -> tuple[str, str]:
    """``grpc://h:p`` / ``http://h:p`` / ``h:p`` (+ protocol) → (protocol, ``h:p``)."""
    if "://" in url:
        scheme, _, address = url.partition("://")
        if scheme not in ("grpc", "http"):
            raise ValueError(f"URL scheme must be grpc:// or http://, got {url!r}")
        if protocol and protocol != scheme:
            raise ValueError(f"URL {url!r} contradicts protocol={protocol!r}")
        return scheme, address.rstrip("/")
    protocol = protocol or "grpc"
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    if ":" not in url:
        raise ValueError(f"Triton URL must look like HOST:PORT, got {url!r}")
    return protocol, url


def _http_error(exc: "urllib.error.HTTPError") -> str:
    try:
        import json

        text = json.loads(exc.read().decode() or "{}").get("error", "")
    except (ValueError, OSError):
        text = ""
    text = text or f"HTTP {exc.code}"
    return text.strip().splitlines()[0]


def _one_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None)
    text = text() if callable(text) else text
    text = str(text or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TritonEndpoint:
    """A running Triton, reached over gRPC (default) or HTTP with tritonclient."""

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str | None = None, timeout_s: float = 60.0) -> None:
        self.protocol, self.address = _split_url(url, protocol)
        self.timeout_s = timeout_s
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self.module = module
        try:
            if self.protocol == "grpc":
                self.client = module.InferenceServerClient(self.address)
            else:
                self.client = module.InferenceServerClient(
                    self.address, connection_timeout=timeout_s, network_timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 -- tritonclient raises many kinds
            raise ServingError(f"cannot connect to Triton at {self.url}: {_one_line(exc)}") from None

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.address}"

    def _call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise ServingError(f"{what} at {self.url} failed: {_one_line(exc)}") from None

    def server_ready(self) -> bool:
        """True when the server answers and is ready; False when unreachable."""
        try:
            return bool(self.client.is_server_ready())
        except Exception:  # noqa: BLE001 -- unreachable counts as not ready
            return False

    def server_live(self) -> bool:
        """True when the server answers (it may be live but not ready while a model (un)loads)."""
        try:
            return bool(self.client.is_server_live())
        except Exception:  # noqa: BLE001
            return False

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.server_ready():
            if time.monotonic() > deadline:
                raise ServingError(f"Triton at {self.url} is not ready after {timeout_s:.0f}s")
            time.sleep(0.2)

    def load(self, model: str) -> None:
        """Load (or reload, picking up config changes) ``model``; the old one serves until then."""
        self._call(f"loading {model!r}", self.client.load_model, model)

    def unload(self, model: str) -> None:
        self._call(f"unloading {model!r}", self.client.unload_model, model)

    def model_ready(self, model: str, version: str | int = "") -> bool:
        try:
            return bool(self.client.is_model_ready(model, str(version)))
        except Exception:  # noqa: BLE001
            return False

    def index(self) -> list[dict[str, Any]]:
        """The repository index: ``{"name", "version", "state", "reason"}`` per model (version)."""
        if self.protocol == "grpc":
            raw = self._call("repository index", self.client.get_model_repository_index, as_json=True)
            return list(raw.get("models", []))
        return list(self._call("repository index", self.client.get_model_repository_index))

    def served_versions(self, model: str) -> list[int]:
        """Versions of ``model`` that are loaded and ready."""
        return sorted(int(m["version"]) for m in self.index()
                      if m.get("name") == model and m.get("state") == "READY" and str(m.get("version", "")).isdigit())

    def model_config(self, model: str) -> dict[str, Any]:
        if self.protocol == "grpc":
            return self._call(f"config of {model!r}", self.client.get_model_config, model, as_json=True)["config"]
        return self._call(f"config of {model!r}", self.client.get_model_config, model)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass


class EmbeddedTriton:
    """``tritonserver`` as a child process over a :class:`ModelRepository` (explicit model control).

    Ports 0 mean "pick free ones". The server binds ``host`` only (loopback by default) and logs
    to ``<workspace>/triton.log``. ``models`` are loaded once the server is ready (and again by
    :meth:`restart`), so a model that fails to load is reported by name instead of a start-up timeout.
    """

    def __init__(
        self,
        repository: ModelRepository | str | Path,
        workspace_dir: str | Path,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        models: Sequence[str] = (),
        startup_timeout_s: float = 90.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.repository = repository if isinstance(repository, ModelRepository) else ModelRepository(repository)
        self.workspace_dir = Path(workspace_dir).resolve()
        self.host = host
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.models = list(models)
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None
        self.load_failures: dict[str, str] = {}
        self._log_handle = None
        self._strict = True

    @property
    def log_path(self) -> Path:
        return self.workspace_dir / "triton.log"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def endpoint(self, protocol: str = "grpc") -> TritonEndpoint:
        return TritonEndpoint(self.grpc_url if protocol == "grpc" else self.http_url, protocol)

    def _environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(install.library_dir), env.get("LD_LIBRARY_PATH")]))
        # The stub ignores PYTHONPATH; the generated model.py files read this variable instead. Only
        # package folders are passed: the stub's own (system) standard library must stay first.
        packages = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
        env[PYTHONPATH_ENV] = os.pathsep.join(dict.fromkeys([str(PROJECT_ROOT), *packages]))
        env.setdefault("OMP_NUM_THREADS", "1")  # stubs share the CPU with each other and ORT
        return env

    def command(self, install: TritonInstall, backend_dir: Path) -> list[str]:
        args = [
            str(install.binary), f"--model-repository={self.repository.root}", f"--backend-directory={backend_dir}",
            "--model-control-mode=explicit", "--strict-model-config=true", "--exit-on-error=false",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}", "--log-verbose=0",
        ]
        return args + self.extra_args

    def start(self, strict: bool = True) -> "EmbeddedTriton":
        """Start the server, wait until ``/v2/health/ready`` answers 200, then load ``models``.

        With ``strict`` a model that fails to load stops the server and raises :class:`ServingError`.
        """
        if self.running:
            return self
        self._strict = strict  # restart() starts the same way (fer serve tolerates a model that fails)
        install = find_triton()
        self.workspace_dir.mkdir(parents=True, exist_ok=True)
        self.repository.root.mkdir(parents=True, exist_ok=True)
        self.repository.repair()  # a crash may have left staging leftovers
        backend_dir = build_backend_directory(self.workspace_dir / "backends", install)
        self.http_port, self.grpc_port, self.metrics_port = (
            p or free_port(self.host) for p in self._requested_ports)
        self._log_handle = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(install, backend_dir), stdout=self._log_handle, stderr=subprocess.STDOUT,
            env=self._environment(install), cwd=self.workspace_dir, start_new_session=True,
        )
        try:
            self._wait_ready()
            failures = self.load_failures = self.load_models(self.models)
            if failures and strict:
                raise ServingError("; ".join(f"{m}: {e}" for m, e in failures.items()))
        except BaseException:
            self.stop()
            raise
        return self

    def load_models(self, models: Sequence[str]) -> dict[str, str]:
        """Load (or reload) ``models`` in order over HTTP; returns ``{model: one-line error}`` of failures."""
        failures = {}
        for model in models:
            request = urllib.request.Request(
                f"http://{self.http_url}/v2/repository/models/{model}/load", data=b"{}", method="POST")
            try:
                urllib.request.urlopen(request, timeout=self.startup_timeout_s).close()
            except urllib.error.HTTPError as exc:
                failures[model] = _http_error(exc)
            except (urllib.error.URLError, OSError) as exc:
                failures[model] = f"server unreachable: {exc}"
        return failures

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            if self.process is None or self.process.poll() is not None:
                raise ServingError(f"tritonserver exited during start-up; last log lines:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServingError(f"tritonserver not ready after {self.startup_timeout_s:.0f}s; log: {self.log_path}")
            time.sleep(0.25)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL of its process group after ``timeout_s``)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)  # its own session: stubs included
                    self.process.wait()
            else:
                # The server died (killed, crashed): its Python-backend stubs may outlive it in its
                # process group, holding memory; end them before a restart starts new ones.
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self.process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def restart(self) -> "EmbeddedTriton":
        """Stop if needed and start again on the same ports, reloading ``models`` (as strictly as the
        last :meth:`start`)."""
        self._requested_ports = (self.http_port, self.grpc_port, self.metrics_port)
        self.stop()
        return self.start(strict=self._strict)

    def __enter__(self) -> "EmbeddedTriton":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def supervise(
    server: EmbeddedTriton,
    *,
    check_interval_s: float = 2.0,
    should_stop: Callable[[], bool] = lambda: False,
    on_restart: Callable[[EmbeddedTriton], None] | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> int:
    """Keep a started ``server`` running until ``should_stop()``: when its process dies it is
    restarted on the same ports and its models are loaded again (what ``fer serve`` does).

    ``on_failure`` gets a one-line message for each death and each failed restart (which is retried
    at the next check); ``on_restart`` is called after each successful restart. Returns the number of
    restarts. Checks every ``check_interval_s`` seconds, so recovery takes at most that long plus the
    server's start-up and model loading.
    """
    if check_interval_s <= 0:
        raise ValueError(f"check_interval_s must be > 0, got {check_interval_s}")
    restarts = 0
    while not should_stop():
        time.sleep(check_interval_s)
        if should_stop():
            break
        if server.running:
            continue
        if on_failure is not None:
            on_failure(f"tritonserver died (log: {server.log_path}); restarting")
        try:
            server.restart()
        except ServingError as exc:
            if on_failure is not None:
                on_failure(f"restart failed: {str(exc).splitlines()[0]}; retrying")
            continue
        restarts += 1
        if on_restart is not None:
            on_restart(server)
    return restarts
