"""SynthFACS data sets: still expressions, micro-expression clips, dynamic clips, AU label sets with
controlled label noise, and motion-magnified pairs, all with exact ground truth.

Determinism: one ``SynthFACS(seed=...)`` is a stream. Each call draws fresh samples, and two
generators built with the same seed that make the same calls return identical arrays. Subject ``k``
is the same person in every call and every method (its identity depends only on ``(seed, k)``), so
pass ``first_subject`` to get subject-disjoint splits. Within a call, content (labels, AUs,
subjects) and scene (pose, nuisances) come from separate streams, so changing ``difficulty`` changes
how the faces are shot but not who they are or what they express.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from fer_core.data.labels import AU_NAMES, CASME2_CLASSES, EXPRESSIONS, SMIC_CLASSES
from fer_core.data.synthfacs import face_model as fm
from fer_core.data.synthfacs.render import Nuisance, Occluder, render_batch

AU_ACTIVE_THRESHOLD = 0.2  # an AU "occurs" at intensity >= this; sampled AU sets keep a margin around it
NEUTRAL = EXPRESSIONS.index("neutral")
_PROTOTYPES = np.stack([fm.au_vector(fm.EXPRESSION_PROTOTYPES[e]) for e in EXPRESSIONS])  # (7, 14)
_VA = np.array([fm.EXPRESSION_VA[e] for e in EXPRESSIONS], dtype=np.float64)  # (7, 2)

# Micro-expression AU patterns per class. The first AU of each pattern is the primary one: it peaks at
# the clip's apex level (0.1-0.3); the others peak at weight x level. A class with several patterns
# picks one per clip. CASME II: happiness is AU12 with or without AU6; disgust AU9/AU4 (brow lowering
# with nose wrinkling); repression is lip suppression (AU15/AU17/AU23, CASME II's AU14 is not
# rendered); surprise is brow raising (AU1+AU2, sometimes AU5); "others" mixes single-AU movements
# that fit none of the four (AU4 alone, AU7, AU1+AU4, AU20). SMIC: positive = happiness patterns,
# negative = disgust, sadness, anger, repression and fear patterns, surprise = AU1+AU2 with AU5/AU26.
MICRO_PATTERNS: Mapping[str, Mapping[str, tuple[Mapping[str, float], ...]]] = MappingProxyType({
    "casme2": MappingProxyType({
        "happiness": ({"AU12": 1.0, "AU6": 0.7}, {"AU12": 1.0}),
        "disgust": ({"AU9": 1.0, "AU4": 0.7}, {"AU4": 1.0, "AU9": 0.8}),
        "repression": ({"AU15": 1.0, "AU17": 0.8}, {"AU17": 1.0, "AU23": 0.7}),
        "surprise": ({"AU1": 1.0, "AU2": 1.0}, {"AU2": 1.0, "AU1": 0.9, "AU5": 0.6}),
        "others": ({"AU4": 1.0}, {"AU7": 1.0}, {"AU1": 1.0, "AU4": 0.8}, {"AU20": 1.0}),
    }),
    "smic": MappingProxyType({
        "positive": ({"AU12": 1.0, "AU6": 0.7}, {"AU12": 1.0}),
        "negative": ({"AU4": 1.0, "AU7": 0.7}, {"AU9": 1.0, "AU4": 0.6}, {"AU15": 1.0, "AU17": 0.8},
                     {"AU1": 1.0, "AU4": 0.8, "AU15": 0.6}, {"AU20": 1.0, "AU4": 0.5}),
        "surprise": ({"AU1": 1.0, "AU2": 1.0, "AU5": 0.5}, {"AU2": 1.0, "AU1": 1.0, "AU26": 0.5}),
    }),
})
_SCHEME_CLASSES = {"casme2": CASME2_CLASSES, "smic": SMIC_CLASSES}
assert all(tuple(MICRO_PATTERNS[s]) == c for s, c in _SCHEME_CLASSES.items())
_OCCLUDERS = ("sunglasses", "mask", "hand", "bar")
_OCCLUDER_COLOURS = {"sunglasses": (25.0, 25.0, 30.0), "mask": (205.0, 220.0, 235.0)}  # others: random


@dataclass(frozen=True, eq=False)
class ExpressionSet:
    """Still faces with 7-class labels (labels.EXPRESSIONS), AUs, valence/arousal and landmarks.

    Landmarks are pixel (x, y) in OpenCV's convention (pixel (r, c) is centred on (c, r)); NaN
    where ``has_face`` is False. ``poses`` are yaw, pitch, roll in degrees.
    """

    images: np.ndarray  # uint8 (N, H, W, 3) RGB
    labels: np.ndarray  # int64 (N,)
    aus: np.ndarray  # float32 (N, 14)
    valence_arousal: np.ndarray  # float32 (N, 2)
    landmarks: np.ndarray  # float32 (N, 68, 2)
    subjects: np.ndarray  # int64 (N,)
    has_face: np.ndarray  # bool (N,)
    intensity: np.ndarray  # float32 (N,) sampled expression intensity
    poses: np.ndarray  # float32 (N, 3)
    label_names: tuple[str, ...] = EXPRESSIONS

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class ClipSet:
    """Clips with onset -> apex -> offset AU time courses (micro-expressions or dynamic FER)."""

    clips: np.ndarray  # uint8 (N, T, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    label_names: tuple[str, ...]
    subjects: np.ndarray  # int64 (N,)
    onset: np.ndarray  # int64 (N,) first frame of the movement
    apex: np.ndarray  # int64 (N,) first frame at peak intensity
    offset: np.ndarray  # int64 (N,) frame where the movement has returned to rest (or the last frame)
    aus: np.ndarray  # float32 (N, T, 14)
    landmarks: np.ndarray  # float32 (N, T, 68, 2), NaN on faceless frames
    has_face: np.ndarray  # bool (N, T)
    poses: np.ndarray  # float32 (N, T, 3)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class AUSubset:
    """One AU-detection subset. ``labels`` are what a learner sees (flipped for the noisy subset, -1
    for the unlabelled one); ``true_labels`` is the generator's truth for every subset."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N, 14) in {0, 1} or -1
    true_labels: np.ndarray  # int64 (N, 14) in {0, 1}
    subjects: np.ndarray  # int64 (N,)
    intensities: np.ndarray  # float32 (N, 14)
    landmarks: np.ndarray  # float32 (N, 68, 2)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class AUSets:
    """Clean, noisy-label and unlabelled AU subsets (for co-training with noisy labels)."""

    clean: AUSubset
    noisy: AUSubset
    unlabelled: AUSubset
    flip_rate: np.ndarray  # float32 (14,) per-AU probability that a noisy label was flipped
    au_names: tuple[str, ...] = AU_NAMES


