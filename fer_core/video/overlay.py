"""The recognition overlay: a green box around each face, its English label and probability above it,
and -- for networks with more outputs -- active AUs, valence/arousal and landmarks.

Drawn with OpenCV on BGR frames (what ``cv2.VideoCapture`` gives and ``cv2.VideoWriter`` takes),
so ``fer annotate``'s video and ``fer app``'s window show the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import cv2
import numpy as np

__all__ = ["BOX_COLOUR", "FaceAnnotation", "draw_faces", "draw_status", "display_label"]

BOX_COLOUR = (0, 255, 0)  # green, the method's colour (same in BGR and RGB)
_TEXT_COLOUR = (0, 0, 0)
_EXTRA_COLOUR = (255, 255, 0)  # cyan in BGR: AUs, V/A, landmarks
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class FaceAnnotation:
    """One face on one frame: its track id, box ``(x, y, w, h)`` in frame pixels and what the network said.

    ``label`` is ``None`` while a clip network has not yet seen a full window of this face.
    ``landmarks`` are ``(x, y)`` in frame pixels; ``window`` is the ``(first, last)`` frame index of
    the clip a clip network labelled.
    """

    track_id: int
    box: tuple[int, int, int, int]
    score: float = 1.0
    label: str | None = None
    confidence: float = float("nan")
    probabilities: Mapping[str, float] = field(default_factory=dict)
    active: tuple[str, ...] | None = None
    valence: float | None = None
    arousal: float | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None
    window: tuple[int, int] | None = None


def display_label(face: FaceAnnotation) -> str:
    """What is written above the box: ``"happy 0.93"``; AU networks write their active AUs."""
    if face.label is None:
        return "..."
    if face.active is not None:
        return ("+".join(face.active) or "no AU") + f" {face.confidence:.2f}"
    return f"{face.label} {face.confidence:.2f}"


def _text(frame: np.ndarray, text: str, origin: tuple[int, int], scale: float, background: tuple[int, int, int]) -> None:
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, 1)
    x, y = origin
    y = max(y, th + base)
    cv2.rectangle(frame, (x, y - th - base), (x + tw + 2, y + 1), background, cv2.FILLED)
    cv2.putText(frame, text, (x + 1, y - base // 2), _FONT, scale, _TEXT_COLOUR, 1, cv2.LINE_AA)


def draw_faces(frame: np.ndarray, faces: Sequence[FaceAnnotation]) -> np.ndarray:
    """Draw every face's box and labels onto ``frame`` (uint8 BGR, in place); returns ``frame``."""
    height = frame.shape[0]
    scale = max(0.4, min(0.8, height / 800))
    for face in faces:
        x, y, w, h = face.box
        cv2.rectangle(frame, (x, y), (x + w, y + h), BOX_COLOUR, 2)
        _text(frame, f"#{face.track_id} {display_label(face)}", (x, y - 3), scale, BOX_COLOUR)
        lines = []
        if face.valence is not None and face.arousal is not None:
            lines.append(f"V {face.valence:+.2f} A {face.arousal:+.2f}")
        if face.active is not None and face.label is not None:
            top = sorted(face.probabilities.items(), key=lambda kv: -kv[1])[:3]
            lines.append(" ".join(f"{k}:{v:.2f}" for k, v in top))
        for i, line in enumerate(lines):
            (_, th), base = cv2.getTextSize(line, _FONT, scale * 0.85, 1)
            _text(frame, line, (x, y + h + (i + 1) * (th + base + 3)), scale * 0.85, _EXTRA_COLOUR)
        if face.landmarks:
            for px, py in face.landmarks:
                cv2.circle(frame, (int(round(px)), int(round(py))), 1, _EXTRA_COLOUR, cv2.FILLED)
    return frame


def draw_status(frame: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Status lines (FPS, latency, source) in the top-left corner, white on black."""
    scale = max(0.4, min(0.6, frame.shape[0] / 900))
    y = 0
    for line in lines:
        (tw, th), base = cv2.getTextSize(line, _FONT, scale, 1)
        y += th + base + 4
        cv2.rectangle(frame, (0, y - th - base - 2), (tw + 6, y + 2), (0, 0, 0), cv2.FILLED)
        cv2.putText(frame, line, (3, y - base // 2), _FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return frame
