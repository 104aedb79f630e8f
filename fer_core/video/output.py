"""What ``fer annotate`` writes: the annotated video and the per-frame table, both finished atomically.

Each output is written under a temporary name beside its final one (``.NAME.partial.SUFFIX``) and
renamed only by :meth:`commit`, so an interrupted or failed run never leaves a file that looks
finished; :meth:`abort` removes the partial file.

The table has one row per face per frame (one row with empty face columns for a frame without a
face), in the column names of py-feat's ``Fex`` so its users can read it as they read py-feat's
output: ``frame``, ``approx_time``, ``Identity`` (our track id), ``FaceRectX/Y/Width/Height``,
``FaceScore``, one probability column per class (py-feat's emotion names ``anger, disgust, fear,
happiness, sadness, surprise, neutral`` for the 7 basic expressions; ``AU01``-style names for action
units), ``valence``, ``arousal``, ``x_0..x_67`` / ``y_0..y_67`` landmarks, plus ``label``,
``confidence``, the clip window of clip networks and ``input``. CSV streams row by row; Parquet
(``.parquet``) writes a row group every ``ROW_GROUP`` rows, so memory stays bounded either way.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from fer_core.video.overlay import FaceAnnotation

__all__ = ["TableLayout", "FexTableWriter", "AnnotatedVideoWriter", "fex_column", "partial_path"]

ROW_GROUP = 2000
# py-feat's emotion column names for the platform's 7 expressions (fer_core.data.labels.EXPRESSIONS).
_PYFEAT_EMOTIONS = {"angry": "anger", "happy": "happiness", "sad": "sadness"}


def fex_column(label: str) -> str:
    """py-feat's column name for one of our class or AU names (``"happy"`` -> ``"happiness"``, ``"AU6"`` -> ``"AU06"``)."""
    if label.startswith("AU") and label[2:].isdigit():
        return f"AU{int(label[2:]):02d}"
    return _PYFEAT_EMOTIONS.get(label, label)


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")


@dataclass(frozen=True)
class TableLayout:
    """The columns a network's table needs: its labels and which extra outputs it has."""

    labels: tuple[str, ...]
    multi_label: bool = False
    valence_arousal: bool = False
    num_landmarks: int = 0
    clip: bool = False

    def columns(self) -> list[str]:
        cols = ["frame", "approx_time", "Identity", "FaceRectX", "FaceRectY", "FaceRectWidth", "FaceRectHeight",
                "FaceScore", "label", "confidence"]
        cols += [fex_column(label) for label in self.labels]
        if self.valence_arousal:
            cols += ["valence", "arousal"]
        cols += [f"x_{i}" for i in range(self.num_landmarks)] + [f"y_{i}" for i in range(self.num_landmarks)]
        if self.clip:
            cols += ["window_start", "window_end"]
        return cols + ["input"]


class _Partial:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _finish(self) -> None:
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.partial.unlink(missing_ok=True)


class FexTableWriter(_Partial):
    """Streams rows to CSV (or Parquet for a ``.parquet`` path); :meth:`commit` publishes the file."""

    def __init__(self, path: str | Path, layout: TableLayout, input_name: str) -> None:
        super().__init__(path)
        self.layout = layout
        self.input_name = input_name
        self.columns = layout.columns()
        self.rows_written = 0
        self.parquet = self.path.suffix.lower() == ".parquet"
        self._buffer: list[list[Any]] = []
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            types = {"frame": pa.int64(), "Identity": pa.int64(), "label": pa.string(), "input": pa.string(),
                     "window_start": pa.int64(), "window_end": pa.int64()}
            self._schema = pa.schema([(c, types.get(c, pa.float64())) for c in self.columns])
            self._pq_writer = pq.ParquetWriter(str(self.partial), self._schema)
        else:
            self._file = open(self.partial, "w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._file)
            self._csv.writerow(self.columns)

    def _row(self, frame_index: int, time_s: float, face: FaceAnnotation | None) -> list[Any]:
        nan = math.nan
        layout = self.layout
        if face is None:
            values: dict[str, Any] = {}
        else:
            x, y, w, h = face.box
            values = {"Identity": face.track_id, "FaceRectX": x, "FaceRectY": y, "FaceRectWidth": w,
                      "FaceRectHeight": h, "FaceScore": face.score}
            if face.label is not None:
                values["label"] = face.label
                values["confidence"] = face.confidence
                values.update({fex_column(k): v for k, v in face.probabilities.items()})
                if face.valence is not None:
                    values["valence"], values["arousal"] = face.valence, face.arousal
                for i, (px, py) in enumerate(face.landmarks or ()):
                    values[f"x_{i}"], values[f"y_{i}"] = px, py
                if face.window is not None:
                    values["window_start"], values["window_end"] = face.window
        values.update({"frame": frame_index, "approx_time": round(time_s, 6), "input": self.input_name})
        empty = {"label": None, "input": None, "Identity": None, "window_start": None, "window_end": None}
        return [values.get(c, empty.get(c, nan)) for c in self.columns]

    def write_frame(self, frame_index: int, time_s: float, faces: Sequence[FaceAnnotation]) -> None:
        rows = [self._row(frame_index, time_s, f) for f in faces] or [self._row(frame_index, time_s, None)]
        self.rows_written += len(rows)
        if not self.parquet:
            self._csv.writerows(["" if v is None else v for v in row] for row in rows)
            return
        self._buffer.extend(rows)
        if len(self._buffer) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._buffer:
            columns = list(zip(*self._buffer))
            self._pq_writer.write_table(pa.Table.from_arrays(
                [pa.array(col, type=self._schema.field(i).type) for i, col in enumerate(columns)], schema=self._schema))
            self._buffer.clear()

    def _close(self) -> None:
        if self.parquet:
            self._flush()
            self._pq_writer.close()
        else:
            self._file.close()

    def commit(self) -> Path:
        self._close()
        self._finish()
        return self.path

    def abort(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001 -- nothing to keep from a failed run
            pass
        super().abort()


class AnnotatedVideoWriter(_Partial):
    """``cv2.VideoWriter`` (MPEG-4 Part 2, ``mp4v``: in every OpenCV wheel) to a partial file."""

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int], fourcc: str = "mp4v") -> None:
        super().__init__(path)
        self.size = size
        self._writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*fourcc), float(fps), size)
        if not self._writer.isOpened():
            self.abort()
            raise ValueError(f"cannot write video {self.path} with codec {fourcc!r}")
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        if (frame.shape[1], frame.shape[0]) != self.size:  # a stream may change resolution mid-way
            frame = cv2.resize(frame, self.size)
        self._writer.write(frame)
        self.frames_written += 1

    def commit(self) -> Path:
        self._writer.release()
        self._finish()
        return self.path

    def abort(self) -> None:
        self._writer.release()
        super().abort()
