"""Face preprocessing: alignment geometry, clip resampling, apex, detectors and model inputs."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from fer_core.data.preprocess import (
    FaceBox,
    HaarFaceDetector,
    LandmarkFaceDetector,
    align_face,
    aligned_eye_targets,
    alignment_matrix,
    clip_motion,
    detect_and_align,
    drop_faceless_frames,
    estimate_apex,
    eye_centres_from_landmarks,
    face_box_from_landmarks,
    nominal_eyes,
    onset_apex_pair,
    resample_clip,
    to_model_input,
)

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def blobs_image(points: list[tuple[float, float]], shape=(200, 240), sigma: float = 2.5) -> np.ndarray:
    """Black uint8 image with a Gaussian dot at each (x, y), centred with sub-pixel accuracy."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    image = np.zeros(shape, np.float64)
    for x, y in points:
        image += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.clip(np.rint(255 * image), 0, 255).astype(np.uint8)


def centroid_near(image: np.ndarray, point: tuple[float, float], radius: int) -> tuple[float, float]:
    """Intensity-weighted centroid (x, y) of ``image`` in a window around ``point``."""
    grey = image if image.ndim == 2 else image.mean(axis=2)
    x0, y0 = int(round(point[0])) - radius, int(round(point[1])) - radius
    window = grey[max(y0, 0) : y0 + 2 * radius + 1, max(x0, 0) : x0 + 2 * radius + 1].astype(np.float64)
    ys, xs = np.mgrid[0 : window.shape[0], 0 : window.shape[1]]
    total = window.sum()
    assert total > 0, "no blob near the expected point"
    return max(x0, 0) + (xs * window).sum() / total, max(y0, 0) + (ys * window).sum() / total


