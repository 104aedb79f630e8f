"""Pre- and post-processing of the serving ensembles, as plain numpy functions.

The Triton Python models in :mod:`serving.ensembles.triton_models` are thin wrappers around these
functions, and tests/benchmarks call them directly, so "what Triton did" can be recomputed exactly.

Pre-processing decodes (RGB, like :func:`fer_core.data.samples.decode_image_file`) and then
interprets the version's input-pipeline spec (:mod:`fer_core.data.pipeline`, from its model
package) exactly as training's decode does: face handling, frame rule, resize, uint8 rounding,
normalisation.
Every prepared input also carries ``to_input``, the 2x3 affine map from original-image pixels to
model-input pixels, so that post-processing can map landmarks back onto the picture the user sent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

import cv2
import numpy as np

from fer_core.data.pipeline import InputPipeline, normalise, prepare_pixels
from fer_core.data.preprocess import FaceBox, HaarFaceDetector
from fer_core.metadata import ModelMetadata

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "ACCEPTED_FORMATS",
    "PreparedInput",
    "RecordingDetector",
    "encoded_image_size",
    "decode_image_bytes",
    "prepare_image",
    "prepare_clip",
    "prepare",
    "postprocess",
    "softmax",
    "is_video_network",
]

MAX_IMAGE_BYTES = 16 * 1024 * 1024
# Checked from the file header before decoding: a small PNG can inflate to gigabytes.
MAX_IMAGE_PIXELS = 4096 * 4096
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless...); C4/C8/CC are not frames.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def is_video_network(metadata: ModelMetadata) -> bool:
    """True when the model's input is a stack of frames ``(T, C, H, W)``."""
    return len(metadata.input.shape) == 4


