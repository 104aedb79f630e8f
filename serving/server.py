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

Security: model control (load/unload, the repository index), logging, trace and shared-memory
APIs need the workspace's control key (:func:`control_key`, sent as a header by
:class:`TritonEndpoint` when given ``key``); HTTP is off unless ``allow_http``, and then every HTTP
API but health needs the key too (see ``RESTRICTED_APIS``); busy ports are refused and the server
answering on the gRPC port must be the process started here (:meth:`EmbeddedTriton.owns_ports`).
Triton takes the key on its command line only, which every local user can read in
``/proc/<pid>/cmdline``; a preload compiled from ``serving/backends/scrub_argv.c``
(:func:`build_argv_scrubber`) lets the command line carry a placeholder (``KEY_PLACEHOLDER``) and
puts the key from the file named by ``FER_TRITON_KEY_FILE`` into the arguments ``main()`` parses,
so the key never enters the process table (the Triton containers start the same way). Without a C
compiler the server runs without it, with the key on its command line, and
:attr:`EmbeddedTriton.key_hidden` is False (``fer serve`` warns); then mount ``/proc`` with
``hidepid=2`` or run the server as its own user.
"""

from __future__ import annotations

import contextlib
import hashlib
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
           "build_backend_directory", "build_argv_scrubber", "free_port", "port_in_use", "supervise", "control_key",
           "CONTROL_HEADER", "RESTRICTED_APIS"]

# Model control is closed by default: Triton's restricted-API options put these APIs behind a header
# only the platform knows (a per-workspace key in <workspace>/triton/control.key, mode 0600). Without
# it, anyone who reaches the port can POST /v2/repository/models/<m>/load with a config and a
# file:1/model.py parameter and run that Python as the server's user. ``model-config`` stays open:
# FERClient reads the ensembles' metadata from it and it changes nothing. Over HTTP ``inference`` is
# restricted too: Triton 2.51 sizes an HTTP/JSON input buffer from the request's shape before it
# checks anything, so ``shape [2147483648,1,48,48]`` with one value aborts the server (bad_alloc);
# its gRPC front validates sizes first. HTTP is therefore off by default (``allow_http``).
CONTROL_HEADER = "fer-control-key"
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
HTTP_RESTRICTED_APIS = RESTRICTED_APIS + ("inference",)
CONTROL_KEY_FILE = "control.key"
# What the restricted-API options say instead of the key when the scrubber preload runs: it reads
# the key from $FER_TRITON_KEY_FILE (serving/backends/scrub_argv.c; it refuses to start without).
KEY_PLACEHOLDER = "@FER_TRITON_KEY_FILE"
_GRPC_HEADER_PREFIX = "triton-grpc-protocol-"

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


def build_argv_scrubber(target: str | Path) -> Path | None:
    """Compile ``serving/backends/scrub_argv.c`` to ``<target>/libferscrub.so`` (once; needs a C
    compiler), the preload that hides the control key from ``/proc/<pid>/cmdline``. ``None`` when no
    compiler is found: the server still runs, and the key is then visible to local users' ``ps``."""
    source = Path(__file__).resolve().parent / "backends" / "scrub_argv.c"
    library = Path(target) / "libferscrub.so"
    if library.is_file() and library.stat().st_mtime >= source.stat().st_mtime:
        return library
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    library.parent.mkdir(parents=True, exist_ok=True)
    tmp = library.with_name(f".{library.name}.{os.getpid()}.tmp")
    result = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(source)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        return None
    os.replace(tmp, library)
    return library


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


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on ``host:port`` (a bind of it fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not "in use"
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def control_key(folder: str | Path) -> str:
    """The model-control key of the repository whose parent folder is ``folder`` (the workspace's
    ``triton/``): ``<folder>/control.key``, created on first use.

    Written with mode 0600 from the start (``O_EXCL``, no window where it is readable by others) and
    never printed or logged. A file readable by others is refused: whoever could read it could load code.
    """
    path = Path(folder) / CONTROL_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ServingError(f"{path} is readable by other users (mode {mode:o}); chmod 600 it or delete it "
                               "(a new key is made at the next start)") from None
        key = path.read_text().strip()
        if len(key) < 32:
            raise ServingError(f"{path} does not hold a valid key; delete it (a new one is made at the next start)")
        return key
    import secrets

    key = secrets.token_hex(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    return key


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

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str | None = None, timeout_s: float = 60.0,
                 key: str | None = None, before_load: Callable[[], object] | None = None) -> None:
        self.protocol, self.address = _split_url(url, protocol)
        self.timeout_s = timeout_s
        # Run before every (re)load: publishes an s3:// repository's working copy (serving.s3_repository).
        self.before_load = before_load
        # The model-control key (see CONTROL_HEADER): sent with every call of this endpoint.
        # Triton's gRPC front expects restricted-protocol headers with a "triton-grpc-protocol-" prefix.
        header = f"{_GRPC_HEADER_PREFIX}{CONTROL_HEADER}" if self.protocol == "grpc" else CONTROL_HEADER
        self.headers = {header: key} if key else None
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
            return bool(self.client.is_server_ready(headers=self.headers))
        except Exception:  # noqa: BLE001 -- unreachable counts as not ready
            return False

    def server_live(self) -> bool:
        """True when the server answers (it may be live but not ready while a model (un)loads)."""
        try:
            return bool(self.client.is_server_live(headers=self.headers))
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
        if self.before_load is not None:
            self.before_load()
        self._call(f"loading {model!r}", self.client.load_model, model, headers=self.headers)

    def unload(self, model: str) -> None:
        self._call(f"unloading {model!r}", self.client.unload_model, model, headers=self.headers)

    def model_ready(self, model: str, version: str | int = "") -> bool:
        try:
            return bool(self.client.is_model_ready(model, str(version), headers=self.headers))
        except Exception:  # noqa: BLE001
            return False

    def index(self) -> list[dict[str, Any]]:
        """The repository index: ``{"name", "version", "state", "reason"}`` per model (version)."""
        if self.protocol == "grpc":
            raw = self._call("repository index", self.client.get_model_repository_index, as_json=True,
                             headers=self.headers)
            return list(raw.get("models", []))
        return list(self._call("repository index", self.client.get_model_repository_index, headers=self.headers))

    def served_versions(self, model: str) -> list[int]:
        """Versions of ``model`` that are loaded and ready.

        With the control key: from the repository index. Without it (a client that only infers) the
        index is restricted, so the versions come from the model's metadata, which the inference
        protocol serves to anyone; a model that is not loaded gives none.
        """
        if self.headers:
            return sorted(int(m["version"]) for m in self.index()
                          if m.get("name") == model and m.get("state") == "READY"
                          and str(m.get("version", "")).isdigit())
        if not self.model_ready(model):
            return []
        if self.protocol == "grpc":
            meta = self._call(f"metadata of {model!r}", self.client.get_model_metadata, model, as_json=True)
        else:
            meta = self._call(f"metadata of {model!r}", self.client.get_model_metadata, model)
        return sorted(int(v) for v in meta.get("versions", []) if str(v).isdigit())

    def model_config(self, model: str) -> dict[str, Any]:
        if self.protocol == "grpc":
            return self._call(f"config of {model!r}", self.client.get_model_config, model, as_json=True,
                              headers=self.headers)["config"]
        return self._call(f"config of {model!r}", self.client.get_model_config, model, headers=self.headers)

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
        allow_http: bool = False,
    ) -> None:
        self.repository = repository if isinstance(repository, ModelRepository) else ModelRepository(repository)
        self.workspace_dir = Path(workspace_dir).resolve()
        self.host = host
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.models = list(models)
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args)
        self.allow_http = allow_http
        self.process: subprocess.Popen | None = None
        self.load_failures: dict[str, str] = {}
        self.key = control_key(self.repository.root.parent)  # beside the repository: one key per workspace
        self._shm_prefix = ""
        self._segment_guard_stop = None
        self._scrubber: Path | None = None
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
        """A keyed endpoint of this server (the platform's own client: model control allowed)."""
        if protocol == "http" and not self.allow_http:
            raise ServingError("this Triton runs without HTTP (allow_http=False); use gRPC")
        return TritonEndpoint(self.grpc_url if protocol == "grpc" else self.http_url, protocol, key=self.key,
                              before_load=self.repository.publish)

    def _environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(install.library_dir), env.get("LD_LIBRARY_PATH")]))
        # The stub ignores PYTHONPATH; the generated model.py files read this variable instead. Only
        # package folders are passed: the stub's own (system) standard library must stay first.
        packages = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
        env[PYTHONPATH_ENV] = os.pathsep.join(dict.fromkeys([str(PROJECT_ROOT), *packages]))
        env.setdefault("OMP_NUM_THREADS", "1")  # stubs share the CPU with each other and ORT
        if self._scrubber is not None:
            env["LD_PRELOAD"] = os.pathsep.join(filter(None, [str(self._scrubber), env.get("LD_PRELOAD")]))
            env["FER_TRITON_KEY_FILE"] = str(self.repository.root.parent / CONTROL_KEY_FILE)
        return env

    def command(self, install: TritonInstall, backend_dir: Path) -> list[str]:
        key = KEY_PLACEHOLDER if self._scrubber is not None else self.key  # the preload fills it in
        args = [
            str(install.binary), f"--model-repository={self.repository.triton_location}", f"--backend-directory={backend_dir}",
            "--model-control-mode=explicit", "--strict-model-config=true", "--exit-on-error=false",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{CONTROL_HEADER}={key}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}", "--log-verbose=0",
            # Python-backend segments named after this workspace and launch (see _remove_stale_segments).
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        if self.allow_http:
            args += [f"--http-address={self.host}", f"--http-port={self.http_port}",
                     f"--http-restricted-api={','.join(HTTP_RESTRICTED_APIS)}:{CONTROL_HEADER}={key}"]
        else:
            args += ["--allow-http=false"]
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
        self.repository.publish()  # an s3:// repository: Triton reads the bucket, not the working copy
        backend_dir = build_backend_directory(self.workspace_dir / "backends", install)
        self._scrubber = build_argv_scrubber(self.workspace_dir / "backends")
        self.http_port, self.grpc_port, self.metrics_port = (
            p or free_port(self.host) for p in self._requested_ports)
        # A port already in use would make this server exit while another one answers "ready" there
        # (and get this platform's models loaded into it): refuse before starting.
        ports = {"gRPC": self.grpc_port, "metrics": self.metrics_port}
        if self.allow_http:
            ports["HTTP"] = self.http_port
        busy = [f"{name} {self.host}:{port}" for name, port in ports.items() if port_in_use(self.host, port)]
        if busy:
            raise ServingError(f"port in use: {', '.join(busy)} (another server runs there; stop it or pick "
                               "other ports, 0 picks free ones)")
        _remove_stale_segments(self.workspace_dir)
        self._shm_prefix = _segment_prefix(self.workspace_dir)
        self._log_handle = open(self.log_path, "ab")
        os.chmod(self.log_path, 0o600)
        self.process = subprocess.Popen(
            self.command(install, backend_dir), stdout=self._log_handle, stderr=subprocess.STDOUT,
            env=self._environment(install), cwd=self.workspace_dir, start_new_session=True,
            umask=0o077,  # request buffers (/dev/shm segments of the Python backend) readable by us only
        )
        self._start_segment_guard()
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
        """Load (or reload) ``models`` in order over gRPC (keyed); returns ``{model: one-line error}``."""
        failures = {}
        endpoint = self.endpoint()
        try:
            for model in models:
                try:
                    endpoint.load(model)
                except ServingError as exc:
                    failures[model] = str(exc).split(" failed: ", 1)[-1]
        finally:
            endpoint.close()
        return failures

    def protect_segments(self) -> int:
        """chmod 0600 this server's Python-backend segments in ``/dev/shm``; returns how many changed.

        Why not umask alone: the Python backend creates its segments through Boost.Interprocess, which
        sets their mode explicitly (0644) after ``shm_open``, so the server's umask 077 does not reach
        them. A guard thread (:meth:`_start_segment_guard`) runs this every 0.2 s; a segment is
        therefore readable by others for at most that long after a stub starts, before it holds requests.
        """
        changed = 0
        for path in _SEGMENT_DIR.glob(f"{self._shm_prefix}*") if self._shm_prefix else ():
            with contextlib.suppress(OSError):
                if path.stat().st_mode & 0o077:
                    os.chmod(path, 0o600)
                    changed += 1
        return changed

    def _start_segment_guard(self) -> None:
        import threading

        stop = self._segment_guard_stop = threading.Event()

        def guard() -> None:
            while not stop.wait(0.2):
                self.protect_segments()

        threading.Thread(target=guard, name="triton-segment-guard", daemon=True).start()

    def owns_ports(self) -> bool:
        """True when the gRPC port's listening socket belongs to this server's process: the server
        answering there is the one started here, not another one that held the port."""
        return self.process is not None and _listens_on(self.process.pid, self.grpc_port)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        endpoint = self.endpoint()
        try:
            while True:
                if self.process is None or self.process.poll() is not None:
                    raise ServingError(f"tritonserver exited during start-up; last log lines:\n{self.log_tail()}")
                if endpoint.server_ready():
                    if not self.owns_ports():
                        raise ServingError(f"another server answers on {self.grpc_url}, not the tritonserver "
                                           "started here; stop it or pick other ports")
                    return
                if time.monotonic() > deadline:
                    raise ServingError(f"tritonserver not ready after {self.startup_timeout_s:.0f}s; "
                                       f"log: {self.log_path}")
                time.sleep(0.25)
        finally:
            endpoint.close()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def key_hidden(self) -> bool:
        """Whether the control key is hidden from ``/proc/<pid>/cmdline`` (the scrubber preload ran)."""
        return self._scrubber is not None

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
            if self._segment_guard_stop is not None:
                self._segment_guard_stop.set()
            _remove_stale_segments(self.workspace_dir, also=self._shm_prefix)
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