def draw_cartoon_face(size: int = 160, seed: int = 0) -> np.ndarray:
    """A grey, blurred, noisy cartoon face (skin oval, brows, eyes, nose, mouth) on a dark background."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size), 60, np.uint8)
    c, s = size / 2, size / 160

    def at(x: float, y: float) -> tuple[int, int]:
        return int(round(c + x * s)), int(round(c + y * s))

    def axes(a: float, b: float) -> tuple[int, int]:
        return max(int(round(a * s)), 1), max(int(round(b * s)), 1)

    cv2.ellipse(image, at(0, 5), axes(50, 66), 0, 0, 360, 190, -1)
    for side in (-1, 1):
        cv2.ellipse(image, at(side * 22, -22), axes(14, 4), 0, 0, 360, 80, -1)  # brow
        cv2.ellipse(image, at(side * 22, -8), axes(11, 6), 0, 0, 360, 40, -1)  # eye
    cv2.ellipse(image, at(0, 18), axes(8, 4), 0, 0, 360, 130, -1)  # nose
    cv2.ellipse(image, at(0, 40), axes(20, 6), 0, 0, 360, 70, -1)  # mouth
    image = cv2.GaussianBlur(image, (0, 0), 2 * s)
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def rotate_points(points, matrix) -> list[tuple[float, float]]:
    return [tuple(matrix[:, :2] @ np.array(p) + matrix[:, 2]) for p in points]


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_size", [(96, 96), (48, 48), (64, 48)])
@pytest.mark.parametrize("angle", [0.0, 17.0, -30.0])
def test_align_face_puts_the_eyes_at_their_targets(out_size, angle):
    eyes = [(92.3, 101.6), (151.7, 98.2)]
    image = blobs_image(eyes)
    if angle:  # a rotated (and so re-sampled) copy, eye positions mapped with the same matrix
        matrix = cv2.getRotationMatrix2D((120.0, 100.0), angle, 1.0)
        image = cv2.warpAffine(image, matrix, (240, 200), flags=cv2.INTER_LINEAR)
        eyes = rotate_points(eyes, matrix)
    box = FaceBox(60, 50, 120, 120, left_eye=eyes[0], right_eye=eyes[1])

    aligned = align_face(image, box, out_size=out_size, eye_y=0.4, eye_dist=0.45)

    assert aligned.shape == out_size and aligned.dtype == np.uint8
    for target in aligned_eye_targets(out_size, eye_y=0.4, eye_dist=0.45):
        found = centroid_near(aligned, target, radius=max(out_size) // 12)
        assert math.dist(found, target) < 1.0, (found, target)


def test_aligned_eye_targets_are_symmetric_and_level():
    (lx, ly), (rx, ry) = aligned_eye_targets((48, 48), eye_y=0.35, eye_dist=0.4)
    assert ly == ry == pytest.approx(0.35 * 48 - 0.5)
    assert (lx + rx) / 2 == pytest.approx((48 - 1) / 2)
    assert rx - lx == pytest.approx(0.4 * 48)


def test_align_face_without_eyes_crops_the_box_square_with_margin():
    # A blob at the centre of the box and one at its right edge.
    box = FaceBox(50, 40, 100, 100)
    cx, cy = box.centre
    image = cv2.cvtColor(blobs_image([(cx, cy), (box.x + box.w - 1, cy)]), cv2.COLOR_GRAY2RGB)

    aligned = align_face(image, box, out_size=(60, 60), margin=0.25)

    assert aligned.shape == (60, 60, 3)
    centre = centroid_near(aligned, (29.5, 29.5), radius=4)
    assert math.dist(centre, (29.5, 29.5)) < 0.5
    # The box's half-width (49.5 px) spans 60 / (100 * 1.5) px per source px in the output.
    edge = centroid_near(aligned, (29.5 + 49.5 * 0.4, 29.5), radius=4)
    assert edge[0] == pytest.approx(29.5 + 49.5 * 0.4, abs=0.5)


def test_align_face_without_eyes_frames_the_nominal_eye_positions_like_eye_alignment():
    box = FaceBox(40, 30, 150, 150)
    image = blobs_image(list(nominal_eyes(box)))
    without = align_face(image, box, out_size=(64, 64))
    with_eyes = align_face(image, FaceBox(40, 30, 150, 150, left_eye=nominal_eyes(box)[0],
                                          right_eye=nominal_eyes(box)[1]), out_size=(64, 64))
    np.testing.assert_array_equal(without, with_eyes)
    for target in aligned_eye_targets((64, 64)):
        assert math.dist(centroid_near(without, target, radius=5), target) < 1.0


def test_align_face_colour_and_grey_outputs():
    rgb = np.dstack([blobs_image([(92, 100), (150, 100)])] * 3)
    box = FaceBox(60, 50, 120, 120, left_eye=(92, 100), right_eye=(150, 100))
    assert align_face(rgb, box, (48, 48)).shape == (48, 48, 3)
    assert align_face(rgb, box, (48, 48), grayscale=True).shape == (48, 48)
    assert align_face(rgb[..., 0], box, 32).shape == (32, 32)


def test_align_face_rejects_bad_input():
    box = FaceBox(0, 0, 10, 10)
    with pytest.raises(ValueError):
        align_face(np.zeros((20, 20), np.float32), box)
    with pytest.raises(ValueError):
        align_face(np.zeros((20, 20, 4), np.uint8), box)
    with pytest.raises(ValueError):
        align_face(np.zeros((0, 20), np.uint8), box)
    with pytest.raises(ValueError):
        align_face(np.zeros((20, 20), np.uint8), box, out_size=(0, 48))
    with pytest.raises(ValueError):
        FaceBox(0, 0, 0, 10)
    with pytest.raises(ValueError):
        FaceBox(0, 0, 10, 10, left_eye=(1.0, 2.0))
    with pytest.raises(ValueError):  # coincident eyes define no scale
        align_face(np.zeros((20, 20), np.uint8), FaceBox(0, 0, 10, 10, left_eye=(5, 5), right_eye=(5, 5)))


# ---------------------------------------------------------------------------------------------
# Landmarks and detectors
# ---------------------------------------------------------------------------------------------


def fake_landmarks(left=(40.0, 50.0), right=(80.0, 52.0)) -> np.ndarray:
    rng = np.random.default_rng(3)
    points = rng.uniform(30, 100, size=(68, 2))
    angles = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points[36:42] = np.array(left) + 4 * ring
    points[42:48] = np.array(right) + 4 * ring
    return points


def test_eye_centres_and_box_from_landmarks():
    points = fake_landmarks()
    left, right = eye_centres_from_landmarks(points)
    assert left == pytest.approx((40.0, 50.0)) and right == pytest.approx((80.0, 52.0))
    box = face_box_from_landmarks(points, image_shape=(120, 120))
    assert box.left_eye == pytest.approx(left) and box.right_eye == pytest.approx(right)
    assert box.x <= points[:, 0].min() and box.x + box.w - 1 >= points[:, 0].max()
    assert box.y <= points[:, 1].min() and box.y + box.h - 1 >= points[:, 1].max()
    with pytest.raises(ValueError):
        eye_centres_from_landmarks(points[:60])


def test_landmark_detector_finds_faces_and_skips_nan_faces():
    image = np.zeros((120, 120), np.uint8)
    assert len(LandmarkFaceDetector(fake_landmarks()).detect(image)) == 1
    missing = np.full((68, 2), np.nan)
    assert LandmarkFaceDetector(missing).detect(image) == []
    both = np.stack([missing, fake_landmarks()])
    (face,) = LandmarkFaceDetector(both).detect(image)
    assert face.has_eyes
    image = blobs_image([(40, 50), (80, 52)], shape=(120, 120))
    aligned = detect_and_align(image, LandmarkFaceDetector(fake_landmarks()), (48, 48))
    for target in aligned_eye_targets((48, 48)):
        assert math.dist(centroid_near(aligned, target, 4), target) < 1.0


def test_haar_detector_finds_a_drawn_face_and_nothing_in_flat_or_noise_images():
    detector = HaarFaceDetector()
    for size in (96, 160):
        image = draw_cartoon_face(size)
        faces = detector.detect(np.dstack([image] * 3))  # RGB input
        assert len(faces) >= 1
        face = faces[0]
        # The face oval is centred (slightly below the middle) and spans ~60% of the image.
        assert abs(face.centre[0] - size / 2) < 0.1 * size and abs(face.centre[1] - size / 2) < 0.15 * size
        assert 0.4 * size < face.w < 1.0 * size
        assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    assert detector.detect(np.full((128, 128), 128, np.uint8)) == []
    noise = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    assert detector.detect(cv2.GaussianBlur(noise, (0, 0), 1.0)) == []
    assert detect_and_align(np.full((128, 128), 128, np.uint8), detector, (48, 48)) is None
    assert detect_and_align(draw_cartoon_face(128), detector, (48, 48)).shape == (48, 48)


def test_haar_detector_rejects_bad_arguments():
    with pytest.raises(ValueError):
        HaarFaceDetector(scale_factor=1.0)
    with pytest.raises(ValueError):
        HaarFaceDetector().detect(np.zeros((64, 64), np.float64))


def test_drop_faceless_frames_with_a_fake_detector():
    class BrightFrameDetector:  # "finds a face" in frames brighter than mid-grey
        def detect(self, image):
            return [FaceBox(0, 0, 4, 4)] if image.mean() > 128 else []

    levels = np.array([200, 10, 250, 130, 0], np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (5, 8, 8, 3)).copy()
    kept, indices = drop_faceless_frames(frames, BrightFrameDetector())
    assert indices.tolist() == [0, 2, 3]
    assert np.array_equal(kept, frames[[0, 2, 3]])
    none_kept, no_indices = drop_faceless_frames(frames[[1, 4]], BrightFrameDetector())
    assert none_kept.shape == (0, 8, 8, 3) and no_indices.size == 0


# ---------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------


def ramp_clip(num_frames: int, dtype=np.float64, slope: float = 3.0, shape=(4, 5)) -> np.ndarray:
    base = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    return np.stack([base + slope * t for t in range(num_frames)]).astype(dtype)


@pytest.mark.parametrize("num_in,num_out", [(10, 4), (10, 10), (7, 19), (2, 5), (30, 8)])
def test_interpolate_reproduces_a_linear_ramp_exactly(num_in, num_out):
    clip = ramp_clip(num_in)
    out = resample_clip(clip, num_out, "interpolate")
    positions = np.linspace(0, num_in - 1, num_out)
    assert out.shape == (num_out, 4, 5) and out.dtype == clip.dtype
    np.testing.assert_allclose(out, ramp_clip(1)[0] + 3.0 * positions[:, None, None], atol=1e-9)
    np.testing.assert_array_equal(out[0], clip[0])
    np.testing.assert_array_equal(out[-1], clip[-1])


def test_interpolate_uint8_rounds_and_keeps_dtype_and_channels():
    clip = np.stack([np.full((6, 6, 3), v, np.uint8) for v in (0, 10, 20, 30)])
    out = resample_clip(clip, 7)
    assert out.dtype == np.uint8 and out.shape == (7, 6, 6, 3)
    assert out[:, 0, 0, 0].tolist() == [0, 5, 10, 15, 20, 25, 30]
    assert resample_clip(clip, 1)[0, 0, 0, 0] == 15  # a single frame: the clip's middle


def test_uniform_picks_nearest_frames():
    clip = ramp_clip(10, np.uint8, slope=1.0)
    out = resample_clip(clip, 4, "uniform")  # positions 0, 3, 6, 9
    np.testing.assert_array_equal(out, clip[[0, 3, 6, 9]])
    up = resample_clip(clip[:3], 5, "uniform")  # positions 0, .5, 1, 1.5, 2 -> halves round up
    np.testing.assert_array_equal(up, clip[[0, 1, 1, 2, 2]])


def test_keyframes_keeps_the_largest_changes_in_time_order():
    values = [0, 0, 0, 90, 90, 90, 40, 40, 200, 200]  # changes at frames 3 (90), 6 (50), 8 (160)
    clip = np.stack([np.full((5, 5), v, np.uint8) for v in values])
    out = resample_clip(clip, 4, "keyframes")
    assert out[:, 0, 0].tolist() == [0, 90, 40, 200]  # frames 0, 3, 6, 8
    assert resample_clip(clip, 3, "keyframes")[:, 0, 0].tolist() == [0, 90, 200]
    assert resample_clip(clip[:3], 6, "keyframes").shape == (6, 5, 5)  # upsampling = uniform


def test_keyframes_plus_interpolation_selects_down_and_interpolates_up():
    values = [0, 0, 0, 90, 90, 90, 40, 40, 200, 200]
    clip = np.stack([np.full((5, 5), v, np.uint8) for v in values])
    # longer than needed: the key frames 0, 3, 6, 8 (no blended pixels)
    assert resample_clip(clip, 4, "keyframes+interpolate")[:, 0, 0].tolist() == [0, 90, 40, 200]
    # shorter than needed: time interpolation of (0, 90, 40) to 5 frames: 0, 45, 90, 65, 40
    short = clip[[0, 3, 6]]
    assert resample_clip(short, 5, "keyframes+interpolate")[:, 0, 0].tolist() == [0, 45, 90, 65, 40]
    np.testing.assert_array_equal(resample_clip(clip, 10, "keyframes+interpolate"), clip)


def test_resample_clip_rejects_bad_arguments():
    clip = ramp_clip(5, np.uint8)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            resample_clip(clip, bad)
    with pytest.raises(ValueError):
        resample_clip(clip, 3, "cubic")
    with pytest.raises(ValueError):
        resample_clip(clip[:0], 3)
    with pytest.raises(ValueError):
        resample_clip(clip[0], 3)  # a single image, not a clip


def moving_dot_clip(num_frames: int, apex: int, amplitude: float = 6.0, seed: int = 0) -> np.ndarray:
    """Two dots that move apart from their onset positions up to ``apex`` and back, with sensor noise
    (small, micro-expression-like displacements)."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(num_frames):
        shift = amplitude * (1.0 - abs(t - apex) / max(apex, num_frames - 1 - apex))
        frame = blobs_image([(30.0 + shift, 32.0), (60.0 - shift, 40.0)], shape=(64, 96), sigma=4.0)
        frames.append(np.clip(frame + rng.normal(0, 3, frame.shape), 0, 255).astype(np.uint8))
    return np.stack(frames)


