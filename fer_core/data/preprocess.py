"""Face preprocessing: detection, eye alignment, clip resampling, onset/apex and model inputs.

These functions sit between decoded pixels (:mod:`fer_core.data.samples`) and a model. The data
adapters use them to crop and align faces, the training transforms and the serving pre-processing
step both call :func:`to_model_input`, so a tensor is built the same way in training and in Triton.

Conventions used throughout:

* images are ``uint8`` grey ``(H, W)`` or RGB ``(H, W, 3)``; clips stack them as ``(T, H, W[, 3])``;
* point coordinates are ``(x, y)`` in pixel-index units, i.e. the centre of pixel ``[row, col]`` is
  ``(col, row)`` -- OpenCV's convention and the one of 68-point landmark annotations;
* ``left_eye`` is the eye that appears on the *image's* left (the subject's right eye, iBUG points
  36-41), ``right_eye`` the one on the image's right (iBUG 42-47);
* sizes are ``(height, width)`` like :attr:`ModelMetadata.input_size`; an ``int`` means a square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np

__all__ = [
    "FaceBox",
    "FaceDetector",
    "HaarFaceDetector",
    "LandmarkFaceDetector",
    "RESAMPLE_METHODS",
    "APEX_METHODS",
    "eye_centres_from_landmarks",
    "face_box_from_landmarks",
    "NOMINAL_BOX_EYES",
    "nominal_eyes",
    "aligned_eye_targets",
    "alignment_matrix",
    "align_face",
    "detect_and_align",
    "drop_faceless_frames",
    "resample_clip",
    "clip_motion",
    "estimate_apex",
    "onset_apex_pair",
    "register_clip_faces",
    "to_model_input",
]

RESAMPLE_METHODS = ("interpolate", "uniform", "keyframes", "keyframes+interpolate")
APEX_METHODS = ("diff", "flow")

# iBUG 68-point indices of the two eye contours (0-based).
_LEFT_EYE_POINTS = slice(36, 42)  # subject's right eye, on the image's left
_RIGHT_EYE_POINTS = slice(42, 48)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return ``image`` as uint8 (H, W) or (H, W, 3); ``ValueError`` for anything else."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"{name} must be (H, W) grey or (H, W, 3) RGB, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return image


def _check_frames(frames: np.ndarray, *, allow_float: bool = False) -> np.ndarray:
    """Return ``frames`` as a (T, H, W[, 3]) array with T >= 1; ``ValueError`` otherwise."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    numeric = np.issubdtype(frames.dtype, np.integer) or np.issubdtype(frames.dtype, np.floating)
    if not (frames.dtype == np.uint8 or (allow_float and numeric)):
        raise ValueError(f"frames must be uint8{' or numeric' if allow_float else ''}, got {frames.dtype}")
    if frames.ndim == 4 and frames.shape[3] == 1:
        frames = frames[..., 0]
    if not (frames.ndim == 3 or (frames.ndim == 4 and frames.shape[3] == 3)):
        raise ValueError(f"frames must be (T, H, W) grey or (T, H, W, 3) RGB, got shape {frames.shape}")
    if 0 in frames.shape:
        raise ValueError(f"frames are empty: shape {frames.shape}")
    return frames


