"""Detect, track, crop and recognise faces on frames; stream a whole video through it with overlap.

:class:`FrameProcessor` does one frame in three steps that can run on different threads:
:meth:`~FrameProcessor.detect` (face boxes on a down-scaled grey copy, tracker ids, crops),
:meth:`~FrameProcessor.recognize` (one batched call of the recognizer for the crops of several
frames) and :meth:`~FrameProcessor.annotate` (predictions -> :class:`FaceAnnotation` in frame
pixels; called in frame order). :func:`annotate_stream` runs them as a pipeline -- a reader thread,
a detect-and-batch thread, ``in_flight`` inference calls at once and the caller's thread writing --
joined by bounded queues, so memory stays constant however long the video and detection,
inference and writing overlap.

Choices recorded here (the source method crops the detected face and predicts on it):

* **Crops follow the training framing.** Networks are trained on SynthFACS portraits whose Haar
  box is 0.674 of the picture (measured: sd 0.046, centred), so a crop is the box grown by
  ``framing`` = 1.48 about its centre, padded by edge replication at the frame border. Requests are
  then what the serving ensembles expect with face detection ``off``; with ``haar`` Triton detects
  again inside the crop, which still holds the whole face.
* **Clip networks** (``c3d_ecstfl``, ``micro_lsh``) see a sliding window of ``clip_window`` crops of
  the *same track* (resized to ``clip_size``); a window is labelled every ``clip_stride`` frames and
  the label holds for that face until the next window. Frames before a face's first full window
  carry no label (``...`` on the overlay, empty in the table).
"""

from __future__ import annotations

import collections
import math
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import cv2
import numpy as np

from fer_core.data.preprocess import FaceBox, FaceDetector, HaarFaceDetector
from fer_core.video.overlay import FaceAnnotation
from fer_core.video.source import Frame
from fer_core.video.tracker import IoUTracker, TrackedFace

__all__ = [
    "TRAINING_FRAMING",
    "PredictionLike",
    "Recognizer",
    "PipelineConfig",
    "DetectedFrame",
    "FrameProcessor",
    "StreamStats",
    "annotate_stream",
    "face_crop",
]

TRAINING_FRAMING = 1.48  # 1 / 0.674, see the module docstring


class PredictionLike(Protocol):
    """What a recognizer returns per sample (``serving.client.Prediction`` is one)."""

    label: str
    probabilities: Mapping[str, float]
    active: tuple[str, ...] | None
    valence: float | None
    arousal: float | None
    landmarks: tuple[tuple[float, float], ...] | None

    @property
    def confidence(self) -> float: ...


