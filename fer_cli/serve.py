"""``fer serve`` (run or check a Triton serving the model repository) and ``fer infer`` (ask it).

``fer serve`` starts the embedded ``tritonserver`` on 127.0.0.1 over the workspace's model
repository (``$FER_HOME/triton/models``), loads every network and ensemble in it, prints the
endpoints and supervises the server until Ctrl-C: when the process dies it is restarted on the
same ports and the models are loaded again; every ``--reconcile-interval`` seconds what Triton
serves is compared with the repository and repaired (alerts go to stderr and to ``fer models``).
It refuses busy ports and a second ``fer serve`` of the same workspace, records itself in
``triton/serve.json`` for ``fer promote``/``fer rollback``/``fer models`` (:mod:`serving.live`) and
first finishes any promotion a killed ``fer promote`` left half done (its journal).
Model control needs the workspace's key; HTTP is off unless ``--http``. ``fer serve --url URL``
checks an external Triton instead (e.g. NVIDIA's container over the same repository): it must list
this repository's models in its index.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fer_cli.main import EXIT_ERROR, EXIT_SERVICE, CommandError

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
_VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve the model repository with Triton (embedded), or check an external one",
        description="Start the embedded Triton (loopback only) over the workspace's model repository, "
        "load every network and its ensemble, and keep it running (restarted if it dies) until Ctrl-C.",
    )
    p.add_argument("--repository", type=Path, default=None,
                   help="model repository (default: $FER_HOME/triton/models)")
    p.add_argument("--url", default=None,
                   help="check/use an external Triton at grpc://HOST:PORT or http://HOST:PORT instead")
    p.add_argument("--host", default=None,
                   help="bind address (default: FER_BIND_HOST, else 127.0.0.1; expose with care, see README)")
    p.add_argument("--http-port", type=int, default=8000, help="with --http; 0 picks a free port")
    p.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port")
    p.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port")
    p.add_argument("--check-interval", type=float, default=2.0, help="seconds between liveness checks")
    p.add_argument("--reconcile-interval", type=float, default=10.0,
                   help="seconds between comparisons of what Triton serves with the repository (default 10)")
    p.add_argument("--http", action="store_true",
                   help="also serve HTTP (every HTTP API then needs the workspace's control key: Triton 2.51 "
                   "aborts on an HTTP/JSON request with an absurd shape, so HTTP is for the platform's clients)")
    p.add_argument("--duration", type=float, default=None, help=argparse.SUPPRESS)  # tests: stop after N s
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "infer", help="predict expressions for an image, a folder of images or a video",
        description="Send pictures to a running Triton (see `fer serve`) and print the predictions. "
        "Image networks: an image file, a folder of images or each frame of a video. Video networks "
        "(c3d_ecstfl, micro_lsh): a video file or a folder of frames is one clip.",
    )
    p.add_argument("input", type=Path, help="image file, folder or video file")
    p.add_argument("--network", default="ca_resnet")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton address (grpc://... or http://...)")
    p.add_argument("--protocol", choices=("grpc", "http"), default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-frames", type=int, default=300, help="frames read from a video at most")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (one object per input, "
                   "with its \"file\")")
    p.add_argument("--chunk", type=int, default=256, help=argparse.SUPPRESS)  # files read and sent per chunk
    p.set_defaults(func=_infer)


def _serve(args: argparse.Namespace) -> int:
    from fer_platform.workspace import Workspace
    from serving.live import clear_live, find_live
    from serving.repository import ModelRepository
    from serving.server import EmbeddedTriton, ServingError, supervise

    workspace = Workspace.load().ensure()  # this command's platform context
    repository = ModelRepository.of_workspace(workspace) if not args.repository else \
        ModelRepository(args.repository, face_detection=workspace.face_detection_override,
                        tuning_env=workspace.settings.serving_tuning)
    if args.url:
        return _check_external(args.url, repository)
    repository.root.mkdir(parents=True, exist_ok=True)
    live, _ = find_live(repository)
    if live is not None:
        raise CommandError(f"`fer serve` (pid {live.pid}) already serves this workspace at {live.grpc_url}; "
                           "stop it first (one server per workspace)", EXIT_ERROR)
    _replay_journals(repository, workspace, endpoint=None)
    host = args.host or workspace.settings.bind_host
    server = EmbeddedTriton(repository, workspace.root / "triton", host=host, http_port=args.http_port,
                            grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                            models=repository.load_order(), allow_http=args.http)
    try:
        server.start(strict=False)
    except ServingError as exc:
        raise CommandError(str(exc).splitlines()[0], EXIT_ERROR) from None
    alerts: list[str] = []
    from serving.live import add_alerts, reconcile, write_live

    try:
        write_live(repository, server)
        _report_start(server, repository, repository.load_order())
        deadline = None if args.duration is None else time.monotonic() + args.duration
        last = [time.monotonic()]

        def tick() -> bool:
            """supervise's should_stop: also runs the reconciliation every --reconcile-interval."""
            if deadline is not None and time.monotonic() >= deadline:
                return True
            if server.running and time.monotonic() - last[0] >= args.reconcile_interval:
                last[0] = time.monotonic()
                messages = _reconcile_once(server, repository, workspace, reconcile)
                for message in messages:  # each is a deviation from the repository: worth an alert
                    print(f"reconcile: {message}", file=sys.stderr, flush=True)
                if messages:
                    add_alerts(repository, server, alerts, messages)
            return False

        def restarted(s) -> None:
            write_live(repository, s, tuple(alerts))
            _report_start(s, repository, repository.load_order())

        supervise(server, check_interval_s=args.check_interval, should_stop=tick, on_restart=restarted,
                  on_failure=lambda message: print(message, file=sys.stderr, flush=True))
    finally:
        server.stop()
        clear_live(repository)
    return 0


