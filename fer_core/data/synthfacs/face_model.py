"""The geometric face model behind SynthFACS: a 68-point iBUG template with depth, per-subject
identity deformations, FACS action-unit displacement fields and a rigid head pose.

Coordinates are *face units*: x to the image's right, y down, z toward the camera, the face about
two units wide (jaw points 0 and 16 at x = -1 and +1) and the eye line at y = -0.3. Everything here
is vectorised over a batch; rendering to pixels lives in :mod:`.render`.

AU effects are linear displacement fields (``AU_DISPLACEMENTS``), so landmarks are an exact, affine
function of the intensities: this is what lets motion-magnified pairs be rendered with known geometry
(intensity ``onset + (1 + alpha) * (apex - onset)``). Intensities above 1 extrapolate up to
``MAX_INTENSITY``; a few ordering constraints (lower lid never above upper lid, lower lip never above
upper lip, ...) keep extreme combinations from folding the face inside out.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from fer_core.data.labels import AU_NAMES

MAX_INTENSITY = 2.0  # extrapolation limit for magnified AUs; beyond it geometry would be grotesque

# --------------------------------------------------------------------------------------------------
# Template: the 68 iBUG points (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67).
# Only the image-left half and the midline are written out; the right half is its mirror image.
# --------------------------------------------------------------------------------------------------

# (index, x, y, z) for the image-left half and the midline.
_LEFT_AND_MID = (
    # jaw: from the left temple (level with the eyes) down to the chin (8)
    (0, -1.00, -0.30, -0.55), (1, -0.98, -0.02, -0.50), (2, -0.94, 0.24, -0.42), (3, -0.87, 0.50, -0.33),
    (4, -0.75, 0.74, -0.23), (5, -0.59, 0.94, -0.13), (6, -0.41, 1.10, -0.04), (7, -0.21, 1.21, 0.02),
    (8, 0.00, 1.26, 0.05),
    # left brow, outer (17) to inner (21)
    (17, -0.84, -0.52, -0.15), (18, -0.70, -0.60, -0.02), (19, -0.52, -0.625, 0.06), (20, -0.36, -0.605, 0.10),
    (21, -0.20, -0.555, 0.10),
    # nose bridge (27 between the eyes .. 30 tip) and base (31 left wing .. 33 subnasale)
    (27, 0.00, -0.30, 0.08), (28, 0.00, -0.13, 0.20), (29, 0.00, 0.04, 0.32), (30, 0.00, 0.21, 0.45),
    (31, -0.20, 0.34, 0.18), (32, -0.10, 0.37, 0.26), (33, 0.00, 0.39, 0.30),
    # left eye: 36 outer corner, 37-38 upper lid, 39 inner corner, 40-41 lower lid
    (36, -0.74, -0.30, -0.12), (37, -0.61, -0.385, -0.02), (38, -0.41, -0.385, 0.00), (39, -0.25, -0.29, 0.00),
    (40, -0.41, -0.235, 0.00), (41, -0.61, -0.235, -0.02),
    # outer lips: 48 left corner, 49-51 upper (51 centre), 57-59 lower (57 centre)
    (48, -0.38, 0.70, 0.02), (49, -0.26, 0.62, 0.12), (50, -0.12, 0.58, 0.18), (51, 0.00, 0.60, 0.20),
    (57, 0.00, 0.88, 0.18), (58, -0.12, 0.86, 0.17), (59, -0.26, 0.82, 0.12),
    # inner lips: 60 left corner, 61-62 upper, 66-67 lower (closed mouth: upper and lower touch)
    (60, -0.33, 0.70, 0.04), (61, -0.12, 0.698, 0.15), (62, 0.00, 0.70, 0.17),
    (66, 0.00, 0.70, 0.16), (67, -0.12, 0.70, 0.15),
)

# iBUG left/right correspondences (index -> its mirror); midline points map to themselves.
_MIRROR_PAIRS = (
    *((k, 16 - k) for k in range(8)),
    (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),
    (31, 35), (32, 34),
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
    (48, 54), (49, 53), (50, 52), (59, 55), (58, 56), (60, 64), (61, 63), (67, 65),
)


def _mirror_permutation() -> np.ndarray:
    perm = np.arange(68)
    for a, b in _MIRROR_PAIRS:
        perm[a], perm[b] = b, a
    return perm


MIRROR_68: np.ndarray = _mirror_permutation()
"""Index permutation that maps a horizontally flipped face's landmarks back to iBUG order."""
MIRROR_68.setflags(write=False)


