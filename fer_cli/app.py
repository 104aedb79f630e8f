"""``fer app`` (the static method's real-time camera window) and ``fer annotate`` (the same overlay
written to a video plus a per-frame table, for servers without a screen).

Both recognise through Triton when ``--url`` is given (the champion's ensemble), else locally with
ONNX Runtime on ``--model FILE.onnx`` or on the registry's champion of ``--network``. Qt is imported
only by ``fer app`` (PySide6, see :mod:`fer_cli.app_window`), so ``fer --help`` stays fast.

Exit codes of ``fer annotate``: 0 done; 1 the run failed (server error, a stream that dropped);
2 bad input (unreadable video, no model, bad options). On failure no output is left under its
final name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fer_cli.main import EXIT_ERROR, EXIT_USAGE, CommandError


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--url", default=None, help="Triton to ask (grpc://HOST:PORT or http://HOST:PORT); "
                   "without it the model runs locally with ONNX Runtime")
    g.add_argument("--network", default="ca_resnet", help="network (default ca_resnet)")
    g.add_argument("--model", default=None, help="local run: an .onnx file (or a folder holding model.onnx) "
                   "instead of the registry's champion")
    g.add_argument("--alias", default="champion", help="local run: registry alias to fetch (default champion)")
    g.add_argument("--face-detection", choices=("off", "haar"), default=None,
                   help="local run: detection inside each crop, as the serving setting (default: FER_FACE_DETECTION)")
    g = p.add_argument_group("pipeline")
    g.add_argument("--detect-width", type=int, default=320, help="detect faces on frames scaled to this width (0 = full)")
    g.add_argument("--batch-size", type=int, default=16, help="faces per inference request at most")
    g.add_argument("--clip-window", type=int, default=None, help="clip networks: frames per sliding window")
    g.add_argument("--clip-stride", type=int, default=4, help="clip networks: label a window every N frames")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app", help="real-time recognition window: camera, video file or stream, boxes and labels",
        description="Open the desktop window of the static method: open camera, select a face image, take a "
        "photo and recognise, close camera. Every face is boxed in green and labelled with its probability; "
        "AUs, valence/arousal and landmarks are drawn for networks that predict them. Needs a display (X11).",
    )
    p.add_argument("--source", default="0", help="camera index, video file or stream URL (default 0)")
    p.add_argument("--open", action="store_true", help="open the source at start")
    p.add_argument("--photos", type=Path, default=None, help="where 'take a photo' saves (default $FER_HOME/app/photos)")
    _add_model_options(p)
    p.add_argument("--screenshot", type=Path, default=None, help=argparse.SUPPRESS)  # README: save window, quit
    p.add_argument("--screenshot-after", type=float, default=3.0, help=argparse.SUPPRESS)
    p.set_defaults(func=_app)

    p = sub.add_parser(
        "annotate", help="write a video with the recognition overlay and a per-frame table (no screen needed)",
        description="Run every frame of VIDEO through face detection, tracking and the network; write OUT.mp4 "
        "with the overlay and a per-frame table (py-feat Fex column names) beside it. Frames are streamed and "
        "requests batched and pipelined, so memory stays flat however long the video. Exit 1: the run failed; "
        "2: bad input. Nothing is left under the final names on failure.",
    )
    p.add_argument("video", help="video file, camera index or stream URL")
    p.add_argument("-o", "--output", type=Path, required=True, help="annotated video (.mp4)")
    p.add_argument("--table", type=Path, default=None, help="per-frame table, .csv or .parquet (default: OUT.csv)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after N frames (live sources)")
    p.add_argument("--in-flight", type=int, default=2, help="inference requests running at once")
    _add_model_options(p)
    p.set_defaults(func=_annotate)


def build_recognizer(args: argparse.Namespace):
    """The Triton or local recognizer the options ask for (errors: ``CommandError``/``ValueError``)."""
    if args.url:
        from serving.client import ServingError
        from serving.recognizers import TritonRecognizer

        try:
            return TritonRecognizer(args.url, args.network, batch_size=args.batch_size)
        except ServingError as exc:
            raise CommandError(str(exc), EXIT_ERROR) from None
    from fer_platform.workspace import Workspace
    from serving.recognizers import OnnxRecognizer

    from registry.local_model import resolve_local_model  # imports MLflow only to fetch from the registry

    workspace = Workspace.load()  # this command's platform context
    path = resolve_local_model(args.model, args.network, args.alias, workspace=workspace)
    return OnnxRecognizer(path, face_detection=args.face_detection or workspace.settings.face_detection)


def pipeline_config(args: argparse.Namespace, in_flight: int = 2):
    from fer_core.video.pipeline import PipelineConfig

    return PipelineConfig(detect_width=args.detect_width, batch_size=args.batch_size, in_flight=in_flight,
                          clip_window=args.clip_window, clip_stride=args.clip_stride)


def _annotate(args: argparse.Namespace) -> int:
    from fer_core.video.output import AnnotatedVideoWriter, FexTableWriter
    from fer_core.video.overlay import draw_faces
    from fer_core.video.pipeline import FrameProcessor, annotate_stream
    from fer_core.video.source import VideoSource, VideoSourceError

    if args.output.suffix.lower() != ".mp4":
        raise CommandError(f"--output must end in .mp4, got {args.output}", EXIT_USAGE)
    table_path = args.table or args.output.with_suffix(".csv")
    if table_path.suffix.lower() not in (".csv", ".parquet"):
        raise CommandError(f"--table must end in .csv or .parquet, got {table_path}", EXIT_USAGE)
    if args.max_frames is not None and args.max_frames < 1:
        raise CommandError("--max-frames must be >= 1", EXIT_USAGE)
    config = pipeline_config(args, args.in_flight)
    try:
        source = VideoSource(args.video)
    except VideoSourceError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    recognizer = build_recognizer(args)
    video = table = None
    try:
        processor = FrameProcessor(recognizer, config=config)
        first = source.read()  # the writer needs the frame size; a file without frames fails here
        if first is None:
            raise VideoSourceError(f"{source.description} has no frames")
        size = (first.pixels.shape[1], first.pixels.shape[0])
        video = AnnotatedVideoWriter(args.output, source.fps, size)
        table = FexTableWriter(table_path, recognizer.layout(), str(args.video))

        def frames():
            yield first
            count = 1
            while args.max_frames is None or count < args.max_frames:
                frame = source.read()
                if frame is None:
                    return
                count += 1
                yield frame

        def on_frame(frame, faces) -> None:
            video.write(draw_faces(frame.pixels, faces))
            table.write_frame(frame.index, frame.time_s, faces)

        stats = annotate_stream(frames(), processor, on_frame)
        video.commit()
        table.commit()
    except VideoSourceError as exc:
        _abort(video, table)
        raise CommandError(str(exc), EXIT_ERROR) from None
    except BaseException as exc:
        _abort(video, table)
        from serving.client import ServingError

        if isinstance(exc, ServingError):
            raise CommandError(str(exc), EXIT_ERROR) from None
        raise
    finally:
        source.close()
        recognizer.close()
    print(f"annotated {stats.frames} frames ({stats.faces} faces) with {recognizer.network} via {recognizer.where} "
          f"in {stats.seconds:.1f}s: {stats.fps:.1f} FPS, latency p50 {stats.latency_ms(50):.0f} ms "
          f"p95 {stats.latency_ms(95):.0f} ms")
    print(f"  video  {args.output}")
    print(f"  table  {table_path} ({table.rows_written} rows)")
    return 0


def _abort(*outputs) -> None:
    for out in outputs:
        if out is not None:
            out.abort()


def _app(args: argparse.Namespace) -> int:
    try:
        from fer_cli.app_window import run_app
    except ImportError as exc:
        raise CommandError(f"fer app needs PySide6 (pip install -r requirements/app.txt): {exc}", EXIT_ERROR) from None
    recognizer = build_recognizer(args)
    try:
        return run_app(args, recognizer, pipeline_config(args))
    finally:
        recognizer.close()