def _check_external(url: str, repository) -> int:
    """``fer serve --url``: the server must be reachable, ready, and serve this repository's models
    (checked by its repository index: a server that lists none of them is another one)."""
    from serving.server import ServingError, TritonEndpoint, control_key

    endpoint = TritonEndpoint(url, key=control_key(repository.root.parent))
    if not endpoint.server_live():
        raise CommandError(f"Triton at {endpoint.url} is unreachable", EXIT_SERVICE)
    try:  # a live server reports "not ready" for a moment while a model version unloads
        endpoint.wait_ready(timeout_s=30.0)
        index = endpoint.index()
    except ServingError as exc:
        if "restricted" in str(exc):
            raise CommandError(f"Triton at {endpoint.url} refuses this workspace's control key: it is not this "
                               "workspace's server (or was started with another key)", EXIT_ERROR) from None
        raise CommandError(str(exc), EXIT_SERVICE) from None
    expected = set(repository.models())
    listed = {m.get("name") for m in index}
    if expected and not expected <= listed:
        missing = ", ".join(sorted(expected - listed))
        raise CommandError(f"Triton at {endpoint.url} does not serve this repository ({repository.root}): its index "
                           f"lacks {missing}", EXIT_ERROR)
    print(f"Triton at {endpoint.url} is ready")
    _print_index(index)
    return 0


def _replay_journals(repository, workspace, endpoint) -> None:
    """Finish or discard promotions a killed ``fer promote``/``fer rollback`` left half done."""
    journals = list((workspace.root / "locks").glob("promote-*.journal"))
    if not journals:
        return
    from registry.promotion import PromotionBusy, promotion_lock, replay_journal

    for path in journals:
        network = path.name[len("promote-"):-len(".journal")]
        try:
            with promotion_lock(network, workspace):
                message = replay_journal(network, workspace=workspace, repository=repository, endpoint=endpoint)
        except PromotionBusy:
            continue  # a promotion runs right now; it replays the journal itself
        if message:
            print(f"journal: {message}", flush=True)


def _registry_champions(repository, workspace) -> dict[str, int | None]:
    """The registry's champion per network, or {} when the registry cannot be read."""
    if not workspace.mlflow_db.exists():
        return {}
    try:
        from registry import models as reg

        out = {}
        for network in repository.networks():
            champion = reg.get_alias(network, "champion", workspace)
            out[network] = champion.version if champion is not None else None
        return out
    except Exception:  # noqa: BLE001 -- the registry is advisory here: an unreadable one is skipped
        return {}


def _reconcile_once(server, repository, workspace, reconcile) -> list[str]:
    from serving.server import ServingError

    busy = _busy_networks(repository, workspace)
    endpoint = server.endpoint()
    try:
        return reconcile(endpoint, repository, _registry_champions(repository, workspace), skip=busy)
    except ServingError as exc:
        return [f"ALERT reconciliation failed: {exc}"]
    finally:
        endpoint.close()


def _busy_networks(repository, workspace) -> list[str]:
    """Networks whose promotion lock is held (a promotion is changing them now), read from the lock
    file's holder line rather than by trying the lock, so this probe never makes a promotion busy."""
    from serving.server import _pid_alive

    busy = []
    for network in repository.networks():
        path = workspace.root / "locks" / f"promote-{network}.lock"
        try:
            holder = path.read_text().split()
        except OSError:
            continue
        if len(holder) >= 2 and holder[0] == "pid" and holder[1].isdigit() and _pid_alive(int(holder[1])):
            busy.append(network)
    return busy


