"""SynthFACS: determinism, shapes, landmark semantics, AU geometry, label protocols, speed, detectability."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from fer_core.data.labels import AU_NAMES, CASME2_CLASSES, EXPRESSIONS, SMIC_CLASSES
from fer_core.data.synthfacs import (
    AU_ACTIVE_THRESHOLD,
    EXPRESSION_PROTOTYPES,
    MAX_INTENSITY,
    MICRO_PATTERNS,
    MIRROR_68,
    TEMPLATE_68,
    Nuisance,
    SynthFACS,
    au_vector,
    save_contact_sheet,
)

AU = {name: i for i, name in enumerate(AU_NAMES)}
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)


@pytest.fixture(scope="module")
def gen64() -> SynthFACS:
    return SynthFACS(seed=0, image_size=64)


@pytest.fixture(scope="module")
def expressions(gen64):
    return gen64.expression_set(140, num_subjects=10)


def _render(gen: SynthFACS, **aus: float) -> np.ndarray:
    return gen.render(gen.identity(3), aus)[1]


# ------------------------------------------------------------------ determinism and shapes


def test_same_seed_same_data_different_seed_different_data():
    a, b, c = (SynthFACS(seed=s, image_size=32, difficulty=0.5) for s in (7, 7, 8))
    sa, sb, sc = (g.expression_set(21, num_subjects=3) for g in (a, b, c))
    for field in ("images", "labels", "aus", "valence_arousal", "subjects", "has_face"):
        np.testing.assert_array_equal(getattr(sa, field), getattr(sb, field))
    np.testing.assert_array_equal(sa.landmarks, sb.landmarks)  # NaN rows compare equal here
    assert not np.array_equal(sa.images, sc.images)
    # The stream moves on: a second call draws new samples, identically for both generators.
    ma, mb = a.micro_clips(4, num_frames=6), b.micro_clips(4, num_frames=6)
    np.testing.assert_array_equal(ma.clips, mb.clips)
    assert not np.array_equal(a.expression_set(21, num_subjects=3).images, sa.images)


def test_difficulty_changes_the_shot_not_the_content():
    easy = SynthFACS(seed=3, image_size=32, difficulty=0.0).expression_set(30)
    hard = SynthFACS(seed=3, image_size=32, difficulty=1.0).expression_set(30)
    np.testing.assert_array_equal(easy.labels, hard.labels)
    np.testing.assert_array_equal(easy.aus, hard.aus)
    np.testing.assert_array_equal(easy.subjects, hard.subjects)
    assert not np.array_equal(easy.images, hard.images)
    assert np.all(easy.poses == 0) and np.any(hard.poses != 0)


def test_expression_set_shapes_and_dtypes(expressions):
    s, n = expressions, 140
    assert s.images.shape == (n, 64, 64, 3) and s.images.dtype == np.uint8
    assert s.labels.shape == (n,) and s.labels.dtype == np.int64
    assert s.aus.shape == (n, 14) and s.aus.dtype == np.float32
    assert s.valence_arousal.shape == (n, 2) and s.valence_arousal.dtype == np.float32
    assert s.landmarks.shape == (n, 68, 2) and s.landmarks.dtype == np.float32
    assert s.subjects.dtype == np.int64 and set(s.subjects) == set(range(10))
    assert s.has_face.dtype == bool and s.has_face.all()  # difficulty 0: every frame has a face
    assert np.bincount(s.labels, minlength=7).tolist() == [20] * 7  # balanced classes
    assert (s.aus >= 0).all() and (s.aus <= 1).all() and (np.abs(s.valence_arousal) <= 1).all()
    assert s.label_names == EXPRESSIONS and len(s) == n


@pytest.mark.parametrize("scheme, names", [("casme2", CASME2_CLASSES), ("smic", SMIC_CLASSES)])
def test_micro_clip_shapes(gen64, scheme, names):
    c = gen64.micro_clips(10, scheme=scheme, num_frames=12, num_subjects=4)
    assert c.clips.shape == (10, 12, 64, 64, 3) and c.clips.dtype == np.uint8
    assert c.aus.shape == (10, 12, 14) and c.landmarks.shape == (10, 12, 68, 2) and c.has_face.shape == (10, 12)
    assert c.label_names == names and set(c.labels) <= set(range(len(names)))
    for field in ("labels", "subjects", "onset", "apex", "offset"):
        assert getattr(c, field).dtype == np.int64 and getattr(c, field).shape == (10,)


def test_dynamic_clips_shapes_and_full_intensity():
    gen = SynthFACS(seed=2, image_size=32, difficulty=0.0)
    c = gen.dynamic_clips(14, num_frames=16)
    assert c.clips.shape == (14, 16, 32, 32, 3) and c.label_names == EXPRESSIONS
    assert c.has_face.all()  # difficulty 0: no faceless frames, no drift
    assert (c.poses == 0).all()
    at_apex = c.aus[np.arange(14), c.apex]
    expressive = c.labels != EXPRESSIONS.index("neutral")
    assert (at_apex[expressive].max(axis=1) >= 0.6).all()
    assert (at_apex[~expressive].max(axis=1) < 0.1).all()
    assert ((c.onset < c.apex) & (c.apex <= c.offset) & (c.offset <= 15)).all()


# ------------------------------------------------------------------ landmarks


def test_template_is_ibug_ordered_and_mirror_symmetric():
    t = TEMPLATE_68
    assert t.shape == (68, 2)
    np.testing.assert_array_equal(MIRROR_68[MIRROR_68], np.arange(68))
    np.testing.assert_allclose(t[MIRROR_68, 0], -t[:, 0], atol=1e-6)
    np.testing.assert_allclose(t[MIRROR_68, 1], t[:, 1], atol=1e-6)
    assert t[8, 1] == t[:17, 1].max()  # chin is the jaw's lowest point
    assert (np.diff(t[27:31, 1]) > 0).all()  # nose bridge runs down to the tip


def test_rendered_landmarks_are_in_ibug_order(expressions):
    lm = expressions.landmarks
    assert np.isfinite(lm).all() and (lm > 0).all() and (lm < 64).all()
    left_eye, right_eye = lm[:, LEFT_EYE].mean(1), lm[:, RIGHT_EYE].mean(1)
    assert (left_eye[:, 0] < right_eye[:, 0]).all()  # iBUG 36-41 is the eye on the image's left
    assert (lm[:, 0, 0] < lm[:, 16, 0]).all() and (lm[:, 48, 0] < lm[:, 54, 0]).all()
    brows_y, eyes_y = lm[:, 17:27, 1].mean(1), lm[:, 36:48, 1].mean(1)
    nose_tip_y, mouth_y = lm[:, 30, 1], lm[:, 48:68, 1].mean(1)
    assert (brows_y < eyes_y).all() and (eyes_y < nose_tip_y).all() and (nose_tip_y < mouth_y).all()
    assert (mouth_y < lm[:, 8, 1]).all()
    assert (lm[:, 57, 1] >= lm[:, 51, 1]).all()  # lower lip under the upper lip


def test_landmarks_sit_on_the_painted_features(gen64):
    """Landmarks are where the pixels are: pupils dark, lips reddish, a clean background far away."""
    img, lm = gen64.render(gen64.identity(0), {}, nuisance=Nuisance(background=(200.0, 200.0, 200.0)))
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(float)
    eye_centre = np.round(lm[LEFT_EYE].mean(0)).astype(int)
    cheek = np.round(0.5 * (lm[2] + lm[31])).astype(int)
    pupil = grey[eye_centre[1] - 1: eye_centre[1] + 2, eye_centre[0] - 1: eye_centre[0] + 2].min()
    assert pupil < grey[cheek[1], cheek[0]] - 60
    lip = np.round(0.5 * (lm[51] + lm[62])).astype(int)
    r, g, _ = img[lip[1], lip[0]].astype(int)
    assert r > g + 30
    assert grey[1, 1] == 200


# ------------------------------------------------------------------ action units


@pytest.mark.parametrize(
    "au, measure, sign",
    [
        ("AU1", lambda lm: lm[[21, 22], 1].mean(), -1),  # inner brows up
        ("AU2", lambda lm: lm[[17, 26], 1].mean(), -1),  # outer brows up
        ("AU4", lambda lm: lm[17:27, 1].mean(), +1),  # brows down ...
        ("AU4", lambda lm: lm[22, 0] - lm[21, 0], -1),  # ... and together
        ("AU5", lambda lm: lm[[40, 41], 1].mean() - lm[[37, 38], 1].mean(), +1),  # eye opens
        ("AU6", lambda lm: lm[[40, 41], 1].mean(), -1),  # lower lid / cheek up
        ("AU7", lambda lm: lm[[40, 41], 1].mean() - lm[[37, 38], 1].mean(), -1),  # eye narrows
        ("AU9", lambda lm: lm[31:36, 1].mean(), -1),  # nose wings up
        ("AU12", lambda lm: lm[[48, 54], 1].mean(), -1),  # lip corners up ...
        ("AU12", lambda lm: lm[54, 0] - lm[48, 0], +1),  # ... and out
        ("AU15", lambda lm: lm[[48, 54], 1].mean(), +1),  # corners down
        ("AU17", lambda lm: lm[8, 1], -1),  # chin up
        ("AU20", lambda lm: lm[54, 0] - lm[48, 0], +1),  # lips stretched
        ("AU23", lambda lm: lm[54, 0] - lm[48, 0], -1),  # lips narrowed
        ("AU25", lambda lm: lm[66, 1] - lm[62, 1], +1),  # lips part
        ("AU26", lambda lm: lm[8, 1], +1),  # jaw drops
    ],
)
def test_each_au_moves_its_landmarks_the_right_way(gen64, au, measure, sign):
    neutral, active = _render(gen64), _render(gen64, **{au: 1.0})
    change = measure(active) - measure(neutral)
    assert sign * change > 0.4, f"{au}: {change:+.2f} px"  # > 0.4 px at 64 px (~0.03 face widths)


def test_au_geometry_is_linear_and_extrapolates_then_clamps(gen64):
    neutral = _render(gen64)
    d1 = _render(gen64, AU12=1.0) - neutral
    np.testing.assert_allclose(_render(gen64, AU12=1.7) - neutral, 1.7 * d1, atol=1e-3)
    np.testing.assert_allclose(_render(gen64, AU12=5.0), _render(gen64, AU12=MAX_INTENSITY), atol=1e-4)
    img_a, _ = gen64.render(gen64.identity(3), au_vector({"AU12": 0.5}))
    img_b, _ = gen64.render(gen64.identity(3), {"AU12": 0.5})
    np.testing.assert_array_equal(img_a, img_b)
    for bad in ({"AU99": 1.0}, -np.ones(14), np.ones(13), np.full(14, np.nan)):
        with pytest.raises(ValueError):
            gen64.render(gen64.identity(3), bad)


def test_pose_turns_the_face(gen64):
    ident = gen64.identity(1)
    front = gen64.render(ident, {}, pose=(0, 0, 0))[1]
    yawed = gen64.render(ident, {}, pose=(25, 0, 0))[1]
    rolled = gen64.render(ident, {}, pose=(0, 0, 20))[1]
    # Yaw to the image's right: the protruding nose tip moves further right than the temples.
    assert yawed[30, 0] - front[30, 0] > (yawed[[0, 16], 0] - front[[0, 16], 0]).mean() + 1.0
    eye_line = rolled[RIGHT_EYE].mean(0) - rolled[LEFT_EYE].mean(0)
    assert np.degrees(np.arctan2(eye_line[1], eye_line[0])) == pytest.approx(20, abs=0.5)


# ------------------------------------------------------------------ labels


def test_prototypes_are_the_emfacs_sets():
    expected = {
        "happy": {"AU6", "AU12"}, "sad": {"AU1", "AU4", "AU15"}, "surprise": {"AU1", "AU2", "AU5", "AU26"},
        "fear": {"AU1", "AU2", "AU4", "AU5", "AU7", "AU20", "AU26"}, "angry": {"AU4", "AU5", "AU7", "AU23"},
        "disgust": {"AU9", "AU15"}, "neutral": set(),
    }
    assert {k: set(v) for k, v in EXPRESSION_PROTOTYPES.items()} == expected
    assert set(EXPRESSION_PROTOTYPES) == set(EXPRESSIONS)


def test_sampled_aus_follow_each_label_prototype(expressions):
    for aus, label in zip(expressions.aus, expressions.labels):
        active = {AU_NAMES[i] for i in np.flatnonzero(aus >= 0.2)}
        assert active == set(EXPRESSION_PROTOTYPES[EXPRESSIONS[label]]), EXPRESSIONS[label]


def test_valence_arousal_signs_per_class(expressions):
    va, labels = expressions.valence_arousal, expressions.labels
    expected = {"happy": (1, 1), "sad": (-1, -1), "angry": (-1, 1), "fear": (-1, 1), "disgust": (-1, 1),
                "surprise": (0, 1)}
    for name, (sv, sa) in expected.items():
        rows = va[labels == EXPRESSIONS.index(name)]
        if sv:
            assert (np.sign(rows[:, 0]) == sv).all(), name
        assert (np.sign(rows[:, 1]) == sa).all(), name
    assert (np.abs(va[labels == EXPRESSIONS.index("neutral")]) <= 0.08).all()


def test_expressions_are_learnable_from_48px_grey_pixels():
    """A linear (ridge) classifier on raw 48x48 grey pixels separates the 7 classes on unseen subjects."""
    gen = SynthFACS(seed=11, image_size=48)
    train, test = gen.expression_set(560, num_subjects=20), gen.expression_set(280, num_subjects=8, first_subject=50)

    def features(s):
        x = np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in s.images]).reshape(len(s), -1).astype(np.float64)
        x -= x.mean(1, keepdims=True)
        return x / (x.std(1, keepdims=True) + 1e-6)

    x_train, x_test = features(train), features(test)
    mean = x_train.mean(0)
    x_train, x_test = x_train - mean, x_test - mean
    targets = np.eye(7)[train.labels]
    dual = np.linalg.solve(x_train @ x_train.T + 100 * np.eye(len(x_train)), targets - targets.mean(0))
    accuracy = ((x_test @ x_train.T @ dual).argmax(1) == test.labels).mean()
    assert accuracy >= 0.6, f"subject-independent accuracy {accuracy:.2f} (chance 0.14)"


# ------------------------------------------------------------------ micro-expressions and magnification


@pytest.mark.parametrize("scheme", ["casme2", "smic"])
def test_micro_clips_are_brief_subtle_and_follow_their_pattern(gen64, scheme):
    c = gen64.micro_clips(20, scheme=scheme, num_frames=24)
    rows = np.arange(20)
    assert ((c.onset < c.apex) & (c.apex < c.offset) & (c.offset <= 23)).all()
    apex_aus = c.aus[rows, c.apex]
    assert (apex_aus.max(1) >= 0.1 - 1e-6).all() and (apex_aus.max(1) <= 0.3 + 1e-6).all()
    np.testing.assert_array_equal(c.aus[rows, c.onset], 0)
    np.testing.assert_array_equal(c.aus[rows, c.offset], 0)
    assert (c.aus.max(axis=(1, 2)) == apex_aus.max(1)).all()  # the apex is the peak
    for aus, label in zip(apex_aus, c.labels):
        active = {AU_NAMES[i] for i in np.flatnonzero(aus > 0)}
        assert any(active == set(p) for p in MICRO_PATTERNS[scheme][c.label_names[label]])
    # Small but real motion between onset and apex.
    motion = np.abs(c.landmarks[rows, c.apex] - c.landmarks[rows, c.onset]).max(axis=(1, 2))
    assert (motion > 0.05).all() and (motion < 3.0).all(), motion  # pixels at 64 px: often sub-pixel, as in real data
    pixels = np.abs(c.clips[rows, c.apex].astype(int) - c.clips[rows, c.onset]).max(axis=(1, 2, 3))
    assert (pixels > 10).all()


def test_magnified_pair_is_the_exact_extrapolated_render(gen64):
    p = gen64.magnified_pairs(24, alpha_range=(1.0, 3.0))
    expected = np.clip(p.onset_aus + (1 + p.alpha[:, None]) * (p.apex_aus - p.onset_aus), 0, MAX_INTENSITY)
    np.testing.assert_allclose(p.magnified_aus, expected, atol=1e-6)
    apex_motion = p.apex_landmarks - p.onset_landmarks
    magnified_motion = p.magnified_landmarks - p.onset_landmarks
    ratio = (magnified_motion * apex_motion).sum((1, 2)) / (apex_motion**2).sum((1, 2))
    np.testing.assert_allclose(ratio, 1 + p.alpha, rtol=0.02)
    # Same face and scene: a render with the magnified AUs reproduces the magnified image.
    img, lm = gen64.render(gen64.identity(int(p.subjects[0])), p.magnified_aus[0].astype(np.float64))
    np.testing.assert_allclose(lm, p.magnified_landmarks[0], atol=1e-3)
    diff_apex = np.abs(p.apex.astype(int) - p.onset).sum((1, 2, 3))
    diff_mag = np.abs(p.magnified.astype(int) - p.onset).sum((1, 2, 3))
    assert (diff_mag > diff_apex).all()


def test_large_magnification_saturates_without_folding_the_face(gen64):
    p = gen64.magnified_pairs(20, alpha_range=(12.0, 13.0), scheme="smic")
    assert (p.magnified_aus <= MAX_INTENSITY).all() and (p.magnified_aus.max(1) > 1.0).all()
    lm = p.magnified_landmarks
    assert np.isfinite(lm).all()
    assert (lm[:, [41, 40, 47, 46], 1] >= lm[:, [37, 38, 43, 44], 1] - 1e-4).all()  # lids never cross
    assert (lm[:, [67, 66, 65], 1] >= lm[:, [61, 62, 63], 1] - 1e-4).all()  # lips never cross


# ------------------------------------------------------------------ AU label sets


def test_au_sets_noisy_flip_rate_and_truth():
    gen = SynthFACS(seed=4, image_size=16)
    a = gen.au_sets(200, 1000, 100, flip_rate=0.2)
    for subset, n in ((a.clean, 200), (a.noisy, 1000), (a.unlabelled, 100)):
        assert subset.images.shape == (n, 16, 16, 3) and subset.labels.shape == (n, 14)
        assert subset.labels.dtype == np.int64 and subset.subjects.dtype == np.int64
        assert subset.intensities.dtype == np.float32
        np.testing.assert_array_equal(subset.true_labels, subset.intensities >= AU_ACTIVE_THRESHOLD)
        # A margin around the threshold: occurrence is unambiguous in the pixels.
        assert ((subset.intensities >= 0.3) | (subset.intensities <= 0.1)).all()
    np.testing.assert_array_equal(a.clean.labels, a.clean.true_labels)
    assert (a.unlabelled.labels == -1).all()
    flipped = a.noisy.labels != a.noisy.true_labels
    assert flipped.mean() == pytest.approx(0.2, abs=0.015)
    assert 0.05 < a.clean.true_labels.mean() < 0.5  # neither all-off nor all-on


def test_au_sets_per_au_flip_rates():
    rates = np.linspace(0.0, 0.4, 14)
    a = SynthFACS(seed=5, image_size=16).au_sets(0, 1000, 0, flip_rate=rates)
    observed = (a.noisy.labels != a.noisy.true_labels).mean(0)
    np.testing.assert_allclose(observed, rates, atol=0.05)  # ~3 standard errors at the 0.4 end
    assert observed[0] == 0
    with pytest.raises(ValueError):
        SynthFACS(seed=5, image_size=16).au_sets(1, 1, 1, flip_rate=[0.1, 0.2])
    with pytest.raises(ValueError):
        SynthFACS(seed=5, image_size=16).au_sets(1, 1, 1, flip_rate=1.5)


# ------------------------------------------------------------------ nuisances


def test_faceless_frames_are_flagged_with_nan_landmarks():
    gen = SynthFACS(seed=6, image_size=32, difficulty=1.0)
    s = gen.expression_set(200)
    assert 0 < (~s.has_face).sum() < 40
    assert np.isnan(s.landmarks[~s.has_face]).all() and np.isfinite(s.landmarks[s.has_face]).all()
    c = gen.dynamic_clips(12, num_frames=12, faceless_rate=1.0)
    assert (~c.has_face).any(axis=1).all()  # every clip loses the face for a while ...
    assert c.has_face[np.arange(12), c.apex].all()  # ... but never at its apex
    assert np.isnan(c.landmarks[~c.has_face]).all()
    assert (np.abs(np.diff(c.poses, axis=1)).sum(axis=(1, 2)) > 0).all()  # pose drifts


def test_difficulty_zero_is_clean_and_frontal(expressions):
    # Faces are centred: the eye midpoint sits on the vertical mid-line up to identity variation.
    eyes_mid = 0.5 * (expressions.landmarks[:, LEFT_EYE].mean(1) + expressions.landmarks[:, RIGHT_EYE].mean(1))
    assert np.abs(eyes_mid[:, 0] - 32).max() < 0.6
    assert (expressions.poses == 0).all()


def test_bad_arguments_raise_value_error(gen64):
    for kwargs in ({"difficulty": 1.5}, {"image_size": 8}, {"seed": -1}):
        with pytest.raises(ValueError):
            SynthFACS(**kwargs)
    with pytest.raises(ValueError):
        gen64.expression_set(10, intensity=(0.8, 0.2))
    with pytest.raises(ValueError):
        gen64.micro_clips(2, scheme="samm")
    with pytest.raises(ValueError):
        gen64.micro_clips(2, num_frames=2)
    with pytest.raises(ValueError):
        gen64.magnified_pairs(2, alpha_range=(5.0, 1.0))
    with pytest.raises(ValueError):
        gen64.expression_set(-1)


# ------------------------------------------------------------------ speed, detectability, preview


def test_speed_floor_for_64px_expression_sets():
    gen = SynthFACS(seed=0, image_size=64)
    gen.expression_set(20)
    start = time.process_time()  # CPU time of this process: robust to other jobs sharing the cores
    gen.expression_set(600)
    rate = 600 / (time.process_time() - start)
    assert rate >= 500, f"{rate:.0f} images/s"


def test_haar_cascade_finds_clean_96px_faces():
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    s = SynthFACS(seed=9, image_size=96).expression_set(70, num_subjects=35)
    found = 0
    for image, lm in zip(s.images, s.landmarks):
        boxes = cascade.detectMultiScale(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), scaleFactor=1.1, minNeighbors=5)
        nose = lm[30]
        found += any(x <= nose[0] <= x + w and y <= nose[1] <= y + h for x, y, w, h in boxes)
    assert found / len(s) >= 0.8, f"Haar detection rate {found / len(s):.2f}"


def test_contact_sheet_is_written(tmp_path, expressions):
    path = save_contact_sheet(
        expressions.images[:14], tmp_path / "sheet.png", labels=[EXPRESSIONS[k] for k in expressions.labels[:14]],
        landmarks=expressions.landmarks[:14], cols=7,
    )
    sheet = cv2.imread(str(path))
    assert sheet is not None and sheet.shape[0] < sheet.shape[1]  # 2 rows of 7 tiles
    assert sheet.shape[1] == 7 * (96 + 2) + 2
    with pytest.raises(ValueError):
        save_contact_sheet(expressions.images[:3], tmp_path / "bad.png", labels=["a"])
