"""Generated test videos: SynthFACS faces on a 640x480 frame whose expressions change over time.

``write_synthfacs_video(path, num_faces=4, seconds=10)`` writes an MP4 (``mp4v``) with 1, 2 or 4
faces laid out in a grid; every ``segment_s`` seconds each face takes a new expression (a new
SynthFACS render of its own subject) and it drifts a few pixels, so a tracker has to follow it. It
returns the ground truth per segment: where each face is and which expression it shows, which
:func:`truth_at` looks up per frame. Frames are generated while they are written, and face
renders are drawn from a pool that is recycled, so a long video needs constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fer_core.data.labels import EXPRESSIONS
from fer_core.data.synthfacs import SynthFACS

__all__ = ["FaceTruth", "VideoTruth", "write_synthfacs_video", "truth_at"]

_LAYOUTS = {1: [(0.5, 0.5)], 2: [(0.27, 0.5), (0.73, 0.5)], 4: [(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)]}


@dataclass(frozen=True)
class FaceTruth:
    """Face ``slot`` during one segment: its tile ``(x, y, side)`` in the frame and its expression."""

    slot: int
    tile: tuple[int, int, int]
    label: str


@dataclass(frozen=True)
class VideoTruth:
    fps: float
    frame_count: int
    segment_frames: int
    size: tuple[int, int]
    segments: tuple[tuple[FaceTruth, ...], ...]  # one entry per segment, wrapping if the pool is recycled


def truth_at(truth: VideoTruth, frame_index: int) -> tuple[FaceTruth, ...]:
    return truth.segments[(frame_index // truth.segment_frames) % len(truth.segments)]


def write_synthfacs_video(path: str | Path, num_faces: int = 1, seconds: float = 5.0, fps: float = 30.0,
                          size: tuple[int, int] = (640, 480), face_side: int | None = None,
                          segment_s: float = 1.0, seed: int = 0, first_subject: int = 0,
                          pool_segments: int = 20, faceless_segments: tuple[int, ...] = ()) -> VideoTruth:
    """Write the video (see the module docstring); ``faceless_segments`` lists segments with no face."""
    if num_faces not in _LAYOUTS:
        raise ValueError(f"num_faces must be one of {sorted(_LAYOUTS)}, got {num_faces}")
    width, height = size
    side = face_side or (int(min(width, height) * (0.5 if num_faces == 1 else 0.38)) // 2 * 2)
    segment_frames = max(int(round(segment_s * fps)), 1)
    frame_count = max(int(round(seconds * fps)), 1)
    num_segments = min(-(-frame_count // segment_frames), pool_segments)
    gen = SynthFACS(seed=seed, image_size=side, difficulty=0.0)
    faces = gen.expression_set(num_segments * num_faces, num_subjects=max(num_faces, 4), first_subject=first_subject)
    segments, tiles = [], []
    rng = np.random.default_rng(seed)
    for s in range(num_segments):
        entries, images = [], []
        for slot, (fx, fy) in enumerate(_LAYOUTS[num_faces]):
            if s in faceless_segments:
                continue
            i = s * num_faces + slot
            dx, dy = rng.integers(-6, 7, 2)
            x, y = int(fx * width - side / 2 + dx), int(fy * height - side / 2 + dy)
            entries.append(FaceTruth(slot, (x, y, side), EXPRESSIONS[int(faces.labels[i])]))
            images.append(cv2.cvtColor(faces.images[i], cv2.COLOR_RGB2BGR))
        segments.append(tuple(entries))
        tiles.append(images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
    if not writer.isOpened():
        raise ValueError(f"cannot write {path}")
    try:
        background = np.full((height, width, 3), 96, dtype=np.uint8)
        for f in range(frame_count):
            s = (f // segment_frames) % num_segments
            frame = background.copy()
            for entry, tile in zip(segments[s], tiles[s]):
                x, y, _ = entry.tile
                frame[y: y + side, x: x + side] = tile
            writer.write(frame)
    finally:
        writer.release()
    return VideoTruth(float(fps), frame_count, segment_frames, (width, height), tuple(segments))
