"""The input-pipeline spec: how raw pixels become a model input, as data, read by training and serving.

One :class:`InputPipeline` is written into every model package (from the effective recipe and the
model's metadata) and interpreted by :func:`prepare_pixels` + :func:`normalise`. Training's decode
(the tasks' ``_decode``), the MLflow pyfunc and the Triton pre-processing stub all call these two
functions, so there is no other source of pre-processing truth. Torch-free (numpy + OpenCV).

Steps, in order (each named by a field):

1. ``decode``: ``opencv_unchanged_rgb`` -- OpenCV ``IMREAD_UNCHANGED``, >8-bit scaled to 8 bits,
   BGR(A) → RGB, grey kept grey (:func:`fer_core.data.samples.decode_image_file`).
2. ``face``: ``off`` (the input is a face crop and is used whole, like the training data) or
   ``haar`` (:class:`~fer_core.data.preprocess.HaarFaceDetector` with ``detector`` settings, then
   eye-based ``alignment`` to the input size; the whole image when no face is found). A clip is
   aligned with the box of the first frame where a face is found, so the crop does not jitter.
3. ``frame_rule`` (clips): ``resample`` to ``num_frames`` by ``resample``; ``onset_apex``: two frames
   are (onset, apex) as given, a longer clip uses its first frame as onset and
   :func:`~fer_core.data.preprocess.estimate_apex` for the apex.
4. resize to ``size`` (area when shrinking, bilinear when enlarging) and convert to ``channels``.
5. ``rounding``: ``uint8`` -- the resized pixels are rounded to uint8 (training caches them so);
   ``none`` keeps float pixels.
6. normalisation ``(x / 255 - mean) / std`` per channel, float32.

Ambiguity recorded: the dynamic task used to align every frame on its own box and drop faceless
frames; with one spec for training and serving, a clip is aligned with one box (serving's rule,
which does not jitter and keeps the frame count) -- only recipes with ``data.align_faces`` change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from fer_core.data.preprocess import (
    RESAMPLE_METHODS,
    FaceBox,
    HaarFaceDetector,
    align_face,
    alignment_matrix,
    detect_and_align,
    estimate_apex,
    resample_clip,
    to_model_input,
)
from fer_core.metadata import ModelMetadata

__all__ = ["FACE_MODES", "FRAME_RULES", "InputPipeline", "PreparedPixels", "prepare_pixels", "normalise",
           "make_detector"]

FACE_MODES = ("off", "haar")
FRAME_RULES = ("none", "resample", "onset_apex")
ROUNDING = ("uint8", "none")


@dataclass(frozen=True)
class InputPipeline:
    """Everything that turns decoded user pixels into a model input (see the module docstring)."""

    kind: str  # "image" | "clip"
    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    face: str = "off"
    detector: Mapping[str, Any] = field(default_factory=dict)  # HaarFaceDetector keyword arguments
    alignment: str = "eyes_similarity"
    frame_rule: str = "none"
    num_frames: int = 1
    resample: str = "interpolate"
    rounding: str = "uint8"
    decode: str = "opencv_unchanged_rgb"
    resize: str = "area_shrink_linear_enlarge"

    def __post_init__(self) -> None:
        if self.kind not in ("image", "clip"):
            raise ValueError(f"pipeline kind must be 'image' or 'clip', got {self.kind!r}")
        if self.face not in FACE_MODES:
            raise ValueError(f"face handling must be one of {FACE_MODES}, got {self.face!r}")
        if self.frame_rule not in FRAME_RULES or (self.kind == "clip") == (self.frame_rule == "none"):
            raise ValueError(f"frame_rule {self.frame_rule!r} does not fit a {self.kind} pipeline")
        if self.resample not in RESAMPLE_METHODS:
            raise ValueError(f"resample must be one of {RESAMPLE_METHODS}, got {self.resample!r}")
        if self.rounding not in ROUNDING:
            raise ValueError(f"rounding must be one of {ROUNDING}, got {self.rounding!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")

    @classmethod
    def for_model(cls, metadata: ModelMetadata, data: Mapping[str, Any] | None = None,
                  face: str | None = None) -> "InputPipeline":
        """The pipeline of a model trained with recipe ``data`` settings (``align_faces``, ``resample``).

        ``face`` overrides the face handling the version is served with (default: ``haar`` when the
        training data was aligned, else ``off``).
        """
        data = dict(data or {})
        video = len(metadata.input.shape) == 4
        if video:
            rule = "onset_apex" if metadata.task == "micro" and metadata.input.shape[0] == 2 else "resample"
        else:
            rule = "none"
        return cls(
            kind="clip" if video else "image", size=tuple(metadata.input_size), channels=int(metadata.in_chans),
            mean=tuple(float(m) for m in metadata.mean), std=tuple(float(s) for s in metadata.std),
            face=face or ("haar" if data.get("align_faces") else "off"),
            frame_rule=rule, num_frames=int(metadata.input.shape[0]) if video else 1,
            resample=str(data.get("resample", "interpolate")),
        )

    def with_face(self, face: str) -> "InputPipeline":
        """The same pipeline with other face handling (a deployment's choice)."""
        return InputPipeline(**{**self.to_dict(), "face": face})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["size"], out["mean"], out["std"] = list(self.size), list(self.mean), list(self.std)
        out["detector"] = dict(self.detector)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "InputPipeline":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown input-pipeline fields {unknown}")
        raw = dict(raw)
        for key in ("size", "mean", "std"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)


def make_detector(pipeline: InputPipeline) -> HaarFaceDetector | None:
    """The face detector the pipeline asks for (``None`` when face handling is off)."""
    return HaarFaceDetector(**dict(pipeline.detector)) if pipeline.face == "haar" else None


@dataclass(frozen=True)
class PreparedPixels:
    """Pixels at the model's size (uint8, or float in [0, 255] with ``rounding="none"``), ``(C, H, W)``
    or ``(T, C, H, W)``; ``face_found`` (always False with face handling off); ``to_input``: the 2x3
    affine map from original-image pixels to model-input pixels."""

    pixels: np.ndarray
    face_found: bool
    to_input: np.ndarray


class _RecordingDetector:
    """Remembers the faces of the last call, to learn which box :func:`detect_and_align` used."""

    def __init__(self, detector: HaarFaceDetector) -> None:
        self.detector = detector
        self.last_faces: list[FaceBox] = []

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        self.last_faces = self.detector.detect(image)
        return self.last_faces


def _resize_matrix(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """The affine map of ``cv2.resize`` (pixel centres: ``x' = (x + 0.5) * s - 0.5``)."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]], dtype=np.float64)


def _find_face(frames: Sequence[np.ndarray], detector: HaarFaceDetector | None,
               size: tuple[int, int]) -> FaceBox | None:
    if detector is None:
        return None
    recorder = _RecordingDetector(detector)
    for frame in frames:
        if detect_and_align(frame, recorder, out_size=size) is not None:
            return recorder.last_faces[0]
    return None


def _finish(stack: np.ndarray, pipeline: InputPipeline) -> np.ndarray:
    x = to_model_input(stack, pipeline.size, pipeline.channels, 0.0, 1.0) * np.float32(255.0)
    return np.round(x).astype(np.uint8) if pipeline.rounding == "uint8" else x


def prepare_pixels(decoded: Sequence[np.ndarray], pipeline: InputPipeline,
                   detector: HaarFaceDetector | None = None) -> PreparedPixels:
    """Steps 2-5 of the pipeline on decoded uint8 images: one image, or the frames of one clip.

    ``detector`` is the pipeline's detector (:func:`make_detector`), passed in so that callers build
    it once; it is ignored when face handling is off.
    """
    if len(decoded) == 0:
        raise ValueError("a sample needs at least one image")
    detector = detector if pipeline.face == "haar" else None
    if pipeline.face == "haar" and detector is None:
        detector = make_detector(pipeline)
    size = tuple(pipeline.size)
    if pipeline.kind == "image":
        if len(decoded) != 1:
            raise ValueError(f"an image model takes one image per sample, got {len(decoded)}")
        image = decoded[0]
        box = _find_face([image], detector, size)
        if box is None:
            pixels, to_input = image, _resize_matrix(image.shape[:2], size)
        else:
            pixels, to_input = align_face(image, box, size), alignment_matrix(box, size)
        return PreparedPixels(_finish(pixels, pipeline), box is not None, to_input.astype(np.float32))
    shapes = {f.shape[:2] for f in decoded}
    if len(shapes) != 1:
        raise ValueError(f"all frames of a clip must have the same size, got {sorted(shapes)}")
    box = _find_face(decoded, detector, size)
    if box is None:
        frames = np.stack(list(decoded))
        to_input = _resize_matrix(decoded[0].shape[:2], size)
    else:
        frames = np.stack([align_face(f, box, size) for f in decoded])
        to_input = alignment_matrix(box, size)
    if pipeline.frame_rule == "onset_apex":
        if len(frames) == 1:
            raise ValueError("an onset/apex model needs onset and apex frames (2 or more), got 1")
        if len(frames) > 2:
            frames = frames[[0, estimate_apex(frames, 0)]]
    else:
        frames = resample_clip(frames, pipeline.num_frames, pipeline.resample)
    return PreparedPixels(_finish(frames, pipeline), box is not None, to_input.astype(np.float32))


def normalise(pixels: np.ndarray, pipeline: InputPipeline) -> np.ndarray:
    """Step 6: ``(x / 255 - mean) / std`` per channel in float32 (the same float32 operations as
    :func:`fer_core.data.transforms.normalize` on ``x.float() / 255``, so results are bit-identical)."""
    x = np.asarray(pixels).astype(np.float32) / np.float32(255.0)
    channels = pipeline.channels
    mean = np.broadcast_to(np.asarray(pipeline.mean, dtype=np.float32), (channels,)).reshape(channels, 1, 1)
    std = np.broadcast_to(np.asarray(pipeline.std, dtype=np.float32), (channels,)).reshape(channels, 1, 1)
    return ((x - mean) / std).astype(np.float32)
