"""Frame sources: a camera index (``"0"``), a video file or a stream URL, read with ``cv2.VideoCapture``.

Every failure is a :class:`VideoSourceError` with a one-line reason. A camera or stream that stops
delivering frames is reopened ``reconnects`` times before it counts as dropped; a file simply ends.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

# FFmpeg inside OpenCV prints its own multi-line complaints ("moov atom not found") for unreadable
# input; VideoSourceError says it in one line instead. Read when a capture opens; a user's value wins.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

__all__ = ["VideoSourceError", "Frame", "VideoSource", "is_stream"]

_STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://")


class VideoSourceError(RuntimeError):
    """A source that cannot be opened, read, or that dropped."""


@dataclass(frozen=True)
class Frame:
    """One frame: its index from 0, its time in seconds from the start, and BGR pixels."""

    index: int
    time_s: float
    pixels: np.ndarray


def is_stream(spec: str) -> bool:
    return spec.isdigit() or spec.lower().startswith(_STREAM_PREFIXES)


def _describe(spec: str) -> str:
    return f"camera {spec}" if spec.isdigit() else (f"stream {spec}" if is_stream(spec) else f"video {spec}")


class VideoSource:
    """An opened source; iterate it for :class:`Frame` objects (``max_frames`` caps a live source)."""

    def __init__(self, spec: str | int, reconnects: int = 3, reconnect_wait_s: float = 0.5) -> None:
        self.spec = str(spec)
        self.live = is_stream(self.spec)
        self.reconnects = reconnects
        self.reconnect_wait_s = reconnect_wait_s
        if not self.live and not Path(self.spec).is_file():
            raise VideoSourceError(f"video {self.spec} does not exist")
        self._capture = self._open()
        fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        # Cameras and some streams report 0 or nonsense; 30 is what a webcam usually delivers.
        self.fps = fps if 1.0 <= fps <= 240.0 else 30.0
        self.frame_count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if not self.live else 0
        self.width = int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        self.height = int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        self._index = 0
        self._t0 = time.monotonic()

    @property
    def description(self) -> str:
        return _describe(self.spec)

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(int(self.spec) if self.spec.isdigit() else self.spec)
        if not capture.isOpened():
            capture.release()
            what = "no such camera, or it is in use" if self.spec.isdigit() else "not a readable video"
            raise VideoSourceError(f"cannot open {_describe(self.spec)}: {what}")
        return capture

    def read(self) -> Frame | None:
        """The next frame; ``None`` at the end of a file. ``VideoSourceError`` when a live source drops
        (after its reconnects) or a file yields no frame at all."""
        ok, pixels = self._capture.read()
        attempts = 0
        while not ok and self.live and attempts < self.reconnects:
            attempts += 1
            time.sleep(self.reconnect_wait_s)
            self._capture.release()
            try:
                self._capture = self._open()
            except VideoSourceError:
                continue
            ok, pixels = self._capture.read()
        if not ok:
            if self.live:
                raise VideoSourceError(f"{self.description} dropped after frame {self._index} "
                                       f"({self.reconnects} reconnects failed)")
            if self._index == 0:
                raise VideoSourceError(f"cannot decode any frame of {self.description}")
            return None
        if pixels.ndim == 2:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
        # Files: presentation time from the frame rate (monotonic, unlike some containers' timestamps);
        # live sources: wall-clock time since opening.
        time_s = self._index / self.fps if not self.live else time.monotonic() - self._t0
        frame = Frame(self._index, time_s, pixels)
        self._index += 1
        return frame

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.read()) is not None:
            yield frame

    def close(self) -> None:
        self._capture.release()

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