@dataclass(frozen=True, eq=False)
class MagnifiedPairs:
    """Onset/apex micro-expression frames and the exact render of the magnified apex.

    ``magnified`` shows the same face, pose and scene at AU intensity
    ``clip(onset_aus + (1 + alpha) * (apex_aus - onset_aus), 0, MAX_INTENSITY)`` (``magnified_aus``).
    """

    onset: np.ndarray  # uint8 (N, H, W, 3)
    apex: np.ndarray
    magnified: np.ndarray
    alpha: np.ndarray  # float32 (N,)
    labels: np.ndarray  # int64 (N,)
    label_names: tuple[str, ...]
    subjects: np.ndarray  # int64 (N,)
    onset_aus: np.ndarray  # float32 (N, 14)
    apex_aus: np.ndarray
    magnified_aus: np.ndarray
    onset_landmarks: np.ndarray  # float32 (N, 68, 2)
    apex_landmarks: np.ndarray
    magnified_landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _check_count(name: str, n: int) -> int:
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    return int(n)


def _check_range(name: str, pair: Sequence[float], low: float, high: float) -> tuple[float, float]:
    if len(pair) != 2 or not (low <= pair[0] <= pair[1] <= high):
        raise ValueError(f"{name} must be (lo, hi) with {low} <= lo <= hi <= {high}, got {pair!r}")
    return float(pair[0]), float(pair[1])


