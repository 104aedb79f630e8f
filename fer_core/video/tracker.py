"""Greedy IoU tracking: a face keeps its box id from frame to frame.

The simplest tracker that serves an overlay: each new detection is matched to the live track whose
last box overlaps it most (IoU >= ``min_iou``, best pairs first); unmatched detections start new
tracks, and a track unseen for more than ``max_missed`` frames is dropped. Ids are never reused.
Ambiguity recorded: a track missed for a frame or two is *not* drawn on those frames (no motion
model guesses where it went); it only keeps its id when the face is found again nearby.
"""

from __future__ import annotations

from dataclasses import dataclass

from fer_core.data.preprocess import FaceBox

__all__ = ["TrackedFace", "IoUTracker", "iou"]


def iou(a: FaceBox, b: FaceBox) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    x0, y0 = max(a.x, b.x), max(a.y, b.y)
    x1, y1 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class TrackedFace:
    """A detection of this frame with the id of the track it belongs to."""

    track_id: int
    box: FaceBox


class IoUTracker:
    """Assigns stable ids to face boxes over consecutive frames (see the module docstring)."""

    def __init__(self, min_iou: float = 0.3, max_missed: int = 5) -> None:
        if not 0.0 < min_iou <= 1.0:
            raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
        if max_missed < 0:
            raise ValueError(f"max_missed must be >= 0, got {max_missed}")
        self.min_iou = min_iou
        self.max_missed = max_missed
        self._tracks: dict[int, tuple[FaceBox, int]] = {}  # id -> (last box, frames missed)
        self._next_id = 1

    @property
    def live_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._tracks))

    def reset(self) -> None:
        self._tracks.clear()

    def update(self, boxes: list[FaceBox]) -> list[TrackedFace]:
        """Match this frame's ``boxes``; returns them with track ids, in the order given."""
        pairs = sorted(((iou(track_box, box), tid, i) for tid, (track_box, _) in self._tracks.items()
                        for i, box in enumerate(boxes)), reverse=True)
        assigned: dict[int, int] = {}  # detection index -> track id
        used: set[int] = set()
        for overlap, tid, i in pairs:
            if overlap < self.min_iou:
                break
            if tid in used or i in assigned:
                continue
            assigned[i] = tid
            used.add(tid)
        for tid in list(self._tracks):
            if tid not in used:
                box, missed = self._tracks[tid]
                if missed + 1 > self.max_missed:
                    del self._tracks[tid]
                else:
                    self._tracks[tid] = (box, missed + 1)
        out = []
        for i, box in enumerate(boxes):
            tid = assigned.get(i)
            if tid is None:
                tid, self._next_id = self._next_id, self._next_id + 1
            self._tracks[tid] = (box, 0)
            out.append(TrackedFace(tid, box))
        return out