def _build_template() -> np.ndarray:
    points = np.full((68, 3), np.nan, dtype=np.float64)
    for i, x, y, z in _LEFT_AND_MID:
        points[i] = (x, y, z)
    for i, x, y, z in _LEFT_AND_MID:
        j = MIRROR_68[i]
        if j != i:
            points[j] = (-x, y, z)
    assert not np.isnan(points).any()
    return points


TEMPLATE_68_3D: np.ndarray = _build_template()
TEMPLATE_68_3D.setflags(write=False)
TEMPLATE_68: np.ndarray = TEMPLATE_68_3D[:, :2].astype(np.float32)
"""Neutral mean face, (68, 2) float32 in face units (x right, y down, eye line at y = -0.3)."""
TEMPLATE_68.setflags(write=False)

# --------------------------------------------------------------------------------------------------
# Anchors: extra non-landmark points the renderer needs (forehead, hair, ears, neck), deformed and
# posed with the landmarks. Indices into the extended point array start at 68.
# --------------------------------------------------------------------------------------------------

FOREHEAD = np.arange(68, 75)  # forehead arc from right temple (near 16) over the top to left (near 0)
HAIR_OUTER = np.arange(75, 88)  # hair silhouette, left bottom -> over the top -> right bottom
HAIRLINE = np.arange(88, 95)  # hairline across the forehead, right -> left
LONG_HAIR = np.arange(95, 99)  # hair falling behind the shoulders: right mid, right bottom, left bottom, left mid
EARS = np.array([99, 100])  # left ear centre, right ear centre
NECK = np.arange(101, 105)  # left top, left bottom, right bottom, right top
FACE_CENTRE = 105
NUM_POINTS = 106


def _build_anchors() -> np.ndarray:
    anchors = []
    for phi in np.linspace(0, np.pi, 9)[1:-1]:  # 7 points strictly between the temples
        anchors.append((0.97 * np.cos(phi), -0.30 - 1.05 * np.sin(phi), -0.55 + 0.45 * np.sin(phi)))
    for phi in np.linspace(np.pi + 0.30, -0.30, 13):  # left-bottom, over the top, to right-bottom
        anchors.append((1.10 * np.cos(phi), -0.30 - 1.22 * np.sin(phi), -0.45 + 0.35 * abs(np.sin(phi))))
    hairline = (
        (0.99, -0.22), (0.90, -0.78), (0.60, -1.00), (0.0, -1.07), (-0.60, -1.00), (-0.90, -0.78), (-0.99, -0.22),
    )
    anchors.extend((x, y, -0.35 + 0.3 * (1 - abs(x))) for x, y in hairline)
    anchors.extend(((1.16, 0.5, -0.6), (1.12, 1.9, -0.6), (-1.12, 1.9, -0.6), (-1.16, 0.5, -0.6)))
    anchors.extend(((-1.03, -0.08, -0.55), (1.03, -0.08, -0.55)))
    anchors.extend(((-0.50, 0.85, -0.35), (-0.56, 1.90, -0.35), (0.56, 1.90, -0.35), (0.50, 0.85, -0.35)))
    anchors.append((0.0, -0.10, -0.10))  # face centre, for the shading ellipses
    return np.asarray(anchors, dtype=np.float64)