def _raised_cosine(t: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """0 at start, 1 at stop, smooth in between (vectorised over clips; stop > start)."""
    x = np.clip((t - start) / np.maximum(stop - start, 1), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * x)


def time_course(
    num_frames: int, onset: np.ndarray, apex: np.ndarray, release: np.ndarray, rest: np.ndarray
) -> np.ndarray:
    """(N, T) intensity envelopes: 0 until ``onset``, rising to 1 at ``apex``, held until ``release``,
    falling back to 0 at ``rest`` (which may lie past the clip's end)."""
    t = np.arange(num_frames)[None, :]
    rise = _raised_cosine(t, onset[:, None], apex[:, None])
    fall = 1.0 - _raised_cosine(t, release[:, None], rest[:, None])
    return np.where(t <= apex[:, None], rise, fall)


class SynthFACS:
    """Deterministic procedural face generator with known landmarks, AUs and labels.

    ``difficulty`` in [0, 1] scales every nuisance (head pose, illumination gradient, blur, noise,
    occluders, background clutter, faceless frames); 0 gives clean, centred, frontal faces. Each
    data-set method takes ``difficulty=None`` to override it for that call.
    """

    def __init__(self, seed: int = 0, image_size: int = 64, difficulty: float = 0.0) -> None:
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.difficulty = self._check_difficulty(difficulty)
        self._calls = np.random.SeedSequence(self.seed, spawn_key=(0,))
        self._identities: dict[int, fm.Identity] = {}

    @staticmethod
    def _check_difficulty(difficulty: float) -> float:
        if not 0.0 <= float(difficulty) <= 1.0:
            raise ValueError(f"difficulty must lie in [0, 1], got {difficulty!r}")
        return float(difficulty)

    def _streams(self) -> tuple[np.random.Generator, np.random.Generator]:
        """Fresh (content, scene) generators for one call."""
        content, scene = self._calls.spawn(1)[0].spawn(2)
        return np.random.default_rng(content), np.random.default_rng(scene)

    # ------------------------------------------------------------------ building blocks

    def identity(self, subject: int) -> fm.Identity:
        """The face of subject ``subject``: depends only on (seed, subject)."""
        subject = _check_count("subject", subject)
        if subject not in self._identities:
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, subject)))
            self._identities[subject] = fm.sample_identity(rng)
        return self._identities[subject]

    @staticmethod
    def sample_identity(rng: np.random.Generator) -> fm.Identity:
        """A random subject (see :func:`face_model.sample_identity`)."""
        return fm.sample_identity(rng)

    def sample_poses(self, rng: np.random.Generator, n: int, difficulty: float | None = None) -> np.ndarray:
        """(n, 3) yaw/pitch/roll in degrees; all zero at difficulty 0."""
        d = self.difficulty if difficulty is None else self._check_difficulty(difficulty)
        return (rng.uniform(-1, 1, (n, 3)) * np.array([30.0, 15.0, 15.0]) * d).astype(np.float64)

    def sample_nuisances(
        self, rng: np.random.Generator, n: int, difficulty: float | None = None, faceless_rate: float | None = None
    ) -> list[Nuisance]:
        """``n`` random scenes (background, clothes, light, blur, noise, clutter, occluder, framing,
        gaze, face presence). The draws do not depend on the difficulty, only their scale does."""
        d = self.difficulty if difficulty is None else self._check_difficulty(difficulty)
        faceless = 0.05 * d if faceless_rate is None else float(faceless_rate)
        u = rng.uniform(0, 1, (n, 16))
        background = np.clip(70 + 130 * u[:, :1] + rng.uniform(-15, 15, (n, 3)), 0, 255).tolist()
        clothes = rng.uniform(25, 200, (n, 3)).tolist()
        occ_colour = rng.uniform(30, 220, (n, 3)).tolist()
        occ_anchor = rng.choice([2, 8, 14, 30, 33, 48, 54], n).tolist()
        occ_offset = rng.uniform(-0.2, 0.2, (n, 2)).tolist()
        occ_size, occ_angle = rng.uniform(0.3, 0.6, n).tolist(), rng.uniform(-60, 60, n).tolist()
        has_face = (rng.uniform(size=n) >= faceless).tolist()
        seeds = rng.integers(2**31, size=(n, 2)).tolist()
        light = (d * (u[:, 3:5] - 0.5) * 1.2).tolist()
        brightness = (1.0 + d * (u[:, 5] * 0.5 - 0.3)).tolist()
        contrast = (1.0 + d * (u[:, 6] * 0.5 - 0.35)).tolist()
        blur = np.where(u[:, 8] < 0.5, d * 0.02 * u[:, 7], 0.0).tolist()
        noise = (d * 12.0 * u[:, 9]).tolist()
        clutter = np.round(d * 10 * u[:, 10]).astype(int).tolist()
        shift = (d * (u[:, 11:13] - 0.5) * 0.16).tolist()
        scale = (1.0 + d * (u[:, 13] * 0.25 - 0.15)).tolist()
        gaze = ((u[:, 14:16] - 0.5) * np.array([0.3 + 0.5 * d, 0.2 + 0.3 * d])).tolist()
        occluded = (u[:, 1] < 0.3 * d).tolist()
        scenes = []
        for i in range(n):
            occluder = None
            if occluded[i]:
                kind = _OCCLUDERS[int(u[i, 2] * len(_OCCLUDERS))]
                colour = _OCCLUDER_COLOURS.get(kind, tuple(occ_colour[i]))
                occluder = Occluder(kind, occ_anchor[i], tuple(occ_offset[i]), occ_size[i], occ_angle[i], colour)
            scenes.append(Nuisance(
                background=tuple(background[i]), clothes=tuple(clothes[i]), light=tuple(light[i]),
                brightness=brightness[i], contrast=contrast[i], blur=blur[i], noise=noise[i], clutter=clutter[i],
                occluder=occluder, shift=tuple(shift[i]), scale=scale[i], gaze=tuple(gaze[i]),
                has_face=has_face[i], seed=seeds[i][0], noise_seed=seeds[i][1],
            ))
        return scenes

    def render(
        self,
        identity: fm.Identity,
        aus: np.ndarray | Mapping[str, float],
        pose: Sequence[float] = (0.0, 0.0, 0.0),
        nuisance: Nuisance | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Render one face: image uint8 (H, W, 3) RGB and landmarks float32 (68, 2) pixel (x, y).

        ``aus`` is a (14,) vector in AU_NAMES order or {AU name: intensity}; intensities above 1
        extrapolate the geometry and are clipped at ``MAX_INTENSITY``. ``nuisance=None`` is a clean shot.
        """
        vector = fm.au_vector(aus) if isinstance(aus, Mapping) else np.asarray(aus, dtype=np.float64)
        if vector.shape != (len(AU_NAMES),) or not np.isfinite(vector).all() or (vector < 0).any():
            raise ValueError(f"aus must be {len(AU_NAMES)} finite non-negative intensities, got {vector!r}")
        pose_arr = np.asarray(pose, dtype=np.float64)
        if pose_arr.shape != (3,) or not np.isfinite(pose_arr).all():
            raise ValueError(f"pose must be (yaw, pitch, roll) in degrees, got {pose!r}")
        images, landmarks = render_batch(
            [identity], vector[None], pose_arr[None], [nuisance or Nuisance()], self.image_size
        )
        return images[0], landmarks[0]

    def _subjects(self, rng: np.random.Generator, n: int, num_subjects: int, first_subject: int) -> np.ndarray:
        if _check_count("num_subjects", num_subjects) < 1:
            raise ValueError("num_subjects must be >= 1")
        _check_count("first_subject", first_subject)
        return (first_subject + rng.permutation(np.arange(n) % num_subjects)).astype(np.int64)

    def _render(self, subjects: np.ndarray, aus: np.ndarray, poses: np.ndarray, nuisances: Sequence[Nuisance]):
        identities = [self.identity(int(s)) for s in subjects]
        return render_batch(identities, aus, poses, nuisances, self.image_size)

    @staticmethod
    def _background_activity(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
        """Faint, sub-threshold AU activity: real faces are never perfectly still."""
        return (rng.uniform(size=shape) < 0.15) * rng.uniform(0, scale, shape)

    # ------------------------------------------------------------------ data sets

    def expression_set(
        self,
        n: int,
        num_subjects: int = 20,
        intensity: tuple[float, float] = (0.6, 1.0),
        *,
        first_subject: int = 0,
        difficulty: float | None = None,
    ) -> ExpressionSet:
        """``n`` still faces, classes balanced (n // 7 or one more each) and shuffled."""
        n = _check_count("n", n)
        lo, hi = _check_range("intensity", intensity, 0.0, 1.0)
        content, scene = self._streams()
        labels = content.permutation(np.arange(n) % len(EXPRESSIONS)).astype(np.int64)
        subjects = self._subjects(content, n, num_subjects, first_subject)
        level = content.uniform(lo, hi, n)
        jitter = content.uniform(0.85, 1.15, (n, len(AU_NAMES)))
        proto = _PROTOTYPES[labels]
        aus = np.clip(proto * level[:, None] * jitter, 0.0, 1.0)
        aus += (proto == 0) * self._background_activity(content, aus.shape, 0.12)
        va_noise = np.clip(content.normal(0.0, 0.03, (n, 2)), -0.08, 0.08)
        va = np.clip(_VA[labels] * level[:, None] + va_noise, -1.0, 1.0)
        poses = self.sample_poses(scene, n, difficulty)
        nuisances = self.sample_nuisances(scene, n, difficulty)
        images, landmarks = self._render(subjects, aus, poses, nuisances)
        return ExpressionSet(
            images=images, labels=labels, aus=aus.astype(np.float32), valence_arousal=va.astype(np.float32),
            landmarks=landmarks, subjects=subjects, has_face=np.array([x.has_face for x in nuisances], bool),
            intensity=level.astype(np.float32), poses=poses.astype(np.float32),
        )

    def micro_clips(
        self,
        n: int,
        scheme: str = "casme2",
        num_frames: int = 24,
        num_subjects: int = 8,
        *,
        apex_intensity: tuple[float, float] = (0.1, 0.3),
        first_subject: int = 0,
        difficulty: float | None = None,
    ) -> ClipSet:
        """Micro-expression clips: a brief, low-intensity onset -> apex -> offset movement (apex level
        in ``apex_intensity``) in a still lab recording. Classes follow ``MICRO_PATTERNS[scheme]``."""
        n = _check_count("n", n)
        if scheme not in _SCHEME_CLASSES:
            raise ValueError(f"scheme must be one of {sorted(_SCHEME_CLASSES)}, got {scheme!r}")
        if _check_count("num_frames", num_frames) < 3:
            raise ValueError("num_frames must be >= 3 (onset, apex, offset)")
        level_lo, level_hi = _check_range("apex_intensity", apex_intensity, 0.0, fm.MAX_INTENSITY)
        d = self.difficulty if difficulty is None else self._check_difficulty(difficulty)
        names = _SCHEME_CLASSES[scheme]
        content, scene = self._streams()
        labels = content.permutation(np.arange(n) % len(names)).astype(np.int64)
        subjects = self._subjects(content, n, num_subjects, first_subject)
        apex_aus = self._micro_apex(content, scheme, labels, content.uniform(level_lo, level_hi, n))
        t_max = num_frames - 1
        rise = np.clip(np.round(num_frames * content.uniform(0.15, 0.3, n)), 1, None)
        fall = np.clip(np.round(num_frames * content.uniform(0.2, 0.4, n)), 1, None)
        over = np.maximum(rise + fall - t_max, 0)  # short clips: shrink the fall, then the rise
        fall = np.maximum(fall - over, 1)
        rise = np.maximum(np.minimum(rise, t_max - fall), 1)
        slack = t_max - rise - fall
        onset = np.floor(content.uniform(0, 1, n) * (np.minimum(slack, num_frames // 3) + 1)).astype(np.int64)
        apex = (onset + rise).astype(np.int64)
        offset = (apex + fall).astype(np.int64)
        envelope = time_course(num_frames, onset, apex, apex, offset)
        aus = envelope[..., None] * apex_aus[:, None, :]
        # A still subject: a fixed small head pose and a sub-degree drift (scaled by difficulty).
        base = self.sample_poses(scene, n, d) * 0.4
        drift = scene.uniform(-1, 1, (n, 1, 3)) * d * np.linspace(0, 1, num_frames)[None, :, None]
        poses = base[:, None, :] + drift
        flicker = (1.0 + d * 0.02 * scene.standard_normal((n, num_frames))).tolist()
        nuisances = [
            dataclasses.replace(clip_scene, brightness=clip_scene.brightness * f,
                                noise_seed=clip_scene.noise_seed + t)
            for clip_scene, clip_flicker in zip(self.sample_nuisances(scene, n, d, faceless_rate=0.0), flicker)
            for t, f in enumerate(clip_flicker)
        ]
        return self._clip_set(labels, names, subjects, onset, apex, offset, aus, poses, nuisances)

    def _micro_apex(self, rng: np.random.Generator, scheme: str, labels: np.ndarray, level: np.ndarray) -> np.ndarray:
        patterns = MICRO_PATTERNS[scheme]
        names = _SCHEME_CLASSES[scheme]
        apex = np.zeros((len(labels), len(AU_NAMES)))
        for i, label in enumerate(labels):
            options = patterns[names[label]]
            pattern = options[int(rng.integers(len(options)))]
            weights = fm.au_vector(pattern).astype(np.float64)
            secondary = (weights > 0) & (weights < 1)
            weights[secondary] *= rng.uniform(0.85, 1.0, int(secondary.sum()))
            apex[i] = weights * level[i]
        return apex

    def dynamic_clips(
        self,
        n: int,
        num_frames: int = 16,
        num_subjects: int = 8,
        *,
        intensity: tuple[float, float] = (0.7, 1.0),
        faceless_rate: float | None = None,
        first_subject: int = 0,
        difficulty: float | None = None,
    ) -> ClipSet:
        """In-the-wild style clips of the 7 basic expressions at full intensity, with pose and lighting
        drift. ``faceless_rate`` is the chance that a clip loses the face for a short run of frames
        (default ``0.6 * difficulty``); the apex frame always shows the face."""
        n = _check_count("n", n)
        if _check_count("num_frames", num_frames) < 3:
            raise ValueError("num_frames must be >= 3 (onset, apex, offset)")
        lo, hi = _check_range("intensity", intensity, 0.0, 1.0)
        d = self.difficulty if difficulty is None else self._check_difficulty(difficulty)
        rate = 0.6 * d if faceless_rate is None else float(faceless_rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"faceless_rate must lie in [0, 1], got {faceless_rate!r}")
        content, scene = self._streams()
        labels = content.permutation(np.arange(n) % len(EXPRESSIONS)).astype(np.int64)
        subjects = self._subjects(content, n, num_subjects, first_subject)
        level = content.uniform(lo, hi, n)
        proto = _PROTOTYPES[labels] * level[:, None] * content.uniform(0.85, 1.15, (n, len(AU_NAMES)))
        t_max = num_frames - 1
        onset = np.floor(content.uniform(0, 1, n) * (num_frames // 4 + 1)).astype(np.int64)
        rise = np.clip(np.round(num_frames * content.uniform(0.2, 0.35, n)), 1, None)
        apex = np.minimum(onset + rise, t_max - 1).astype(np.int64)
        release = apex + np.round(num_frames * content.uniform(0.1, 0.3, n)).astype(np.int64)
        rest = release + np.clip(np.round(num_frames * content.uniform(0.15, 0.3, n)), 1, None).astype(np.int64)
        offset = np.minimum(rest, t_max).astype(np.int64)
        envelope = time_course(num_frames, onset, apex, release, rest)
        aus = np.clip(envelope[..., None] * proto[:, None, :], 0, 1)
        # Faint resting activity, constant over the clip so that it does not jitter the face.
        aus += (proto == 0)[:, None, :] * self._background_activity(content, (n, 1, len(AU_NAMES)), 0.08)
        # Pose, framing and light drift linearly between two draws per clip.
        ramp = np.linspace(0, 1, num_frames)[None, :, None]
        pose_a, pose_b = self.sample_poses(scene, n, d), self.sample_poses(scene, n, d)
        poses = pose_a[:, None] * (1 - ramp) + pose_b[:, None] * ramp
        starts, ends = self.sample_nuisances(scene, n, d, 0.0), self.sample_nuisances(scene, n, d, 0.0)
        runs = 1 + scene.integers(max(1, num_frames // 6), size=n)
        firsts = np.floor(scene.uniform(size=n) * (num_frames - runs + 1)).astype(int)
        loses = scene.uniform(size=n) < rate
        nuisances = []
        for i in range(n):
            start, end = starts[i], ends[i]
            lost = np.zeros(num_frames, bool)
            if loses[i]:
                first = firsts[i]
                if first <= apex[i] < first + runs[i]:  # keep the apex visible: move the run beside it
                    first = apex[i] + 1 if apex[i] + runs[i] < num_frames else apex[i] - runs[i]
                lost[max(first, 0): first + runs[i]] = True
            for t in range(num_frames):
                w = t / max(t_max, 1)
                nuisances.append(dataclasses.replace(
                    start,
                    light=(start.light[0] * (1 - w) + end.light[0] * w, start.light[1] * (1 - w) + end.light[1] * w),
                    brightness=start.brightness * (1 - w) + end.brightness * w,
                    shift=(start.shift[0] * (1 - w) + end.shift[0] * w, start.shift[1] * (1 - w) + end.shift[1] * w),
                    scale=start.scale * (1 - w) + end.scale * w,
                    has_face=not lost[t],
                    noise_seed=start.noise_seed + t,
                ))
        return self._clip_set(labels, EXPRESSIONS, subjects, onset, apex, offset, aus, poses, nuisances)

    def _clip_set(self, labels, names, subjects, onset, apex, offset, aus, poses, nuisances) -> ClipSet:
        n, t = aus.shape[:2]
        frame_subjects = np.repeat(subjects, t)
        images, landmarks = self._render(frame_subjects, aus.reshape(n * t, -1), poses.reshape(n * t, 3), nuisances)
        size = self.image_size
        return ClipSet(
            clips=images.reshape(n, t, size, size, 3), labels=labels, label_names=tuple(names), subjects=subjects,
            onset=onset, apex=apex, offset=offset, aus=aus.astype(np.float32),
            landmarks=landmarks.reshape(n, t, 68, 2),
            has_face=np.array([x.has_face for x in nuisances], bool).reshape(n, t),
            poses=poses.astype(np.float32),
        )

    def au_sets(
        self,
        n_clean: int,
        n_noisy: int,
        n_unlabelled: int,
        flip_rate: float | Sequence[float] = 0.2,
        *,
        num_subjects: int = 20,
        first_subject: int = 0,
        difficulty: float | None = None,
    ) -> AUSets:
        """AU detection data: a clean subset, a subset whose binary labels were flipped with
        probability ``flip_rate`` (one rate or 14, in AU_NAMES order), and an unlabelled subset.

        Intensities keep a margin around AU_ACTIVE_THRESHOLD: active AUs are >= 0.3, inactive <= 0.1.
        """
        named = (("n_clean", n_clean), ("n_noisy", n_noisy), ("n_unlabelled", n_unlabelled))
        counts = [_check_count(name, value) for name, value in named]
        rates = np.broadcast_to(np.asarray(flip_rate, dtype=np.float64), (len(AU_NAMES),)).copy() \
            if np.ndim(flip_rate) == 0 or len(flip_rate) == len(AU_NAMES) else None
        if rates is None or not np.isfinite(rates).all() or (rates < 0).any() or (rates > 1).any():
            raise ValueError(f"flip_rate must be one rate or {len(AU_NAMES)} rates in [0, 1], got {flip_rate!r}")
        total = sum(counts)
        content, scene = self._streams()
        subjects = self._subjects(content, total, num_subjects, first_subject)
        intensities = self._sample_au_intensities(content, total)
        truth = (intensities >= AU_ACTIVE_THRESHOLD).astype(np.int64)
        flips = content.uniform(size=(counts[1], len(AU_NAMES))) < rates
        poses = self.sample_poses(scene, total, difficulty)
        nuisances = self.sample_nuisances(scene, total, difficulty)
        images, landmarks = self._render(subjects, intensities, poses, nuisances)
        bounds = np.cumsum([0, *counts])
        parts = [slice(bounds[k], bounds[k + 1]) for k in range(3)]
        shown = [truth[parts[0]], truth[parts[1]] ^ flips, np.full_like(truth[parts[2]], -1)]
        subsets = [
            AUSubset(images=images[p], labels=lab, true_labels=truth[p], subjects=subjects[p],
                     intensities=intensities[p].astype(np.float32), landmarks=landmarks[p])
            for p, lab in zip(parts, shown)
        ]
        return AUSets(clean=subsets[0], noisy=subsets[1], unlabelled=subsets[2], flip_rate=rates.astype(np.float32))

    @staticmethod
    def _sample_au_intensities(rng: np.random.Generator, n: int) -> np.ndarray:
        """60% expression prototypes (natural co-occurrence), 40% independent AUs (decorrelation)."""
        k = len(AU_NAMES)
        from_expression = rng.uniform(size=n) < 0.6
        expression = _PROTOTYPES[rng.integers(0, len(EXPRESSIONS) - 1, n)]  # any but neutral (last)
        level = expression * rng.uniform(0.4, 1.0, (n, 1)) * rng.uniform(0.85, 1.15, (n, k))
        proto = np.where(expression > 0, np.maximum(level, 0.3), 0.0)
        extra = (rng.uniform(size=(n, k)) < 0.08) * rng.uniform(0.3, 1.0, (n, k))
        independent = (rng.uniform(size=(n, k)) < 0.22) * rng.uniform(0.3, 1.0, (n, k))
        active = np.where(from_expression[:, None], np.maximum(proto, extra), independent)
        active = np.clip(active, 0.0, 1.0)
        au25, au26 = AU_NAMES.index("AU25"), AU_NAMES.index("AU26")
        # A dropped jaw parts the lips: AU26 implies AU25.
        parted = np.maximum(active[:, au25], np.maximum(0.8 * active[:, au26], 0.3))
        active[:, au25] = np.where(active[:, au26] > 0, parted, active[:, au25])
        faint = (rng.uniform(size=(n, k)) < 0.3) * rng.uniform(0.0, 0.1, (n, k))
        return np.where(active > 0, active, faint)

    def magnified_pairs(
        self,
        n: int,
        alpha_range: tuple[float, float] = (1.0, 13.0),
        *,
        scheme: str = "casme2",
        apex_intensity: tuple[float, float] = (0.1, 0.3),
        num_subjects: int = 8,
        first_subject: int = 0,
        difficulty: float | None = None,
    ) -> MagnifiedPairs:
        """Onset/apex frames of micro-expressions (classes of ``scheme``) and the magnified apex
        rendered exactly: same identity, pose, scene and noise; only the AU intensities differ."""
        n = _check_count("n", n)
        if scheme not in _SCHEME_CLASSES:
            raise ValueError(f"scheme must be one of {sorted(_SCHEME_CLASSES)}, got {scheme!r}")
        alpha_lo, alpha_hi = _check_range("alpha_range", alpha_range, 0.0, np.inf)
        level_lo, level_hi = _check_range("apex_intensity", apex_intensity, 0.0, fm.MAX_INTENSITY)
        names = _SCHEME_CLASSES[scheme]
        content, scene = self._streams()
        labels = content.permutation(np.arange(n) % len(names)).astype(np.int64)
        subjects = self._subjects(content, n, num_subjects, first_subject)
        onset_aus = self._background_activity(content, (n, len(AU_NAMES)), 0.05)
        apex_aus = onset_aus + self._micro_apex(content, scheme, labels, content.uniform(level_lo, level_hi, n))
        alpha = content.uniform(alpha_lo, alpha_hi, n)
        magnified_aus = np.clip(onset_aus + (1.0 + alpha[:, None]) * (apex_aus - onset_aus), 0.0, fm.MAX_INTENSITY)
        poses = self.sample_poses(scene, n, difficulty)
        nuisances = self.sample_nuisances(scene, n, difficulty, faceless_rate=0.0)
        all_aus = np.concatenate([onset_aus, apex_aus, magnified_aus])
        images, landmarks = self._render(np.tile(subjects, 3), all_aus, np.tile(poses, (3, 1)), nuisances * 3)
        onset, apex, magnified = np.split(images, 3)
        lm = np.split(landmarks, 3)
        return MagnifiedPairs(
            onset=onset, apex=apex, magnified=magnified, alpha=alpha.astype(np.float32), labels=labels,
            label_names=tuple(names), subjects=subjects, onset_aus=onset_aus.astype(np.float32),
            apex_aus=apex_aus.astype(np.float32), magnified_aus=magnified_aus.astype(np.float32),
            onset_landmarks=lm[0], apex_landmarks=lm[1], magnified_landmarks=lm[2],
        )