def _to_grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _size_hw(size: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    """``int`` or ``(height, width)`` -> ``(height, width)`` of positive ints."""
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        size = tuple(size)
        if len(size) != 2:
            raise ValueError(f"{name} must be an int or (height, width), got {size}")
        height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be positive, got {(height, width)}")
    return height, width


def _check_point(point: object, name: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in point)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an (x, y) pair, got {point!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{name} must be finite, got {(x, y)}")
    return x, y


# ---------------------------------------------------------------------------------------------
# Faces and detectors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceBox:
    """A detected face: box in pixels, a confidence and optionally the two eye centres."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0
    left_eye: tuple[float, float] | None = None
    right_eye: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.w <= 0 or self.h <= 0:
            raise ValueError(f"a face box needs a positive size, got w={self.w}, h={self.h}")
        if (self.left_eye is None) != (self.right_eye is None):
            raise ValueError("give both eye centres or neither")
        if self.left_eye is not None:
            object.__setattr__(self, "left_eye", _check_point(self.left_eye, "left_eye"))
            object.__setattr__(self, "right_eye", _check_point(self.right_eye, "right_eye"))

    @property
    def area(self) -> int:
        return self.w * self.h

    @property
    def centre(self) -> tuple[float, float]:
        """Centre ``(x, y)`` of the box in pixel-index coordinates."""
        return self.x + (self.w - 1) / 2.0, self.y + (self.h - 1) / 2.0

    @property
    def has_eyes(self) -> bool:
        return self.left_eye is not None


class FaceDetector(Protocol):
    """Anything that finds faces: returns boxes, largest first (an empty list = no face)."""

    def detect(self, image: np.ndarray) -> list[FaceBox]: ...


def _cascade(filename: str) -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / filename
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise ValueError(f"cannot load OpenCV cascade {path}")
    return cascade


class HaarFaceDetector:
    """Viola-Jones face detector on OpenCV's bundled cascades (no download, CPU only).

    Boxes come back largest first with ``score`` = the number of merged neighbour detections.
    With ``find_eyes`` the eye cascade runs inside the upper part of each face, upscaled so that
    the eyes of small faces still exceed the cascade's 20x20 window; the eyes are kept only when a
    plausible left/right pair (similar height, sensible spacing) is found.

    Defaults (``frontalface_alt2``, no histogram equalisation) were chosen by measuring detection
    and eye-pair rates on SynthFACS faces against ``frontalface_default`` and equalised input.
    ``eye_box_centre`` is where the eye centre lies inside a box of the eye cascade, as fractions
    of its width/height: the cascade's boxes sit ~6% of their size up and to the left of the eye
    centre (measured on SynthFACS at 96-160 px, the same for both eyes, so a property of the
    cascade); ``(0.5, 0.5)`` gives the raw box centres.
    """

    # Eye search is done on the face's upper part resized to this width (px).
    _EYE_ROI_WIDTH = 160

    def __init__(
        self,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size_fraction: float = 0.2,
        find_eyes: bool = True,
        cascade: str = "haarcascade_frontalface_alt2.xml",
        eye_cascade: str = "haarcascade_eye.xml",
        equalize: bool = False,
        eye_box_centre: tuple[float, float] = (0.56, 0.555),
    ) -> None:
        if scale_factor <= 1.0:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        if min_neighbors < 0:
            raise ValueError(f"min_neighbors must be >= 0, got {min_neighbors}")
        if not 0.0 <= min_size_fraction <= 1.0:
            raise ValueError(f"min_size_fraction must be in [0, 1], got {min_size_fraction}")
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size_fraction = min_size_fraction
        self.find_eyes = find_eyes
        self.equalize = equalize
        self.eye_box_centre = _check_point(eye_box_centre, "eye_box_centre")
        self._face_cascade = _cascade(cascade)
        self._eye_cascade = _cascade(eye_cascade) if find_eyes else None

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """Faces in ``image`` (uint8 grey or RGB), largest first."""
        grey = _to_grey(_check_image(image))
        if self.equalize:
            # Off by default: on SynthFACS it cost ~5% of faces and 15-20% of eye pairs (the flat
            # background dominates the histogram); it can help with badly exposed photographs.
            grey = cv2.equalizeHist(grey)
        min_side = max(int(self.min_size_fraction * min(grey.shape)), 1)
        rects, neighbours = self._face_cascade.detectMultiScale2(
            grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(min_side, min_side)
        )
        faces = []
        for (x, y, w, h), n in zip(np.asarray(rects).reshape(-1, 4), np.asarray(neighbours).reshape(-1)):
            eyes = self._find_eyes(grey, int(x), int(y), int(w), int(h)) if self.find_eyes else None
            left, right = eyes if eyes is not None else (None, None)
            faces.append(FaceBox(int(x), int(y), int(w), int(h), float(n), left, right))
        faces.sort(key=lambda f: (-f.area, -f.score))
        return faces

    def _find_eyes(
        self, grey: np.ndarray, x: int, y: int, w: int, h: int
    ) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """The best plausible eye pair inside a face box, in image coordinates, or ``None``."""
        # Eyes sit in the upper ~60% of a frontal Haar box; searching there avoids nostril/mouth hits.
        top, bottom = y + int(0.1 * h), y + int(0.6 * h)
        roi = grey[top:bottom, x : x + w]
        if roi.size == 0:
            return None
        scale = self._EYE_ROI_WIDTH / roi.shape[1]
        rows = max(int(round(roi.shape[0] * scale)), 1)
        scale_y = rows / roi.shape[0]  # differs slightly from ``scale`` after rounding
        interpolation = cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA
        roi = cv2.resize(roi, (self._EYE_ROI_WIDTH, rows), interpolation=interpolation)
        min_eye = max(int(0.12 * self._EYE_ROI_WIDTH), 1)
        max_eye = int(0.45 * self._EYE_ROI_WIDTH)
        rects = self._eye_cascade.detectMultiScale(
            roi, scaleFactor=1.1, minNeighbors=3, minSize=(min_eye, min_eye), maxSize=(max_eye, max_eye)
        )
        # The point at fraction f of a box [ex, ex + ew) is ex + f * ew in continuous coordinates;
        # undoing the resize and converting to pixel-index coordinates gives (ex + f * ew) / scale - 0.5.
        fx, fy = self.eye_box_centre
        centres = [
            (x + (ex + fx * ew) / scale - 0.5, top + (ey + fy * eh) / scale_y - 0.5)
            for ex, ey, ew, eh in np.asarray(rects).reshape(-1, 4)
        ]
        mid_x = x + (w - 1) / 2.0
        best, best_cost = None, math.inf
        for left in (c for c in centres if c[0] < mid_x):
            for right in (c for c in centres if c[0] >= mid_x):
                dx, dy = right[0] - left[0], right[1] - left[1]
                # Reject pairs that cannot be two eyes of one frontal face.
                if not (0.2 * w <= dx <= 0.75 * w) or abs(dy) > 0.25 * dx:
                    continue
                # Prefer level, centred pairs.
                cost = abs(dy) / dx + abs((left[0] + right[0]) / 2.0 - mid_x) / w
                if cost < best_cost:
                    best, best_cost = (left, right), cost
        return best


def eye_centres_from_landmarks(landmarks68: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Eye centres ``(left_eye, right_eye)`` as the means of iBUG points 36-41 and 42-47."""
    points = np.asarray(landmarks68, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"landmarks must have shape (68, 2), got {points.shape}")
    if not np.all(np.isfinite(points[36:48])):
        raise ValueError("eye landmarks contain non-finite values")
    left = points[_LEFT_EYE_POINTS].mean(axis=0)
    right = points[_RIGHT_EYE_POINTS].mean(axis=0)
    return (float(left[0]), float(left[1])), (float(right[0]), float(right[1]))


def face_box_from_landmarks(
    landmarks68: np.ndarray, image_shape: tuple[int, ...] | None = None, margin: float = 0.1
) -> FaceBox:
    """A square :class:`FaceBox` around 68 landmarks (plus ``margin`` of its side), with eye centres.

    When ``image_shape`` is given the box is clipped to the image.
    """
    points = np.asarray(landmarks68, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"landmarks must have shape (68, 2), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("landmarks contain non-finite values")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = int(math.floor(cx - side / 2.0)), int(math.floor(cy - side / 2.0))
    right, bottom = int(math.ceil(cx + side / 2.0)), int(math.ceil(cy + side / 2.0))
    if image_shape is not None:
        left, top = max(left, 0), max(top, 0)
        right, bottom = min(right, int(image_shape[1]) - 1), min(bottom, int(image_shape[0]) - 1)
    if right < left or bottom < top:
        raise ValueError("landmarks lie outside the image")
    left_eye, right_eye = eye_centres_from_landmarks(points)
    return FaceBox(left, top, right - left + 1, bottom - top + 1, 1.0, left_eye, right_eye)


class LandmarkFaceDetector:
    """A "detector" for data whose landmarks are known (SynthFACS, annotated datasets).

    ``landmarks`` is ``(68, 2)`` for one face or ``(K, 68, 2)`` for K faces of the same image; a
    face whose points are not all finite counts as absent (so NaN landmarks mark faceless frames).
    The same landmarks answer every ``detect`` call: build one detector per image.
    """

    def __init__(self, landmarks: np.ndarray, margin: float = 0.1) -> None:
        points = np.asarray(landmarks, dtype=np.float64)
        if points.shape == (68, 2):
            points = points[None]
        if points.ndim != 3 or points.shape[1:] != (68, 2):
            raise ValueError(f"landmarks must be (68, 2) or (K, 68, 2), got {points.shape}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.landmarks = points
        self.margin = margin

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        image = _check_image(image)
        faces = []
        for points in self.landmarks:
            if not np.all(np.isfinite(points)):
                continue
            try:
                faces.append(face_box_from_landmarks(points, image.shape, self.margin))
            except ValueError:  # landmarks entirely outside this image: no face here
                continue
        faces.sort(key=lambda f: -f.area)
        return faces


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------


def _similarity_from_two_points(
    src: tuple[tuple[float, float], tuple[float, float]], dst: tuple[tuple[float, float], tuple[float, float]]
) -> np.ndarray:
    """The 2x3 rotation+scale+translation that maps ``src[0] -> dst[0]`` and ``src[1] -> dst[1]`` exactly."""
    p, q = complex(*src[0]), complex(*src[1])
    P, Q = complex(*dst[0]), complex(*dst[1])
    if abs(q - p) < 1e-6:
        raise ValueError("the two eye centres coincide; cannot align")
    # In the complex plane a similarity transform is z -> P + k (z - p) with k = (Q - P) / (q - p).
    k = (Q - P) / (q - p)
    a, b = k.real, k.imag
    t = P - k * p
    return np.array([[a, -b, t.real], [b, a, t.imag]], dtype=np.float64)


def aligned_eye_targets(
    out_size: int | Sequence[int], eye_y: float = 0.35, eye_dist: float = 0.4
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where :func:`align_face` puts the eyes in a ``(height, width)`` output, in pixel-index coords.

    ``eye_y`` is the eyes' height and ``eye_dist`` their distance as fractions of the output's
    height/width, measured from the image edges; the pair is centred horizontally.
    """
    height, width = _size_hw(out_size, "out_size")
    # Fractions address continuous coordinates (0 = left edge, 1 = right edge); -0.5 converts to
    # pixel-index coordinates so the two eyes are exactly symmetric about the centre column.
    y = eye_y * height - 0.5
    return ((0.5 - eye_dist / 2.0) * width - 0.5, y), ((0.5 + eye_dist / 2.0) * width - 0.5, y)


# Where the eyes sit in a frontal Haar box, as fractions of its width/height (continuous coordinates).
# Measured on SynthFACS faces with the default cascade (0.29 / 0.69 / 0.385, sd ~0.02), the usual
# layout of OpenCV's frontal-face boxes on photographs too.
NOMINAL_BOX_EYES: tuple[tuple[float, float], tuple[float, float]] = ((0.3, 0.385), (0.7, 0.385))


def nominal_eyes(box: FaceBox) -> tuple[tuple[float, float], tuple[float, float]]:
    """Eye centres a face box implies when none were found (:data:`NOMINAL_BOX_EYES`), pixel-index coords."""
    return tuple(  # type: ignore[return-value]
        (box.x + fx * box.w - 0.5, box.y + fy * box.h - 0.5) for fx, fy in NOMINAL_BOX_EYES
    )


def alignment_matrix(
    box: FaceBox,
    out_size: int | Sequence[int] = (48, 48),
    eye_y: float = 0.35,
    eye_dist: float = 0.4,
    margin: float | None = None,
) -> np.ndarray:
    """The 2x3 affine matrix :func:`align_face` warps with (image -> aligned output coordinates)."""
    height, width = _size_hw(out_size, "out_size")
    if not 0.0 < eye_dist < 1.0:
        raise ValueError(f"eye_dist must be in (0, 1), got {eye_dist}")
    if not 0.0 < eye_y < 1.0:
        raise ValueError(f"eye_y must be in (0, 1), got {eye_y}")
    targets = aligned_eye_targets((height, width), eye_y, eye_dist)
    if box.has_eyes:
        return _similarity_from_two_points((box.left_eye, box.right_eye), targets)
    if margin is None:
        # Level eyes at their nominal box positions: the same framing as eye alignment on average,
        # so faces whose eyes were found and faces whose eyes were not look alike to a model.
        return _similarity_from_two_points(nominal_eyes(box), targets)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    # A square crop around the box centre with ``margin`` of the side added on each side, scaled so
    # the longer output side is filled (aspect ratio kept).
    side = max(box.w, box.h) * (1.0 + 2.0 * margin)
    scale = max(height, width) / side
    cx, cy = box.centre
    return np.array(
        [[scale, 0.0, (width - 1) / 2.0 - scale * cx], [0.0, scale, (height - 1) / 2.0 - scale * cy]],
        dtype=np.float64,
    )


def align_face(
    image: np.ndarray,
    box: FaceBox,
    out_size: int | Sequence[int] = (48, 48),
    eye_y: float = 0.35,
    eye_dist: float = 0.4,
    grayscale: bool = False,
    margin: float | None = None,
) -> np.ndarray:
    """Crop and align one face to ``out_size`` = ``(height, width)``.

    With eye centres in ``box``, a similarity transform (rotation + uniform scale + shift) puts the
    left/right eye at :func:`aligned_eye_targets`, which removes in-plane head roll. Without eyes
    the crop is square and unrotated: by default framed as if the eyes were at their nominal box
    positions (:func:`nominal_eyes`), so it matches eye alignment on average; with an explicit
    ``margin`` it is the box centred with ``margin`` of its side added around it instead. Pixels
    outside the image repeat the border (black corners would be a spurious cue for a classifier).
    ``grayscale`` converts RGB to grey; grey inputs stay grey.
    """
    image = _check_image(image)
    if not isinstance(box, FaceBox):
        raise ValueError(f"box must be a FaceBox, got {type(box).__name__}")
    height, width = _size_hw(out_size, "out_size")
    matrix = alignment_matrix(box, (height, width), eye_y, eye_dist, margin)
    scale = math.hypot(matrix[0, 0], matrix[1, 0])
    if scale < 0.75:
        # Bilinear sampling of a strongly shrunk face aliases: low-pass it first. Only the source
        # region the output maps to is blurred, so big frames with small faces stay cheap.
        sigma = (1.0 / scale - 1.0) / 2.0
        pad = int(math.ceil(3 * sigma)) + 2
        corners = np.array([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], np.float64)
        source = cv2.invertAffineTransform(matrix)
        mapped = corners @ source[:, :2].T + source[:, 2]
        x0, y0 = np.floor(mapped.min(axis=0)).astype(int) - pad
        x1, y1 = np.ceil(mapped.max(axis=0)).astype(int) + pad
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, image.shape[1] - 1), min(y1, image.shape[0] - 1)
        if x0 <= x1 and y0 <= y1:
            image = cv2.GaussianBlur(image[y0 : y1 + 1, x0 : x1 + 1], (0, 0), sigmaX=sigma, sigmaY=sigma)
            matrix = matrix.copy()
            matrix[:, 2] += matrix[:, :2] @ np.array([x0, y0], np.float64)
    aligned = cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    if grayscale:
        aligned = _to_grey(aligned)
    return aligned


def detect_and_align(
    image: np.ndarray,
    detector: FaceDetector,
    out_size: int | Sequence[int] = (48, 48),
    grayscale: bool = False,
    **align_kwargs: float,
) -> np.ndarray | None:
    """Align the largest face ``detector`` finds in ``image``; ``None`` when it finds none."""
    image = _check_image(image)
    faces = detector.detect(image)
    if not faces:
        return None
    return align_face(image, faces[0], out_size, grayscale=grayscale, **align_kwargs)


def drop_faceless_frames(frames: np.ndarray, detector: FaceDetector) -> tuple[np.ndarray, np.ndarray]:
    """Keep the frames of a clip in which ``detector`` finds a face.

    Returns ``(kept_frames, kept_indices)``; both are empty (length 0) when no frame has a face.
    """
    frames = _check_frames(frames)
    keep = np.array([bool(detector.detect(frame)) for frame in frames], dtype=bool)
    return frames[keep], np.flatnonzero(keep).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Clips: resampling, apex
# ---------------------------------------------------------------------------------------------


def _even_positions(num_in: int, num_out: int) -> np.ndarray:
    """``num_out`` evenly spaced positions over ``[0, num_in - 1]`` (both ends included)."""
    if num_out == 1:
        return np.array([(num_in - 1) / 2.0])  # one frame: the middle of the clip
    return np.linspace(0.0, num_in - 1, num_out)


def _frame_changes(frames: np.ndarray) -> np.ndarray:
    """Mean absolute change of each frame from the previous one (frame 0 gets +inf)."""
    flat = frames.reshape(len(frames), -1).astype(np.float32)
    change = np.abs(np.diff(flat, axis=0)).mean(axis=1)
    return np.concatenate([[np.inf], change])


def resample_clip(frames: np.ndarray, num_frames: int, method: str = "interpolate") -> np.ndarray:
    """Resample a clip ``(T, H, W[, C])`` to ``num_frames`` frames (up or down).

    * ``"interpolate"``: frames at ``num_frames`` evenly spaced time positions over the clip, each
      blended linearly from its two neighbouring frames (first and last frames are kept exactly;
      integer inputs are rounded back to their dtype). The temporal-interpolation used for
      fixed-length micro-expression inputs.
    * ``"uniform"``: the frame nearest to each evenly spaced position (no new pixels; frames repeat
      when upsampling).
    * ``"keyframes"``: the first frame plus the ``num_frames - 1`` frames that change most from
      their predecessor (mean absolute difference), returned in time order; ties go to the earlier
      frame. It cannot add frames, so when upsampling it behaves like ``"uniform"``.
    * ``"keyframes+interpolate"``: the two combined, as the C3D + EC-STFL method fixes the length: a
      longer clip keeps its key frames (``"keyframes"``), a shorter one is time-interpolated up
      (``"interpolate"``); the method names both steps without their order, and this split by
      direction is our reading (each step is used where it does not invent or drop needed frames).

    Any integer or float dtype is accepted (not only uint8), so feature or flow sequences resample too.
    """
    frames = _check_frames(frames, allow_float=True)
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"unknown resample method {method!r}; expected one of {RESAMPLE_METHODS}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    num_in = len(frames)
    if method == "keyframes+interpolate":
        method = "keyframes" if num_frames < num_in else "interpolate"
    if method == "keyframes" and num_frames < num_in:
        # Stable sort on -change keeps the earlier of equal changes; frame 0 (inf) always wins.
        order = np.argsort(-_frame_changes(frames), kind="stable")
        return frames[np.sort(order[:num_frames])]
    positions = _even_positions(num_in, num_frames)
    if method in ("uniform", "keyframes"):
        # floor(p + 0.5) rounds halves up, unlike numpy's round-half-to-even.
        return frames[np.minimum(np.floor(positions + 0.5).astype(np.int64), num_in - 1)]
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, num_in - 1)
    weight = (positions - lower).reshape((-1,) + (1,) * (frames.ndim - 1))
    work_dtype = frames.dtype if np.issubdtype(frames.dtype, np.floating) else np.float64
    blended = (1.0 - weight) * frames[lower].astype(work_dtype) + weight * frames[upper].astype(work_dtype)
    if np.issubdtype(frames.dtype, np.integer):
        info = np.iinfo(frames.dtype)
        blended = np.clip(np.rint(blended), info.min, info.max)
    return blended.astype(frames.dtype)


def _check_span(num_frames: int, onset: int, offset: int | None) -> tuple[int, int]:
    offset = num_frames - 1 if offset is None else int(offset)
    onset = int(onset)
    if not 0 <= onset <= offset < num_frames:
        raise ValueError(f"need 0 <= onset <= offset < {num_frames}, got onset={onset}, offset={offset}")
    return onset, offset


def clip_motion(
    frames: np.ndarray, onset: int = 0, offset: int | None = None, method: str = "diff"
) -> np.ndarray:
    """Motion of each frame in ``[onset, offset]`` relative to the onset frame (length offset-onset+1).

    ``"diff"``: mean absolute grey-level difference; ``"flow"``: mean Farneback optical-flow
    magnitude (px), slower but insensitive to global brightness changes.
    """
    frames = _check_frames(frames)
    if method not in APEX_METHODS:
        raise ValueError(f"unknown apex method {method!r}; expected one of {APEX_METHODS}")
    onset, offset = _check_span(len(frames), onset, offset)
    greys = [_to_grey(frame) for frame in frames[onset : offset + 1]]
    reference = greys[0]
    if method == "diff":
        ref = reference.astype(np.float32)
        return np.array([np.abs(g.astype(np.float32) - ref).mean() for g in greys], dtype=np.float64)
    scores = [0.0]
    for grey in greys[1:]:
        flow = cv2.calcOpticalFlowFarneback(reference, grey, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        scores.append(float(np.linalg.norm(flow, axis=2).mean()))
    return np.array(scores, dtype=np.float64)


def estimate_apex(
    frames: np.ndarray, onset: int = 0, offset: int | None = None, method: str = "diff", smooth: int = 1
) -> int:
    """Index (into ``frames``) of the frame that moved most from ``onset`` within ``[onset, offset]``.

    ``method`` is as in :func:`clip_motion`. ``smooth`` > 1 averages the motion curve over that
    many frames first, so a single-frame glitch (a blink, a compression artefact) does not win.
    Ties go to the earliest frame.
    """
    if isinstance(smooth, bool) or not isinstance(smooth, (int, np.integer)) or smooth < 1:
        raise ValueError(f"smooth must be a positive int, got {smooth!r}")
    motion = clip_motion(frames, onset, offset, method)
    if smooth > 1 and len(motion) > 1:
        # Edge padding keeps the curve's length and does not pull the ends towards zero.
        pad = smooth // 2
        padded = np.pad(motion, (pad, smooth - 1 - pad), mode="edge")
        motion = np.convolve(padded, np.ones(smooth) / smooth, mode="valid")
    return int(onset) + int(np.argmax(motion))


def onset_apex_pair(frames: np.ndarray, onset: int, apex: int) -> np.ndarray:
    """Stack the onset and apex frames, ``(2, H, W[, C])``, the input of the micro-expression net."""
    frames = _check_frames(frames)
    for name, index in (("onset", onset), ("apex", apex)):
        if not 0 <= int(index) < len(frames):
            raise ValueError(f"{name}={index} is outside a clip of {len(frames)} frames")
    return np.stack([frames[int(onset)], frames[int(apex)]])


def register_clip_faces(
    frames: np.ndarray,
    detector: FaceDetector,
    out_size: int | Sequence[int],
    reference: int = 0,
    fallback: int | None = None,
) -> np.ndarray | None:
    """Face registration and face-region crop of a whole clip with *one* transform.

    The face is detected on frame ``reference`` (the onset for a micro-expression; ``fallback``,
    e.g. the apex, is tried when none is found there) and the alignment of :func:`align_face`
    computed from it is applied to every frame, so all frames share one face frame of reference
    and the motion between them is kept exactly (a per-frame detection would add its jitter to
    the few-pixel motion that magnification amplifies). ``None`` when no face is found.
    """
    frames = _check_frames(frames)
    height, width = _size_hw(out_size, "out_size")
    box = None
    for index in (reference, fallback):
        if index is None:
            continue
        faces = detector.detect(frames[int(index)])
        if faces:
            box = faces[0]
            break
    if box is None:
        return None
    # the same box gives align_face the same transform for every frame
    return np.stack([align_face(frame, box, (height, width)) for frame in frames])


# ---------------------------------------------------------------------------------------------
# Model inputs
# ---------------------------------------------------------------------------------------------


def _per_channel(values: float | Sequence[float], channels: int, name: str) -> np.ndarray:
    array = np.atleast_1d(np.asarray(values, dtype=np.float32))
    if array.ndim != 1 or len(array) not in (1, channels):
        raise ValueError(f"{name} must have 1 or {channels} values, got {values!r}")
    return np.broadcast_to(array, (channels,)).reshape(channels, 1, 1)


def to_model_input(
    image_or_frames: np.ndarray,
    size: int | Sequence[int],
    channels: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
) -> np.ndarray:
    """Turn uint8 pixels into a normalised float32 ``(..., C, H, W)`` tensor.

    Accepts one image ``(H, W)`` / ``(H, W, 3)`` -> ``(C, H, W)``, or a stack of them (a clip or a
    batch) ``(N, H, W)`` / ``(N, H, W, 3)`` -> ``(N, C, H, W)``. A 3-D array whose last axis is 3 is
    read as one RGB image. Each image is resized to ``size`` = ``(height, width)`` (area averaging
    when shrinking, bilinear when enlarging), converted to ``channels`` (1 = grey, 3 = RGB; grey is
    replicated to RGB), scaled to [0, 1] and normalised as ``(x - mean) / std`` per channel -- the
    convention of :attr:`ModelMetadata.mean` / ``std``.
    """
    if not isinstance(image_or_frames, np.ndarray):
        raise ValueError(f"input must be a numpy array, got {type(image_or_frames).__name__}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    height, width = _size_hw(size)
    mean_c = _per_channel(mean, channels, "mean")
    std_c = _per_channel(std, channels, "std")
    if np.any(std_c <= 0):
        raise ValueError(f"std must be positive, got {std!r}")
    array = image_or_frames
    single = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))
    stack = _check_frames(array[None] if single else array)
    out = np.empty((len(stack), channels, height, width), dtype=np.float32)
    for i, image in enumerate(stack):
        shrinking = image.shape[0] > height or image.shape[1] > width
        if image.shape[:2] != (height, width):
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            image = cv2.resize(image, (width, height), interpolation=interpolation)
        if channels == 1:
            image = _to_grey(image)[None]
        else:
            image = (np.repeat(image[None], 3, axis=0) if image.ndim == 2 else image.transpose(2, 0, 1))
        out[i] = image
    out *= np.float32(1.0 / 255.0)
    out -= mean_c
    out /= std_c
    return out[0] if single else out