EXTENDED_TEMPLATE: np.ndarray = np.concatenate([TEMPLATE_68_3D, _build_anchors()])
assert EXTENDED_TEMPLATE.shape == (NUM_POINTS, 3)
EXTENDED_TEMPLATE.setflags(write=False)

# --------------------------------------------------------------------------------------------------
# Action units: linear displacement fields in face units. Entries are (dx_outward, dy) for image-left
# or midline points and are mirrored to the right half; "outward" is away from the midline.
# --------------------------------------------------------------------------------------------------

_BROW_L = (17, 18, 19, 20, 21)
_AU_FIELDS: Mapping[str, Mapping[int, tuple[float, float]]] = {
    # inner brow raiser: the brows' inner ends rise, the brows turn oblique
    "AU1": {21: (0.0, -0.20), 20: (0.0, -0.15), 19: (0.0, -0.09), 18: (0.0, -0.035), 17: (0.0, -0.01),
            38: (0.0, -0.012), 37: (0.0, -0.006)},
    # outer brow raiser
    "AU2": {17: (0.01, -0.16), 18: (0.0, -0.14), 19: (0.0, -0.10), 20: (0.0, -0.05), 21: (0.0, -0.015),
            37: (0.0, -0.01), 36: (0.0, -0.004)},
    # brow lowerer: brows down and pulled together, upper lids pushed down a little
    "AU4": {21: (-0.07, 0.14), 20: (-0.05, 0.13), 19: (-0.03, 0.11), 18: (-0.015, 0.085), 17: (0.0, 0.055),
            37: (0.0, 0.02), 38: (0.0, 0.025)},
    # upper lid raiser: the eye widens
    "AU5": {37: (0.0, -0.06), 38: (0.0, -0.055), 36: (0.0, -0.006), 40: (0.0, 0.006), 41: (0.0, 0.006),
            **{b: (0.0, -0.02) for b in _BROW_L}},
    # cheek raiser: lower lids and cheeks rise, the eye narrows from below
    "AU6": {41: (0.0, -0.045), 40: (0.0, -0.035), 36: (0.0, -0.015), 37: (0.0, 0.01), 38: (0.0, 0.006),
            1: (0.0, -0.03), 2: (0.0, -0.03), 3: (0.0, -0.015), 48: (0.005, -0.015), 60: (0.005, -0.012)},
    # lid tightener: lower lids rise and straighten, upper lids drop slightly
    "AU7": {41: (0.0, -0.05), 40: (0.0, -0.05), 37: (0.0, 0.025), 38: (0.0, 0.025), 36: (0.0, -0.006),
            39: (0.0, -0.006)},
    # nose wrinkler: nose wings and upper lip up, inner brows down
    "AU9": {31: (0.02, -0.05), 32: (0.0, -0.055), 33: (0.0, -0.05), 30: (0.0, -0.02), 29: (0.0, -0.01),
            49: (0.0, -0.04), 50: (0.0, -0.045), 51: (0.0, -0.04), 61: (0.0, -0.03), 62: (0.0, -0.03),
            60: (0.0, -0.012), 21: (-0.02, 0.05), 20: (-0.01, 0.03), 41: (0.0, -0.02), 40: (0.0, -0.02)},
    # lip corner puller: corners up and out, lower lip stretched, cheeks lifted
    "AU12": {48: (0.09, -0.13), 60: (0.08, -0.115), 49: (0.035, -0.05), 59: (0.045, -0.07), 61: (0.02, -0.035),
             67: (0.025, -0.035), 50: (0.01, -0.012), 58: (0.015, -0.025), 57: (0.0, -0.012), 62: (0.0, -0.01),
             66: (0.0, -0.01), 3: (0.02, -0.012), 4: (0.02, -0.01), 41: (0.0, -0.01), 40: (0.0, -0.008)},
    # lip corner depressor
    "AU15": {48: (-0.01, 0.11), 60: (-0.01, 0.09), 49: (0.0, 0.035), 59: (0.0, 0.045), 61: (0.0, 0.02),
             67: (0.0, 0.02), 50: (0.0, 0.005), 58: (0.0, 0.01), 4: (0.0, 0.01), 5: (0.0, 0.01)},
    # chin raiser: chin boss and lower lip pushed up (the upper lip follows), corners slightly down
    "AU17": {8: (0.0, -0.07), 7: (0.0, -0.065), 6: (0.0, -0.04), 5: (0.0, -0.015), 57: (0.0, -0.06),
             58: (0.0, -0.055), 59: (0.0, -0.03), 66: (0.0, -0.025), 67: (0.0, -0.02), 62: (0.0, -0.025),
             61: (0.0, -0.02), 51: (0.0, -0.015), 50: (0.0, -0.01), 48: (0.0, 0.015), 60: (0.0, 0.01)},
    # lip stretcher: corners pulled sideways
    "AU20": {48: (0.12, 0.02), 60: (0.11, 0.02), 49: (0.06, 0.01), 59: (0.06, 0.02), 61: (0.03, 0.0),
             67: (0.03, 0.005), 50: (0.02, 0.0), 58: (0.02, 0.01), 4: (0.02, 0.01), 5: (0.02, 0.01)},
    # lip tightener: lips narrow and thin (red margins roll in)
    "AU23": {48: (-0.05, 0.0), 60: (-0.04, 0.0), 49: (-0.02, 0.03), 50: (-0.01, 0.035), 51: (0.0, 0.035),
             59: (-0.02, -0.03), 58: (-0.01, -0.035), 57: (0.0, -0.035), 61: (-0.01, 0.0), 67: (-0.01, 0.0)},
    # lips part: mostly the lower lip drops
    "AU25": {61: (0.0, -0.015), 62: (0.0, -0.018), 67: (0.0, 0.06), 66: (0.0, 0.07), 59: (0.0, 0.045),
             58: (0.0, 0.055), 57: (0.0, 0.055), 51: (0.0, -0.01), 50: (0.0, -0.01)},
    # jaw drop: lower jaw, chin and lower lip down, corners drawn in a little
    "AU26": {8: (0.0, 0.28), 7: (0.0, 0.26), 6: (0.0, 0.21), 5: (0.0, 0.15), 4: (0.0, 0.09), 3: (0.0, 0.045),
             2: (0.0, 0.015), 57: (0.0, 0.25), 58: (0.0, 0.24), 59: (0.0, 0.17), 66: (0.0, 0.24),
             67: (0.0, 0.21), 48: (-0.02, 0.06), 60: (-0.02, 0.05), 61: (0.0, 0.01), 62: (0.0, 0.01),
             49: (0.0, 0.01)},
}
assert tuple(_AU_FIELDS) == AU_NAMES