def encoded_image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` read from the image's header, ``None`` when it is no image format we accept
    (``ValueError`` for one Pillow already refuses as a decompression bomb).

    PNG and JPEG are parsed here (the common case, no allocation); every other format is identified by
    Pillow, whose ``Image.open`` reads the header only (no pixel is decoded), so a small TIFF, BMP,
    WebP or GIF that inflates to gigabytes is refused before OpenCV ever decodes it.
    """
    if data[:8] == _PNG_SIGNATURE and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return _pillow_size(data)


# Formats OpenCV decodes that Pillow can size from the header. Anything else is refused before
# decoding: a format whose size cannot be read first cannot be bounded (OpenEXR, HDR, PFM, ...).
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "DIB")


def _pillow_size(data: bytes) -> tuple[int, int] | None:
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we check the size ourselves
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                return int(image.width), int(image.height)
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused at open
        raise ValueError(f"image exceeds the pixel limit ({str(exc).split(',')[0]})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error, EOFError):
        return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(width), int(height)
        pos += 2 + length
    return None


def decode_image_bytes(
    data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode encoded image bytes to uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB.

    ``ValueError`` with a one-line reason for empty, oversized or undecodable input.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"expected encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ValueError("empty image (0 bytes)")
    if len(data) > max_bytes:
        raise ValueError(f"image of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    size = encoded_image_size(data)
    if size is None:  # never decode what cannot be sized first
        raise ValueError(f"cannot decode {len(data)} bytes as an image (expected one of "
                         f"{', '.join(ACCEPTED_FORMATS[:-1])}; no readable header)")
    width, height = size
    if width == 0 or height == 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ValueError(f"cannot decode {len(data)} bytes as an image (expected JPEG or PNG)")
    if image.shape[0] * image.shape[1] > max_pixels:  # a header that lied about the size
        raise ValueError(f"image of {image.shape[1]}x{image.shape[0]} pixels exceeds the limit of {max_pixels} pixels")
    # Same conversions as fer_core.data.samples.decode_image_file, so serving sees training's pixels.
    if image.dtype != np.uint8:
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(float(image.max()), 1.0))
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3:
        image = image[:, :, 0]
    return image


def check_decoded(image: np.ndarray, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A decoded image given as an array: uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB (one-line ``ValueError``)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or 0 in image.shape:
        raise ValueError(f"image arrays must be (H, W) grey or (H, W, 3) RGB, got shape {image.shape}")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ValueError(f"image of {image.shape[1]}x{image.shape[0]} pixels exceeds the limit of {max_pixels} pixels")
    return image


class RecordingDetector:
    """Wraps a detector and remembers the faces of its last call."""

    def __init__(self, detector: HaarFaceDetector) -> None:
        self.detector = detector
        self.last_faces: list[FaceBox] = []

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        self.last_faces = self.detector.detect(image)
        return self.last_faces


@dataclass(frozen=True)
class PreparedInput:
    """A model input built from user pixels.

    ``tensor`` is float32 with the model's input shape; ``face_found`` says whether the face
    detector found a face (else the whole image/frame was used); ``to_input`` is the 2x3 affine
    map from original-image pixel coordinates to model-input pixel coordinates.
    """

    tensor: np.ndarray
    face_found: bool
    to_input: np.ndarray


def default_pipeline(metadata: ModelMetadata, detector: HaarFaceDetector | None) -> InputPipeline:
    """The pipeline of a model without a package spec: its metadata, face handling by ``detector``."""
    return InputPipeline.for_model(metadata, face="haar" if detector is not None else "off")


def _prepared(decoded: Sequence[np.ndarray], pipeline: InputPipeline, detector: HaarFaceDetector | None) -> PreparedInput:
    prepared = prepare_pixels(decoded, pipeline, detector)
    return PreparedInput(normalise(prepared.pixels, pipeline), prepared.face_found, prepared.to_input)


def prepare_image(image: np.ndarray, metadata: ModelMetadata, detector: HaarFaceDetector | None,
                  pipeline: InputPipeline | None = None) -> PreparedInput:
    """The ``(C, H, W)`` input of an image network from one decoded image, by the input-pipeline spec."""
    if is_video_network(metadata):
        raise ValueError(f"{metadata.name} takes a clip of frames, not one image")
    return _prepared([image], pipeline or default_pipeline(metadata, detector), detector)


def prepare_clip(frames: Sequence[np.ndarray], metadata: ModelMetadata, detector: HaarFaceDetector | None,
                 pipeline: InputPipeline | None = None) -> PreparedInput:
    """The ``(T, C, H, W)`` input of a video network from the decoded frames of one clip
    (:func:`fer_core.data.pipeline.prepare_pixels` documents the frame and face rules)."""
    if not is_video_network(metadata):
        raise ValueError(f"{metadata.name} takes one image, not a clip")
    if len(frames) == 0:
        raise ValueError("a clip needs at least one frame")
    return _prepared(list(frames), pipeline or default_pipeline(metadata, detector), detector)


def prepare(encoded: Sequence[bytes], metadata: ModelMetadata, detector: HaarFaceDetector | None,
            max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
            pipeline: InputPipeline | None = None) -> PreparedInput:
    """Decode and prepare one sample: one encoded image, or the encoded frames of one clip.

    ``pipeline`` is the version's input-pipeline spec (from its package); without one it is
    derived from ``metadata`` with face handling decided by ``detector``.
    """
    decoded = [decode_image_bytes(b, max_bytes, max_pixels) for b in encoded]
    if is_video_network(metadata):
        return prepare_clip(decoded, metadata, detector, pipeline)
    if len(decoded) != 1:
        raise ValueError(f"{metadata.name} takes one image per sample, got {len(decoded)}")
    return prepare_image(decoded[0], metadata, detector, pipeline)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64, returned as float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))).astype(np.float32)


def postprocess_outputs(metadata: ModelMetadata) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names, dtypes and per-sample shapes of what :func:`postprocess` returns for this network."""
    spec = {s.name: s for s in metadata.outputs}
    primary = spec[metadata.primary_output or metadata.outputs[0].name]
    num_classes = primary.shape[0]
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "LABEL": ("BYTES", (1,)), "PROBABILITIES": ("FP32", (num_classes,))}
    if metadata.extra.get("multi_label"):
        out["ACTIVE"] = ("BOOL", (num_classes,))
    if "valence_arousal" in spec:
        out["VALENCE_AROUSAL"] = ("FP32", (2,))
    if "landmarks" in spec:
        out["LANDMARKS"] = ("FP32", tuple(spec["landmarks"].shape))
    return out


def postprocess_inputs(metadata: ModelMetadata) -> list[str]:
    """Which raw model outputs :func:`postprocess` needs (heatmaps are dropped)."""
    needed = [metadata.primary_output or metadata.outputs[0].name]
    for name in ("valence_arousal", "landmarks"):
        if name in metadata.output_names and name not in needed:
            needed.append(name)
    return needed


def postprocess(outputs: Mapping[str, np.ndarray], metadata: ModelMetadata, to_input: np.ndarray) -> dict[str, np.ndarray]:
    """Turn a batch of raw model outputs into user-facing results (arrays with a batch axis).

    * ``LABEL``: the arg-max class name; for multi-label (AU) networks the active labels joined
      with ``+`` (``""`` when none is active);
    * ``PROBABILITIES``: softmax of the logits, or the sigmoid probabilities of a multi-label head;
    * ``ACTIVE``: multi-label only, ``probability >= metadata.extra["threshold"]``;
    * ``VALENCE_AROUSAL`` as the network predicts it; ``LANDMARKS`` mapped back from model-input
      pixels to the original image through the inverse of ``to_input`` (B, 2, 3).
    """
    spec = {s.name: s for s in metadata.outputs}
    primary = spec[metadata.primary_output or metadata.outputs[0].name]
    labels = primary.labels or metadata.label_names
    raw = np.asarray(outputs[primary.name], dtype=np.float32)
    result: dict[str, np.ndarray] = {}
    if metadata.extra.get("multi_label"):
        probs = raw if primary.kind == "probabilities" else _sigmoid(raw)
        active = probs >= float(metadata.extra.get("threshold", 0.5))
        names = ["+".join(l for l, on in zip(labels, row) if on) for row in active]
        result["ACTIVE"] = active
    else:
        probs = raw if primary.kind == "probabilities" else softmax(raw)
        names = [labels[i] if i < len(labels) else str(i) for i in probs.argmax(axis=1)]
    result["LABEL"] = np.array([n.encode() for n in names], dtype=object).reshape(-1, 1)
    result["PROBABILITIES"] = probs.astype(np.float32)
    if "valence_arousal" in spec:
        result["VALENCE_AROUSAL"] = np.asarray(outputs["valence_arousal"], dtype=np.float32)
    if "landmarks" in spec:
        points = np.asarray(outputs["landmarks"], dtype=np.float64)
        mapped = np.empty_like(points)
        for i, matrix in enumerate(np.asarray(to_input, dtype=np.float64)):
            inverse = cv2.invertAffineTransform(matrix)
            mapped[i] = points[i] @ inverse[:, :2].T + inverse[:, 2]
        result["LANDMARKS"] = mapped.astype(np.float32)
    return result