@pytest.mark.parametrize("method", ["diff", "flow"])
def test_estimate_apex_finds_a_planted_peak(method):
    clip = moving_dot_clip(20, apex=13)
    assert estimate_apex(clip, method=method) == 13
    # Restricted to a window that ends before the peak, the apex is the window's most-moved frame.
    assert estimate_apex(clip, onset=2, offset=9, method=method) == 9
    motion = clip_motion(clip, method=method)
    assert motion.shape == (20,) and motion[0] == pytest.approx(0.0)


def test_estimate_apex_smoothing_ignores_a_one_frame_glitch():
    clip = moving_dot_clip(20, apex=13)
    clip[4] = np.clip(clip[4].astype(np.int16) + 20, 0, 255).astype(np.uint8)  # a one-frame flash
    assert estimate_apex(clip) == 4
    assert estimate_apex(clip, smooth=5) in (12, 13, 14)
    assert estimate_apex(clip, method="flow") == 13  # optical flow is blind to a brightness change


def test_estimate_apex_rejects_bad_spans():
    clip = moving_dot_clip(6, apex=3)
    for onset, offset in ((4, 2), (-1, 3), (0, 6)):
        with pytest.raises(ValueError):
            estimate_apex(clip, onset, offset)
    with pytest.raises(ValueError):
        estimate_apex(clip, method="sift")