def _build_displacements() -> np.ndarray:
    table = np.zeros((len(AU_NAMES), 68, 2), dtype=np.float64)
    for a, name in enumerate(AU_NAMES):
        for i, (dx_out, dy) in _AU_FIELDS[name].items():
            j = MIRROR_68[i]
            if j == i:
                table[a, i] = (0.0, dy)
            else:
                outward = -1.0 if TEMPLATE_68_3D[i, 0] < 0 else 1.0
                table[a, i] = (outward * dx_out, dy)
                table[a, j] = (-outward * dx_out, dy)
    return table


AU_DISPLACEMENTS: np.ndarray = _build_displacements()
"""(14, 68, 2) landmark displacement in face units of each AU at intensity 1, in AU_NAMES order."""
AU_DISPLACEMENTS.setflags(write=False)

# --------------------------------------------------------------------------------------------------
# Basic expressions as EMFACS prototypes (weights multiply the sampled expression intensity).
# --------------------------------------------------------------------------------------------------

EXPRESSION_PROTOTYPES: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "angry": MappingProxyType({"AU4": 1.0, "AU5": 0.7, "AU7": 1.0, "AU23": 1.0}),
    "disgust": MappingProxyType({"AU9": 1.0, "AU15": 0.8}),
    "fear": MappingProxyType({"AU1": 1.0, "AU2": 0.8, "AU4": 0.7, "AU5": 1.0, "AU7": 0.6, "AU20": 1.0, "AU26": 0.6}),
    "happy": MappingProxyType({"AU6": 1.0, "AU12": 1.0}),
    "sad": MappingProxyType({"AU1": 1.0, "AU4": 0.7, "AU15": 1.0}),
    "surprise": MappingProxyType({"AU1": 1.0, "AU2": 1.0, "AU5": 0.8, "AU26": 1.0}),
    "neutral": MappingProxyType({}),
})
"""Expression name (labels.EXPRESSIONS) -> {AU name: weight}. Keys of each entry are the EMFACS AUs."""