class Recognizer(Protocol):
    """Face crops in, predictions out.

    ``clip_window`` is ``None`` for image networks (``predict`` takes RGB uint8 crops) and the
    default number of frames per window for clip networks (``predict`` takes lists of crops).
    """

    network: str
    clip_window: int | None

    def predict(self, samples: Sequence[Any]) -> list[PredictionLike]: ...


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs of the frame pipeline.

    ``detect_width``: frames wider than this are down-scaled for detection only (0 = full size);
    ``batch_size``: faces per inference call at most; ``batch_frames``: frames per call at most (bounds
    the latency a batch adds); ``in_flight``: inference calls running at once; ``queue_size``: frames
    buffered between stages.
    """

    framing: float = TRAINING_FRAMING
    detect_width: int = 320
    batch_size: int = 16
    batch_frames: int = 4
    in_flight: int = 2
    queue_size: int = 8
    min_iou: float = 0.3
    max_missed: int = 5
    clip_window: int | None = None
    clip_stride: int = 4
    clip_size: int = 96

    def __post_init__(self) -> None:
        for name in ("batch_size", "batch_frames", "in_flight", "queue_size", "clip_stride", "clip_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.framing < 1.0:
            raise ValueError(f"framing must be >= 1, got {self.framing}")
        if self.detect_width < 0:
            raise ValueError(f"detect_width must be >= 0, got {self.detect_width}")
        if self.clip_window is not None and self.clip_window < 2:
            raise ValueError(f"clip_window must be >= 2, got {self.clip_window}")


def face_crop(rgb: np.ndarray, box: FaceBox, framing: float = TRAINING_FRAMING) -> tuple[np.ndarray, tuple[int, int]]:
    """The square crop around ``box`` grown by ``framing``, edge-padded where it leaves the frame,
    and the frame coordinates ``(x0, y0)`` of its top-left pixel."""
    side = max(int(round(max(box.w, box.h) * framing)), 1)
    cx, cy = box.x + box.w / 2.0, box.y + box.h / 2.0
    x0, y0 = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
    height, width = rgb.shape[:2]
    left, top = max(0, -x0), max(0, -y0)
    right, bottom = max(0, x0 + side - width), max(0, y0 + side - height)
    crop = rgb[max(y0, 0): min(y0 + side, height), max(x0, 0): min(x0 + side, width)]
    if left or top or right or bottom:
        crop = cv2.copyMakeBorder(crop, top, bottom, left, right, cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(crop), (x0, y0)


@dataclass
class DetectedFrame:
    """One frame after detection: its tracked faces and the samples to recognise.

    ``samples`` holds ``(track_id, sample, (x0, y0, scale), window)``: a crop (or a clip of crops),
    how its pixels map back to the frame (``frame = (x0, y0) + scale * crop``) and, for clips, the
    ``(first, last)`` frame index of the window.
    """

    frame: Frame
    faces: list[TrackedFace]
    samples: list[tuple[int, Any, tuple[float, float, float], tuple[int, int] | None]] = field(default_factory=list)
    detect_ms: float = 0.0
    read_at: float = 0.0


class FrameProcessor:
    """Detect -> track -> crop -> recognise for a sequence of frames (state: the tracker, clip windows)."""

    def __init__(self, recognizer: Recognizer, detector: FaceDetector | None = None,
                 config: PipelineConfig | None = None) -> None:
        self.recognizer = recognizer
        self.detector = detector or HaarFaceDetector(find_eyes=False)  # eyes only matter for alignment
        self.config = config or PipelineConfig()
        self.tracker = IoUTracker(self.config.min_iou, self.config.max_missed)
        window = self.config.clip_window or recognizer.clip_window
        self.clip_window: int | None = window if recognizer.clip_window is not None else None
        self._clips: dict[int, collections.deque] = {}
        self._since_window: dict[int, int] = {}
        self._held: dict[int, tuple[PredictionLike, tuple[int, int] | None, tuple[float, float, float]]] = {}

    def reset(self) -> None:
        """Forget tracks and windows (a new source)."""
        self.tracker.reset()
        self._clips.clear()
        self._since_window.clear()
        self._held.clear()

    def detect_boxes(self, rgb: np.ndarray) -> list[FaceBox]:
        """Face boxes in frame pixels, found on a copy down-scaled to ``detect_width``."""
        scale = 1.0
        small = rgb
        if self.config.detect_width and rgb.shape[1] > self.config.detect_width:
            scale = rgb.shape[1] / self.config.detect_width
            size = (self.config.detect_width, max(int(round(rgb.shape[0] / scale)), 1))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        boxes = self.detector.detect(small)
        if scale == 1.0:
            return boxes
        return [FaceBox(int(round(b.x * scale)), int(round(b.y * scale)), max(int(round(b.w * scale)), 1),
                        max(int(round(b.h * scale)), 1), b.score) for b in boxes]

    def detect(self, frame: Frame) -> DetectedFrame:
        """Boxes, ids and the samples of one frame (call in frame order: it advances the tracker)."""
        start = time.perf_counter()
        rgb = cv2.cvtColor(frame.pixels, cv2.COLOR_BGR2RGB)
        faces = self.tracker.update(self.detect_boxes(rgb))
        detected = DetectedFrame(frame, faces)
        for face in faces:
            crop, (x0, y0) = face_crop(rgb, face.box, self.config.framing)
            if self.clip_window is None:
                detected.samples.append((face.track_id, crop, (float(x0), float(y0), 1.0), None))
                continue
            size = self.config.clip_size
            frames = self._clips.setdefault(face.track_id, collections.deque(maxlen=self.clip_window))
            frames.append((frame.index, cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)))
            due = self._since_window.get(face.track_id, self.config.clip_stride - 1) + 1
            if len(frames) == self.clip_window and due >= self.config.clip_stride:
                due = 0
                clip = [f for _, f in frames]
                detected.samples.append((face.track_id, clip, (float(x0), float(y0), crop.shape[0] / size),
                                         (frames[0][0], frames[-1][0])))
            self._since_window[face.track_id] = due
        live = set(self.tracker.live_ids)
        for tid in [t for t in self._clips if t not in live]:
            self._clips.pop(tid, None)
            self._since_window.pop(tid, None)
        detected.detect_ms = (time.perf_counter() - start) * 1e3
        return detected

    def recognize(self, detected: Sequence[DetectedFrame]) -> list[list[PredictionLike]]:
        """Predictions for the samples of several frames, in one call of the recognizer."""
        samples = [s[1] for d in detected for s in d.samples]
        flat = self.recognizer.predict(samples) if samples else []
        if len(flat) != len(samples):
            raise RuntimeError(f"recognizer returned {len(flat)} predictions for {len(samples)} samples")
        out, i = [], 0
        for d in detected:
            out.append(flat[i: i + len(d.samples)])
            i += len(d.samples)
        return out

    def annotate(self, detected: DetectedFrame, predictions: Sequence[PredictionLike]) -> list[FaceAnnotation]:
        """The faces of a frame with their labels (call in frame order: clip labels carry forward)."""
        for (tid, _, mapping, window), prediction in zip(detected.samples, predictions):
            self._held[tid] = (prediction, window, mapping)
        live = set(self.tracker.live_ids)
        for tid in [t for t in self._held if t not in live]:
            del self._held[tid]
        out = []
        for face in detected.faces:
            box = (face.box.x, face.box.y, face.box.w, face.box.h)
            held = self._held.get(face.track_id)
            if held is None:
                out.append(FaceAnnotation(face.track_id, box, face.box.score))
                continue
            p, window, (x0, y0, scale) = held
            landmarks = None
            if p.landmarks is not None and window is None:  # clip networks predict no landmarks
                landmarks = tuple((x0 + scale * x, y0 + scale * y) for x, y in p.landmarks)
            out.append(FaceAnnotation(
                face.track_id, box, face.box.score, p.label, float(p.confidence), dict(p.probabilities), p.active,
                p.valence, p.arousal, landmarks, window))
        return out

    def process(self, frame: Frame) -> list[FaceAnnotation]:
        """All three steps for one frame, synchronously (the live window uses this)."""
        detected = self.detect(frame)
        return self.annotate(detected, self.recognize([detected])[0])


@dataclass
class StreamStats:
    """Counts and timings of :func:`annotate_stream` (latency: frame read -> annotations ready)."""

    frames: int = 0
    faces: int = 0
    seconds: float = 0.0
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20000))

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        if not self.latencies_ms:
            return math.nan
        return float(np.percentile(np.fromiter(self.latencies_ms, float), q))


_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def annotate_stream(frames: Iterable[Frame], processor: FrameProcessor,
                    on_frame: Callable[[Frame, list[FaceAnnotation]], None]) -> StreamStats:
    """Run every frame through ``processor`` with the stages overlapping; ``on_frame`` is called in
    frame order on the caller's thread (draw, write). The first error of any stage stops the others
    and is raised here."""
    config = processor.config
    stop = threading.Event()
    read_q: queue.Queue = queue.Queue(maxsize=config.queue_size)
    batch_q: queue.Queue = queue.Queue(maxsize=config.in_flight)
    executor = ThreadPoolExecutor(max_workers=config.in_flight, thread_name_prefix="fer-infer")
    stats = StreamStats()

    def reader() -> None:
        try:
            for frame in frames:
                if not _put(read_q, (frame, time.perf_counter()), stop):
                    return
            _put(read_q, _END, stop)
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread
            _put(read_q, _Failed(exc), stop)

    def batcher() -> None:
        try:
            done = False
            while not done and not stop.is_set():
                try:
                    item = read_q.get(timeout=0.1)
                except queue.Empty:
                    continue
                batch: list[DetectedFrame] = []
                samples = 0
                while True:
                    if item is _END or isinstance(item, _Failed):
                        done = True
                        break
                    frame, read_at = item
                    detected = processor.detect(frame)
                    detected.read_at = read_at
                    batch.append(detected)
                    samples += len(detected.samples)
                    if samples >= config.batch_size or len(batch) >= config.batch_frames:
                        break
                    try:  # take more only while frames are already waiting: never wait to fill a batch
                        item = read_q.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    future = executor.submit(processor.recognize, batch)
                    if not _put(batch_q, (batch, future), stop):
                        return
                if done:
                    _put(batch_q, item, stop)
        except BaseException as exc:  # noqa: BLE001
            _put(batch_q, _Failed(exc), stop)

    threads = [threading.Thread(target=reader, name="fer-read", daemon=True),
               threading.Thread(target=batcher, name="fer-detect", daemon=True)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    try:
        while True:
            item = batch_q.get()
            if item is _END:
                break
            if isinstance(item, _Failed):
                raise item.exc
            batch, future = item
            for detected, predictions in zip(batch, future.result()):
                faces = processor.annotate(detected, predictions)
                on_frame(detected.frame, faces)
                stats.frames += 1
                stats.faces += len(faces)
                stats.latencies_ms.append((time.perf_counter() - detected.read_at) * 1e3)
    finally:
        stop.set()
        stats.seconds = time.perf_counter() - start
        for t in threads:
            t.join(timeout=5.0)
        executor.shutdown(wait=True, cancel_futures=True)
    return stats