def _listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (Linux ``/proc``)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            for line in list(handle)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    return True
    return False


_SEGMENT_DIR = Path("/dev/shm")
_live_prefixes: set[str] = set()  # segment prefixes of the servers this process runs now
_launches = iter(range(1, 1 << 62))


def _workspace_tag(workspace_dir: Path) -> str:
    return hashlib.sha256(str(Path(workspace_dir).resolve()).encode()).hexdigest()[:10]


def _segment_prefix(workspace_dir: Path) -> str:
    """``fer<workspace hash>_<pid>_<launch>_``: whose segments these are, so leftovers can be found."""
    prefix = f"fer{_workspace_tag(workspace_dir)}_{os.getpid()}_{next(_launches)}_"
    _live_prefixes.add(prefix)
    return prefix


def _remove_stale_segments(workspace_dir: Path, also: str = "") -> list[Path]:
    """Delete the Python-backend shared-memory segments a crashed server of this workspace left
    behind: those whose launching process is gone, and those of this process's stopped servers."""
    _live_prefixes.discard(also)
    tag = f"fer{_workspace_tag(workspace_dir)}_"
    removed = []
    for path in _SEGMENT_DIR.glob(f"{tag}*") if _SEGMENT_DIR.is_dir() else ():
        parts = path.name[len(tag):].split("_")
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        pid, prefix = int(parts[0]), f"{tag}{parts[0]}_{parts[1]}_"
        stale = not _pid_alive(pid) or (pid == os.getpid() and prefix not in _live_prefixes)
        if stale:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