# Valence/arousal anchors on the circumplex at full intensity (scaled by the sampled intensity).
EXPRESSION_VA: Mapping[str, tuple[float, float]] = MappingProxyType({
    "angry": (-0.65, 0.65), "disgust": (-0.65, 0.35), "fear": (-0.60, 0.75), "happy": (0.80, 0.45),
    "sad": (-0.70, -0.45), "surprise": (0.25, 0.80), "neutral": (0.0, 0.0),
})


def au_vector(weights: Mapping[str, float]) -> np.ndarray:
    """A {AU name: intensity} mapping as a (14,) float32 vector in AU_NAMES order."""
    unknown = set(weights) - set(AU_NAMES)
    if unknown:
        raise ValueError(f"unknown AU names {sorted(unknown)}; known: {AU_NAMES}")
    return np.array([weights.get(name, 0.0) for name in AU_NAMES], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------

HAIR_STYLES = ("short", "long", "cropped")

_SKIN_LIGHT = np.array([236.0, 204.0, 180.0])
_SKIN_DARK = np.array([92.0, 62.0, 48.0])
# black, dark brown, brown, blond, red, grey
_HAIR_COLOURS = np.array(
    [[28, 22, 20], [62, 40, 26], [105, 72, 42], [180, 150, 96], [128, 58, 30], [150, 148, 145]], dtype=float
)
_HAIR_WEIGHTS = np.array([0.34, 0.26, 0.16, 0.10, 0.06, 0.08])
_IRIS_COLOURS = np.array([[70, 45, 30], [40, 28, 22], [70, 110, 150], [80, 110, 70], [110, 90, 60]], float)


@dataclass(frozen=True, eq=False)
class Identity:
    """One synthetic subject: neutral geometry plus appearance. Build with :func:`sample_identity`."""

    points: np.ndarray  # (NUM_POINTS, 3) neutral extended template in face units
    au_scale: np.ndarray  # (2,) x/y scale applied to AU displacements (face size)
    skin: tuple[float, float, float]  # RGB 0..255
    hair: tuple[float, float, float]
    brows: tuple[float, float, float]
    iris: tuple[float, float, float]
    lips: tuple[float, float, float]
    hair_style: str  # one of HAIR_STYLES
    brow_thickness: float  # face units


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw a random subject: face shape, eye/brow/nose/mouth geometry, skin, hair and eye colour."""
    p = EXTENDED_TEMPLATE.copy()
    x, y = p[:, 0], p[:, 1]  # views: edits below write into p
    jaw = np.arange(17)
    # Lower jaw width and chin length: weight grows from the temples (0) to the chin (1).
    jaw_weight = np.clip((y[jaw] + 0.30) / 1.56, 0, 1) ** 1.5
    x[jaw] *= 1.0 + (rng.uniform(0.86, 1.08) - 1.0) * jaw_weight
    y[jaw] += rng.uniform(-0.07, 0.07) * jaw_weight ** 2
    x[NECK] *= rng.uniform(0.85, 1.1)
    # Eyes: spacing, size, openness, height.
    spacing, size = rng.uniform(-0.04, 0.04), rng.uniform(0.88, 1.14)
    openness, eye_dy = rng.uniform(0.8, 1.2), rng.uniform(-0.03, 0.03)
    for eye in (np.arange(36, 42), np.arange(42, 48)):
        cx, cy = x[eye].mean(), y[eye].mean()
        x[eye] = cx + (x[eye] - cx) * size + np.sign(cx) * spacing
        y[eye] = cy + (y[eye] - cy) * size * openness + eye_dy
    # Brows: height, arch, slant.
    brow = np.arange(17, 27)
    along = (np.abs(x[brow]) - 0.52) / 0.32  # -1 at the inner end, 0 mid-brow, +1 at the outer end
    y[brow] += rng.uniform(-0.05, 0.05) - rng.uniform(-0.02, 0.05) * np.clip(1.0 - np.abs(along), 0, 1)
    y[brow] += rng.uniform(-0.04, 0.04) * along
    x[brow] += np.sign(x[brow]) * spacing
    # Nose: length and width.
    y[[30, 31, 32, 33, 34, 35]] += rng.uniform(-0.05, 0.06)
    x[31:36] *= rng.uniform(0.85, 1.2)
    # Mouth: width, height, lip thickness.
    mouth = np.arange(48, 68)
    x[mouth] *= rng.uniform(0.88, 1.12)
    y[mouth] += rng.uniform(-0.04, 0.04)
    inner_line = 0.5 * (y[62] + y[66])
    upper_outer, lower_outer = np.arange(49, 54), np.arange(55, 60)
    y[upper_outer] = inner_line + (y[upper_outer] - inner_line) * rng.uniform(0.7, 1.3)
    y[lower_outer] = inner_line + (y[lower_outer] - inner_line) * rng.uniform(0.75, 1.3)
    # Hairline height.
    y[HAIRLINE[1:-1]] += rng.uniform(-0.08, 0.14)
    # Overall face size: scale everything about the eye line.
    sx, sy = rng.uniform(0.9, 1.06), rng.uniform(0.94, 1.08)
    x *= sx
    y[:] = -0.30 + (y + 0.30) * sy

    tone = rng.uniform(0, 1) ** 1.3  # more light than dark skins, but the full range
    skin = _SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone
    # Warm/cool undertone: shift red against blue, keep green (skin hue stays in the skin range).
    undertone = rng.uniform(-1, 1)
    skin = skin * (1.0 + 0.04 * undertone * np.array([1.0, 0.0, -1.0])) * rng.uniform(0.96, 1.04)
    hair = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=_HAIR_WEIGHTS)] * rng.uniform(0.85, 1.15)
    # Brows are darker than scalp hair and always darker than the skin (a strong face cue).
    brow_colour = np.minimum(hair * 0.7, skin * 0.45) + 8
    iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))]
    lips = skin * np.array([0.78, 0.55, 0.55]) + np.array([30.0, 8.0, 10.0])
    style = HAIR_STYLES[rng.choice(3, p=[0.45, 0.4, 0.15])]
    return Identity(
        points=p, au_scale=np.array([sx, sy]), skin=_rgb(skin), hair=_rgb(hair), brows=_rgb(brow_colour),
        iris=_rgb(iris), lips=_rgb(lips), hair_style=style,
        brow_thickness=float(rng.uniform(0.03, 0.055)),
    )


def _rgb(c: np.ndarray) -> tuple[float, float, float]:
    c = np.clip(c, 0, 255)
    return float(c[0]), float(c[1]), float(c[2])


# --------------------------------------------------------------------------------------------------
# Batched geometry
# --------------------------------------------------------------------------------------------------

# Ordering constraints applied after the AU fields (pairs of (upper, lower) point indices).
_LID_PAIRS = np.array([(37, 41), (38, 40), (44, 46), (43, 47)])
_INNER_LIP_PAIRS = np.array([(61, 67), (62, 66), (63, 65)])
_UPPER_LIP_PAIRS = np.array([(50, 61), (51, 62), (52, 63)])  # (outer, inner)
_LOWER_LIP_PAIRS = np.array([(58, 67), (57, 66), (56, 65)])  # (outer, inner)
_MIN_LIP = 0.02  # thinnest lip allowed, face units


def deform(points: np.ndarray, au_scale: np.ndarray, aus: np.ndarray) -> np.ndarray:
    """Apply AU intensities to neutral identity points.

    points (N, P, 3), au_scale (N, 2), aus (N, 14) already clipped to [0, MAX_INTENSITY].
    Returns the expressive (N, P, 3) points.
    """
    out = points.copy()
    delta = (aus @ AU_DISPLACEMENTS.reshape(len(AU_NAMES), -1)).reshape(len(aus), 68, 2) * au_scale[:, None, :]
    out[:, :68, :2] += delta
    y = out[..., 1]
    # Folding guards, only active for extreme (magnified) combinations.
    y[:, _LID_PAIRS[:, 1]] = np.maximum(y[:, _LID_PAIRS[:, 1]], y[:, _LID_PAIRS[:, 0]])
    y[:, _INNER_LIP_PAIRS[:, 1]] = np.maximum(y[:, _INNER_LIP_PAIRS[:, 1]], y[:, _INNER_LIP_PAIRS[:, 0]])
    y[:, _UPPER_LIP_PAIRS[:, 0]] = np.minimum(y[:, _UPPER_LIP_PAIRS[:, 0]], y[:, _UPPER_LIP_PAIRS[:, 1]] - _MIN_LIP)
    y[:, _LOWER_LIP_PAIRS[:, 0]] = np.maximum(y[:, _LOWER_LIP_PAIRS[:, 0]], y[:, _LOWER_LIP_PAIRS[:, 1]] + _MIN_LIP)
    y[:, 8] = np.maximum(y[:, 8], y[:, 57] + 0.15)
    return out


_PIVOT = np.array([0.0, 0.0, -0.8])  # rotation centre: roughly the middle of the skull


def rotation_matrices(pose_deg: np.ndarray) -> np.ndarray:
    """(N, 3) yaw, pitch, roll in degrees -> (N, 3, 3). Positive yaw turns the face toward the image's
    right, positive pitch tilts the chin down, positive roll turns the face clockwise in the image."""
    yaw, pitch, roll = np.deg2rad(pose_deg).T
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    one, zero = np.ones(len(pose_deg)), np.zeros(len(pose_deg))

    def matrix(rows):
        return np.stack([np.stack(row, -1) for row in rows], 1)

    r_yaw = matrix([(cy, zero, sy), (zero, one, zero), (-sy, zero, cy)])
    r_pitch = matrix([(one, zero, zero), (zero, cp, sp), (zero, -sp, cp)])
    r_roll = matrix([(cr, -sr, zero), (sr, cr, zero), (zero, zero, one)])
    return r_roll @ r_pitch @ r_yaw


def pose_points(points: np.ndarray, pose_deg: np.ndarray) -> np.ndarray:
    """Rotate (N, P, 3) face-unit points by per-item yaw/pitch/roll about the skull centre."""
    rot = rotation_matrices(pose_deg)[:, None]  # (N, 1, 3, 3) broadcasts over points
    centred = points - _PIVOT
    x, y, z = centred[..., 0], centred[..., 1], centred[..., 2]
    # Written out: far faster than a batched matmul of many tiny 3x3 products.
    out = np.empty_like(centred)
    for i in range(3):
        out[..., i] = rot[..., i, 0] * x + rot[..., i, 1] * y + rot[..., i, 2] * z + _PIVOT[i]
    return out