def _report_start(server, repository, models: list[str]) -> None:
    print(f"Triton serving {repository.root}")
    print(f"  gRPC     {server.grpc_url}")
    print(f"  HTTP     {server.http_url + ' (control key required)' if server.allow_http else 'off (--http turns it on)'}")
    print(f"  metrics  {server.metrics_url}")
    print(f"  log      {server.log_path}")
    loaded = [m for m in models if m not in server.load_failures]
    print(f"  loaded   {', '.join(loaded) if loaded else 'nothing (the repository is empty)'}")
    for model, error in server.load_failures.items():
        print(f"  FAILED   {model}: {error}", file=sys.stderr)
    if not server.key_hidden:
        print("  warning  no C compiler: the control key is visible in tritonserver's command line to local "
              "users (see serving/server.py)", file=sys.stderr)
    print("Ctrl-C stops the server.", flush=True)


def _print_index(index: list[dict]) -> None:
    if not index:
        print("  no models in its repository")
    for entry in index:
        print(f"  {entry.get('name', '?'):32s} v{entry.get('version', '-'):>4s}  {entry.get('state', 'not loaded')}")


def _inputs(path: Path, video_network: bool, max_frames: int) -> tuple[list, list[str]]:
    """(inputs for FERClient.predict, their display names)."""
    from serving.client import read_clip_frames

    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if video_network:
        return [read_clip_frames(path, max_frames)], [str(path)]
    if path.is_dir():
        # Recursive, hidden folders skipped; sorted by relative path so the order is stable everywhere.
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"{path} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        return files, [p.relative_to(path).as_posix() for p in files]
    if path.suffix.lower() in _VIDEO_SUFFIXES:
        frames = read_clip_frames(path, max_frames)
        return frames, [f"{path.name}#{i}" for i in range(len(frames))]
    return [path], [path.name]


def _infer(args: argparse.Namespace) -> int:
    import json

    from serving.client import FERClient, ServingError
    from serving.ensembles.processing import is_video_network

    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")

    from fer_platform.workspace import Workspace
    from serving.server import CONTROL_KEY_FILE

    key_file = Workspace.load().triton_repository.parent / CONTROL_KEY_FILE
    key = key_file.read_text().strip() if key_file.is_file() else None  # HTTP needs it; gRPC inference does not
    count, inputs = 0, []
    try:
        client = FERClient(args.url, protocol=args.protocol or ("http" if args.url.startswith("http://") else "grpc"),
                           batch_size=args.batch_size, key=key)
        metadata = client._network(args.network)[0]
        inputs, names = _inputs(args.input, is_video_network(metadata), args.max_frames)
        start = time.perf_counter()
        if not args.json:
            print(f"{'input':32s} {'label':12s} {'conf':>6s}  face  extras")
        count = 0
        # Files are read and sent a chunk at a time and printed as they come, so a large folder
        # neither sits in memory nor shows nothing until the end. JSON stays one array.
        for offset in range(0, len(inputs), args.chunk):
            chunk = client.predict(inputs[offset:offset + args.chunk], network=args.network)
            for name, p in zip(names[offset:offset + args.chunk], chunk):
                if args.json:
                    print(("[" if count == 0 else ",") + "\n" + json.dumps({"file": name, **p.to_dict()}), end="")
                else:
                    _print_row(name, p)
                count += 1
            sys.stdout.flush()
        seconds = time.perf_counter() - start
    except ServingError as exc:
        if args.json and count:
            print("\n]")  # what was printed stays parseable; the exit code and stderr say it is partial
        done = f" (stopped after {count} of {len(inputs)} inputs; those are printed)" if count else ""
        raise CommandError(f"{exc}{done}", EXIT_ERROR) from None
    if args.json:
        print("\n]" if count else "[]")
        return 0
    print(f"{count} prediction(s) from {args.network} at {client.url} in {seconds:.2f}s")
    return 0


def _print_row(name: str, p) -> None:
    """One table row of `fer infer`."""
    extras = []
    if p.active is not None:
        extras.append("AUs " + ("+".join(p.active) or "none"))
    if p.valence is not None:
        extras.append(f"valence {p.valence:+.2f} arousal {p.arousal:+.2f}")
    if p.landmarks is not None:
        extras.append(f"{len(p.landmarks)} landmarks")
    print(f"{name[:32]:32s} {p.label[:12]:12s} {p.confidence:6.3f}  {'yes' if p.face_found else 'no ':4s}  "
          f"{'; '.join(extras)}")