def test_onset_apex_pair_stacks_the_two_frames():
    clip = np.stack([np.full((8, 9, 3), v, np.uint8) for v in range(6)])
    pair = onset_apex_pair(clip, 1, 4)
    assert pair.shape == (2, 8, 9, 3)
    assert pair[:, 0, 0, 0].tolist() == [1, 4]
    assert onset_apex_pair(clip[..., 0], 0, 5).shape == (2, 8, 9)
    with pytest.raises(ValueError):
        onset_apex_pair(clip, 0, 6)


# ---------------------------------------------------------------------------------------------
# Model inputs
# ---------------------------------------------------------------------------------------------


def test_to_model_input_shapes_and_normalisation():
    grey = np.full((40, 30), 255, np.uint8)
    out = to_model_input(grey, 48, channels=1, mean=(0.5,), std=(0.5,))
    assert out.shape == (1, 48, 48) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)

    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 51, 0
    out = to_model_input(rgb, (32, 16), channels=3, mean=(0.5, 0.2, 0.0), std=(0.25, 0.5, 1.0))
    assert out.shape == (3, 32, 16)
    np.testing.assert_allclose(out[:, 5, 5], [2.0, 0.0, 0.0], atol=1e-5)

    grey_of_rgb = to_model_input(rgb, 32, channels=1, mean=0.0, std=1.0)
    np.testing.assert_allclose(grey_of_rgb, (0.299 * 255 + 0.587 * 51) / 255, atol=2 / 255)
    replicated = to_model_input(grey, 24, channels=3, mean=0.5, std=0.5)
    assert replicated.shape == (3, 24, 24) and np.allclose(replicated, 1.0)


def test_to_model_input_clips_match_per_frame_conversion():
    clip = np.random.default_rng(0).integers(0, 256, (5, 60, 50, 3), dtype=np.uint8)
    out = to_model_input(clip, 32, channels=1, mean=0.5, std=0.5)
    assert out.shape == (5, 1, 32, 32)
    np.testing.assert_array_equal(out[3], to_model_input(clip[3], 32, channels=1, mean=0.5, std=0.5))
    assert to_model_input(clip[..., 0], (20, 24), 3, 0.5, 0.5).shape == (5, 3, 20, 24)


def test_to_model_input_rejects_bad_input():
    image = np.zeros((10, 10), np.uint8)
    with pytest.raises(ValueError):
        to_model_input(image.astype(np.float32), 8, 1, 0.5, 0.5)
    with pytest.raises(ValueError):
        to_model_input(image, 8, 2, 0.5, 0.5)
    with pytest.raises(ValueError):
        to_model_input(image, 8, 3, (0.5, 0.5), 0.5)
    with pytest.raises(ValueError):
        to_model_input(image, 8, 1, 0.5, 0.0)
    with pytest.raises(ValueError):
        to_model_input(np.zeros((2, 3, 10, 10), np.uint8), 8, 1, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------
# SynthFACS faces (floors just below rates measured on 150 faces per setting, seed 1)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_size,difficulty,min_face_rate,min_eye_rate",
    [(96, 0.0, 0.85, 0.9), (128, 0.5, 0.85, 0.8)],  # measured 0.95 / 1.00 and 0.96 / 0.91
)
def test_haar_detects_synthfacs_faces_and_aligns_their_eyes(
    image_size, difficulty, min_face_rate, min_eye_rate
):
    from fer_core.data.synthfacs import SynthFACS

    faces = SynthFACS(seed=7, image_size=image_size, difficulty=difficulty).expression_set(40)
    detector = HaarFaceDetector()
    targets = aligned_eye_targets((48, 48))
    found = with_eyes = false_alarms = 0
    errors = []
    for image, landmarks, has_face in zip(faces.images, faces.landmarks, faces.has_face):
        detections = detector.detect(image)
        if not has_face:
            false_alarms += bool(detections)
            continue
        true_eyes = eye_centres_from_landmarks(landmarks)
        if not detections or not all(
            detections[0].x <= x < detections[0].x + detections[0].w
            and detections[0].y <= y < detections[0].y + detections[0].h
            for x, y in true_eyes
        ):
            continue
        found += 1
        with_eyes += detections[0].has_eyes
        # Where the true eye centres land in the 48x48 aligned crop, versus where they should.
        matrix = alignment_matrix(detections[0], (48, 48))
        for (x, y), target in zip(true_eyes, targets):
            errors.append(math.dist(matrix @ (x, y, 1.0), target))
    num_faces = int(faces.has_face.sum())
    assert found >= min_face_rate * num_faces, (found, num_faces)
    assert with_eyes >= min_eye_rate * found, (with_eyes, found)
    assert false_alarms <= 1
    # Measured median 0.45-0.62 px, 90th percentile 0.9-1.3 px.
    assert np.median(errors) < 1.0 and np.percentile(errors, 90) < 2.5
