"""Rasterise SynthFACS faces with OpenCV: shaded skin, hair, brows, eyes with iris and pupil,
nostrils, lips, AU-driven wrinkles, then the scene's nuisances (clutter, occluders, light, blur, noise).

Geometry is batched: every contour the painter needs (smoothed outlines, crease polylines, ellipse
centres) is a fixed linear combination of the face's points, so one matrix product per batch
produces all of them, already posed and projected. The per-image loop only calls OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from fer_core.data.synthfacs import face_model as fm

_SHIFT = 4  # fixed-point bits for OpenCV drawing: sub-pixel precise, anti-aliased edges
_ONE = 1 << _SHIFT
FACE_SCALE = 0.27  # pixels per face unit, as a fraction of the image size
FACE_CENTRE_Y = -0.05  # face-unit y that lands at the image centre (head, not just face, centred)


@dataclass(frozen=True)
class Occluder:
    """Something in front of the face. kind: 'sunglasses', 'mask', 'hand' or 'bar'."""

    kind: str
    anchor: int = 30  # landmark it is placed on (hand and bar)
    offset: tuple[float, float] = (0.0, 0.0)  # face units from the anchor
    size: float = 0.5  # face units
    angle: float = 0.0  # degrees
    colour: tuple[float, float, float] = (40.0, 40.0, 45.0)


@dataclass(frozen=True)
class Nuisance:
    """Everything about an image that is not the face's identity, expression or pose.

    The defaults are a clean studio shot. ``light`` is a multiplicative illumination gradient
    (fractional change per half image in x and y), ``blur`` a Gaussian sigma as a fraction of the
    image size, ``noise`` a Gaussian sigma in grey levels, ``shift`` the face centre's offset as a
    fraction of the image size. ``seed`` fixes the clutter layout and ``noise_seed`` the sensor noise,
    so the same nuisance renders the same pixels (magnified pairs rely on it); clips keep ``seed``
    and vary ``noise_seed`` per frame.
    """

    background: tuple[float, float, float] = (150.0, 150.0, 150.0)
    clothes: tuple[float, float, float] = (60.0, 70.0, 100.0)
    light: tuple[float, float] = (0.0, 0.0)
    brightness: float = 1.0
    contrast: float = 1.0
    blur: float = 0.0
    noise: float = 0.0
    clutter: int = 0
    occluder: Occluder | None = None
    shift: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    gaze: tuple[float, float] = (0.0, 0.0)  # iris offset, fraction of the eye's half width/height
    has_face: bool = True
    seed: int = 0
    noise_seed: int = 0

    @property
    def is_clean(self) -> bool:
        return (self.light == (0.0, 0.0) and self.brightness == 1.0 and self.contrast == 1.0
                and self.blur == 0.0 and self.noise == 0.0)


# --------------------------------------------------------------------------------------------------
# Contour specification: each named block is rows of weights over the face's points plus a constant
# face-unit offset, evaluated in 3-D before the pose so that every curve turns with the head.
# --------------------------------------------------------------------------------------------------


def _catmull_rom(ctrl: Sequence[int], samples: int, closed: bool) -> np.ndarray:
    """Weights (K, NUM_POINTS) of a uniform Catmull-Rom spline through the control points."""
    n = len(ctrl)
    segments = n if closed else n - 1
    rows = []
    for s in range(segments):
        i0, i1, i2, i3 = s - 1, s, s + 1, s + 2
        if closed:
            i0, i2, i3 = i0 % n, i2 % n, i3 % n
        else:
            i0, i3 = max(i0, 0), min(i3, n - 1)
        last = (not closed) and s == segments - 1
        for t in np.linspace(0, 1, samples + 1)[: samples + (1 if last else 0)]:
            w = 0.5 * np.array([
                -t + 2 * t**2 - t**3, 2 - 5 * t**2 + 3 * t**3, t + 4 * t**2 - 3 * t**3, -(t**2) + t**3,
            ])
            row = np.zeros(fm.NUM_POINTS)
            for idx, weight in zip((i0, i1, i2, i3), w):
                row[ctrl[idx]] += weight
            rows.append(row)
    return np.asarray(rows)


def _points(*specs: tuple[dict[int, float], tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows for single points: ({point index: weight}, (dx, dy) face-unit offset) each."""
    w = np.zeros((len(specs), fm.NUM_POINTS))
    b = np.zeros((len(specs), 3))
    for k, (weights, (dx, dy)) in enumerate(specs):
        for i, v in weights.items():
            w[k, i] = v
        b[k, :2] = dx, dy
    return w, b


def _mirror(specs):
    """The image-right twin of image-left point specs (mirror indices, negate x offsets)."""
    return tuple(
        ({int(fm.MIRROR_68[i]) if i < 68 else i: v for i, v in weights.items()}, (-dx, dy))
        for weights, (dx, dy) in specs
    )


def _no_offset(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return w, np.zeros((len(w), 3))


def _spline(ctrl: Sequence[int], samples: int = 3) -> np.ndarray:
    return _catmull_rom(list(ctrl), samples, closed=False)


def _outline(*pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A closed polygon from open pieces that each end where the next begins."""
    return _no_offset(np.concatenate([piece[:-1] for piece in pieces]))


def _strip(*pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _no_offset(np.concatenate(pieces))


def _forehead_line(dy: float) -> tuple:
    """A gently curved horizontal crease ``dy`` above the mean brow."""
    brows = {19: 0.25, 20: 0.25, 23: 0.25, 24: 0.25}
    return tuple((brows, (x, dy + 0.03 * (x / 0.45) ** 2)) for x in np.linspace(-0.42, 0.42, 5))


_EYE_L, _EYE_R = {i: 1 / 6 for i in range(36, 42)}, {i: 1 / 6 for i in range(42, 48)}
_NASOLABIAL_L = (({31: 1.0}, (-0.06, -0.05)), ({31: 0.5, 48: 0.5}, (-0.13, 0.0)), ({48: 1.0}, (-0.08, 0.08)))
_CROWS_FEET_L = (
    ({36: 1.0}, (-0.05, -0.02)), ({36: 1.0}, (-0.15, -0.06)), ({36: 1.0}, (-0.05, 0.02)), ({36: 1.0}, (-0.14, 0.07)),
)
_INFRAORBITAL_L = (({41: 1.0}, (-0.03, 0.07)), ({40: 0.5, 41: 0.5}, (0.0, 0.085)), ({40: 1.0}, (0.03, 0.07)))
_GLABELLA_L = (({21: 1.0}, (0.06, -0.02)), ({21: 1.0}, (0.07, 0.12)))
_CHEEK_L = (({2: 0.45, 31: 0.35, 41: 0.2}, (0.0, 0.0)),)
_SOCKET_L = ((_EYE_L, (0.0, -0.035)),)
_NOSTRIL_L = (({31: 0.45, 32: 0.55}, (0.0, -0.025)),)
_NOSE_SIDE_L = (({28: 1.0}, (-0.09, 0.0)), ({31: 1.0}, (0.02, -0.07)))
_NOSE_WRINKLES = tuple(({28: 1.0}, offset) for offset in (
    (-0.09, -0.05), (0.0, -0.03), (0.09, -0.05), (-0.08, 0.04), (0.0, 0.06), (0.08, 0.04),
))
_CHIN = (({7: 0.5, 57: 0.5}, (0.0, 0.02)), ({8: 0.55, 57: 0.45}, (0.0, 0.0)), ({9: 0.5, 57: 0.5}, (0.0, 0.02)))

_BLOCKS: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "face": _no_offset(_catmull_rom([*range(17), *fm.FOREHEAD], 4, closed=True)),
    "hair_cap": _no_offset(_catmull_rom([*fm.HAIR_OUTER, *fm.HAIRLINE], 3, closed=True)),
    "long_hair": _no_offset(np.eye(fm.NUM_POINTS)[[*fm.HAIR_OUTER, *fm.LONG_HAIR]]),
    "neck": _no_offset(np.eye(fm.NUM_POINTS)[fm.NECK]),
    # Brow bands: the centre line there and back; face_geometry pushes the halves apart.
    "brow_l": _strip(_spline(range(17, 22)), _spline(range(21, 16, -1))),
    "brow_r": _strip(_spline(range(22, 27)), _spline(range(26, 21, -1))),
    # Eyes and inner mouth: the first half (plus one point) is the upper lid / upper inner lip.
    "eye_l": _outline(_spline([36, 37, 38, 39], 4), _spline([39, 40, 41, 36], 4)),
    "eye_r": _outline(_spline([42, 43, 44, 45], 4), _spline([45, 46, 47, 42], 4)),
    "mouth_outer": _outline(_spline(range(48, 55)), _spline([54, 55, 56, 57, 58, 59, 48])),
    "mouth_inner": _outline(_spline(range(60, 65)), _spline([64, 65, 66, 67, 60])),
    "upper_lip": _strip(_spline(range(48, 55)), _spline([54, 64, 63, 62, 61, 60, 48])),
    # Upper teeth: from the upper inner lip halfway across the opening (never past the lower lip).
    "teeth": _strip(_spline(range(60, 65)), 0.5 * (_spline(range(64, 59, -1)) + _spline([64, 65, 66, 67, 60]))),
    "alar": _no_offset(_spline(range(31, 36))),
    "forehead_lines": _points(*_forehead_line(-0.20), *_forehead_line(-0.32)),
    "glabella": _points(*_GLABELLA_L, *_mirror(_GLABELLA_L)),
    "nose_wrinkles": _points(*_NOSE_WRINKLES),
    "nasolabial": _points(*_NASOLABIAL_L, *_mirror(_NASOLABIAL_L)),
    "crows_feet": _points(*_CROWS_FEET_L, *_mirror(_CROWS_FEET_L)),
    "infraorbital": _points(*_INFRAORBITAL_L, *_mirror(_INFRAORBITAL_L)),
    "chin": _points(*_CHIN),
    "eye_centres": _points((_EYE_L, (0.0, 0.0)), (_EYE_R, (0.0, 0.0))),
    "sockets": _points(*_SOCKET_L, *_mirror(_SOCKET_L)),
    "cheeks": _points(*_CHEEK_L, *_mirror(_CHEEK_L)),
    "nostrils": _points(*_NOSTRIL_L, *_mirror(_NOSTRIL_L)),
    "nose_sides": _points(*_NOSE_SIDE_L, *_mirror(_NOSE_SIDE_L)),
    # Shading centres: face middle, nose tip, forehead.
    "face_centre": _points(({fm.FACE_CENTRE: 1.0}, (0.0, 0.0)), ({30: 1.0}, (0.0, -0.02)), ({28: 1.0}, (0.0, -0.25))),
    "ears": _points(({int(fm.EARS[0]): 1.0}, (0.0, 0.0)), ({int(fm.EARS[1]): 1.0}, (0.0, 0.0))),
    "clothes": _points(({int(fm.NECK[1]): 0.5, int(fm.NECK[2]): 0.5}, (0.0, 0.35))),
}
_SLICES: dict[str, slice] = {}
_start = 0
for _name, (_w, _b) in _BLOCKS.items():
    _SLICES[_name] = slice(_start, _start + len(_w))
    _start += len(_w)
_W_ALL = np.concatenate([w for w, _ in _BLOCKS.values()])
_B_ALL = np.concatenate([b for _, b in _BLOCKS.values()])
# Brow band half-thickness profile (upper half negative y, lower half positive): thicker at the
# head (inner end) than at the tail.
_BROW_PROFILE = {}
for _name, _head_last in (("brow_l", True), ("brow_r", False)):
    _half = (_SLICES[_name].stop - _SLICES[_name].start) // 2
    _taper = np.linspace(0.65, 1.0, _half) if _head_last else np.linspace(1.0, 0.65, _half)
    _BROW_PROFILE[_name] = np.concatenate([-_taper, _taper[::-1]])


def project(
    points3d: np.ndarray, poses: np.ndarray, nuisances: Sequence[Nuisance], image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pose (N, P, 3) face-unit points and map them to pixels; returns (pixels (N, P, 2), scale (N,))."""
    posed = fm.pose_points(points3d, poses)
    shift = np.array([n.shift for n in nuisances], dtype=np.float64).reshape(-1, 2)
    scale = FACE_SCALE * image_size * np.array([n.scale for n in nuisances], dtype=np.float64)
    px = np.empty(posed.shape[:2] + (2,))
    px[..., 0] = image_size * (0.5 + shift[:, None, 0]) + scale[:, None] * posed[..., 0]
    px[..., 1] = image_size * (0.5 + shift[:, None, 1]) + scale[:, None] * (posed[..., 1] - FACE_CENTRE_Y)
    # OpenCV's pixel centres sit at integer coordinates; keep landmarks in that same convention.
    return px, scale


def face_geometry(
    identities: Sequence[fm.Identity],
    aus: np.ndarray,
    poses: np.ndarray,
    nuisances: Sequence[Nuisance],
    image_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pixel geometry of a batch: (landmarks (N, 68, 2), contours (N, K, 2), pixel scale (N,))."""
    points = np.stack([ident.points for ident in identities])
    au_scale = np.stack([ident.au_scale for ident in identities])
    expressive = fm.deform(points, au_scale, aus)
    n, p, _ = expressive.shape
    # One GEMM for the whole batch: (K, P) @ (P, N * 3).
    flat = _W_ALL @ expressive.transpose(1, 0, 2).reshape(p, n * 3)
    contours = flat.reshape(-1, n, 3).transpose(1, 0, 2) + _B_ALL
    thickness = np.array([ident.brow_thickness for ident in identities])[:, None]
    for name, profile in _BROW_PROFILE.items():
        contours[:, _SLICES[name], 1] += thickness * profile
    px, scale = project(np.concatenate([expressive, contours], axis=1), poses, nuisances, image_size)
    return px[:, :68], px[:, fm.NUM_POINTS:], scale


# --------------------------------------------------------------------------------------------------
# Painter. Hot loop: coordinates arrive pre-converted to OpenCV fixed point (``cf``), colours come
# from a per-identity palette, so each image costs a few dozen OpenCV calls and little Python.
# --------------------------------------------------------------------------------------------------

Colour = tuple[float, float, float]
_AA = cv2.LINE_AA
_L8 = cv2.LINE_8  # for shapes drawn before the shading blur: anti-aliasing there is wasted work
_SCLERA: Colour = (232.0, 228.0, 222.0)
_MOUTH: Colour = (70.0, 22.0, 28.0)
_TEETH: Colour = (236.0, 232.0, 220.0)
_LASH: Colour = (28.0, 22.0, 22.0)
_PUPIL: Colour = (12.0, 10.0, 10.0)
_CATCHLIGHT: Colour = (250.0, 250.0, 250.0)
_AU = {name: i for i, name in enumerate(fm.AU_NAMES)}
_SKIN_SHADES = {  # multiples of the skin colour used by the painter
    "neck": 0.62, "ear": 0.86, "ear_inner": 0.7, "rim": 0.8, "ring0": 0.85, "ring1": 0.9, "ring2": 0.95,
    "ring3": 1.0, "forehead": 1.04, "socket": 0.8, "nose_side": 0.84, "nose_tip": 1.06, "lower_lid": 0.62,
    "nostril": 0.35, "alar": 0.62,
}


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(points * _ONE).astype(np.int32)


def _fx(x: float, y: float) -> tuple[int, int]:
    return int(x * _ONE + 0.5), int(y * _ONE + 0.5)


def _shade(colour: Colour, k: float) -> Colour:
    return (min(colour[0] * k, 255.0), min(colour[1] * k, 255.0), min(colour[2] * k, 255.0))


def _mix(a: Colour, b: Colour, t: float) -> Colour:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


def _palette(identity: fm.Identity) -> dict[str, Colour]:
    skin = identity.skin
    colours = {name: _shade(skin, k) for name, k in _SKIN_SHADES.items()}
    colours["blush"] = _mix(skin, (min(skin[0] * 1.08, 255.0), skin[1] * 0.9, skin[2] * 0.9), 0.35)
    colours["long_hair"] = _shade(identity.hair, 0.8)
    cropped = identity.hair_style == "cropped"  # scalp shows through
    colours["hair"] = _mix(identity.hair, _shade(skin, 0.8), 0.45) if cropped else identity.hair
    colours["upper_lip"] = _shade(identity.lips, 0.86)
    colours["lip_line"] = _shade(identity.lips, 0.45)
    return colours


def _ellipse(
    img: np.ndarray, centre: tuple[int, int], a: float, b: float, angle: float, colour: Colour, line: int = _AA
) -> None:
    """Filled ellipse; centre in fixed point, semi-axes a, b in pixels."""
    cv2.ellipse(img, centre, (max(int(a * _ONE), 1), max(int(b * _ONE), 1)), angle, 0, 360, colour, -1, line, _SHIFT)


def _draw_clutter(img: np.ndarray, rng: np.random.Generator, count: int) -> None:
    size = img.shape[0]
    for _ in range(count):
        colour = tuple(float(c) for c in rng.uniform(20, 235, 3))
        kind = rng.integers(3)
        a, b = rng.uniform(-0.1, 1.1, 2) * size, rng.uniform(-0.1, 1.1, 2) * size
        if kind == 0:
            cv2.rectangle(img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), colour, -1)
        elif kind == 1:
            cv2.circle(img, (int(a[0]), int(a[1])), int(rng.uniform(0.03, 0.2) * size), colour, -1, _AA)
        else:
            width = max(1, int(rng.uniform(0.01, 0.04) * size))
            cv2.line(img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), colour, width, _AA)


def _draw_eye(
    img: np.ndarray, contour: np.ndarray, centre: np.ndarray, eye_w: float, gaze: tuple[float, float], iris: Colour
) -> None:
    """Sclera, then iris, pupil and catch light clipped to the eye opening. contour is fixed point."""
    cv2.fillPoly(img, [contour], _SCLERA, _AA, _SHIFT)
    h, w = img.shape[:2]
    x0, y0 = max(int(contour[:, 0].min()) // _ONE - 1, 0), max(int(contour[:, 1].min()) // _ONE - 1, 0)
    x1, y1 = min(int(contour[:, 0].max()) // _ONE + 2, w), min(int(contour[:, 1].max()) // _ONE + 2, h)
    if x1 <= x0 or y1 <= y0:
        return
    roi = img[y0:y1, x0:x1]
    layer = roi.copy()
    r = 0.23 * eye_w
    cx = centre[0] + gaze[0] * eye_w * 0.5 - x0
    cy = centre[1] + gaze[1] * r - y0
    _ellipse(layer, _fx(cx, cy), r, r, 0, iris)
    _ellipse(layer, _fx(cx, cy), 0.45 * r, 0.45 * r, 0, _PUPIL)
    _ellipse(layer, _fx(cx + 0.3 * r, cy - 0.35 * r), 0.2 * r, 0.2 * r, 0, _CATCHLIGHT)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [contour], 1, cv2.LINE_8, _SHIFT, (-x0 * _ONE, -y0 * _ONE))
    np.copyto(roi, layer, where=mask[..., None].view(bool))


def _paint_face(img, lm, ct, cf, s, roll, identity, colours, aus, nuisance, image_size) -> None:
    """Draw one face. lm (68, 2) and ct (K, 2) are pixel coordinates, cf the same contours in fixed
    point; s is pixels per face unit, roll the in-plane angle in degrees."""
    sl = _SLICES
    skin = identity.skin
    line_w = max(1, int(round(image_size / 80)))

    def centre(name: str, k: int = 0) -> tuple[int, int]:
        i = sl[name].start + k
        return int(cf[i, 0]), int(cf[i, 1])

    # Behind the head: long hair, shoulders, neck, ears.
    if identity.hair_style == "long":
        cv2.fillPoly(img, [cf[sl["long_hair"]]], colours["long_hair"], _L8, _SHIFT)
    _ellipse(img, centre("clothes"), 2.0 * s, 0.75 * s, roll, nuisance.clothes, _L8)
    cv2.fillPoly(img, [cf[sl["neck"]]], colours["neck"], _L8, _SHIFT)
    for k in (0, 1):
        _ellipse(img, centre("ears", k), 0.13 * s, 0.24 * s, roll, colours["ear"], _L8)
        _ellipse(img, centre("ears", k), 0.06 * s, 0.14 * s, roll, colours["ear_inner"], _L8)
    # Skin: darker rim, rings lit toward the light, forehead and nose highlights, eye sockets. The
    # blur below turns the rings into smooth shading.
    cv2.fillPoly(img, [cf[sl["face"]]], colours["rim"], _L8, _SHIFT)
    mid = ct[sl["face_centre"].start]
    lx, ly = nuisance.light[0] * 0.04 * s, nuisance.light[1] * 0.04 * s
    for k, (ax, ay) in enumerate(((0.9, 1.16), (0.8, 1.06), (0.7, 0.96), (0.6, 0.86))):
        _ellipse(img, _fx(mid[0] + lx * k, mid[1] + ly * k), ax * s, ay * s, roll, colours[f"ring{k}"], _L8)
    forehead = ct[sl["face_centre"].start + 2]
    _ellipse(img, _fx(forehead[0] + 3 * lx, forehead[1] + 3 * ly), 0.34 * s, 0.18 * s, roll, colours["forehead"], _L8)
    lift = 0.06 * s * min(float(aus[_AU["AU6"]]), 1.0)  # AU6 raises the cheeks: the blush rises with it
    for cheek in ct[sl["cheeks"]]:
        _ellipse(img, _fx(cheek[0], cheek[1] - lift), 0.2 * s, 0.14 * s, roll, colours["blush"], _L8)
    for k in (0, 1):
        _ellipse(img, centre("sockets", k), 0.27 * s, 0.16 * s, roll, colours["socket"], _L8)
    sides = cf[sl["nose_sides"]]
    width = max(1, int(round(0.07 * s)))
    cv2.polylines(img, [sides[0:2], sides[2:4]], False, colours["nose_side"], width, _L8, _SHIFT)
    _ellipse(img, centre("face_centre", 1), 0.09 * s, 0.07 * s, roll, colours["nose_tip"], _L8)
    kernel = 2 * int(np.ceil(2 * 0.015 * image_size)) + 1
    cv2.GaussianBlur(img, (kernel, kernel), 0.015 * image_size, dst=img)

    # AU wrinkles; their darkness follows the AU's intensity (capped at 1).
    a = aus.tolist()
    creases = (
        ("forehead_lines", max(a[_AU["AU1"]], a[_AU["AU2"]]), 0.28, 5),
        ("glabella", a[_AU["AU4"]], 0.3, 2),
        ("nose_wrinkles", a[_AU["AU9"]], 0.35, 3),
        ("nasolabial", 0.2 + a[_AU["AU12"]] + 0.6 * a[_AU["AU9"]] + 0.3 * a[_AU["AU6"]], 0.3, 3),
        ("crows_feet", a[_AU["AU6"]], 0.3, 2),
        ("infraorbital", max(a[_AU["AU6"]], a[_AU["AU7"]]), 0.25, 3),
        ("chin", a[_AU["AU17"]], 0.3, 3),
    )
    for name, strength, depth, run in creases:
        if strength >= 0.05:
            pts = cf[sl[name]]
            cv2.polylines(img, [pts[i: i + run] for i in range(0, len(pts), run)], False,
                          _shade(skin, 1.0 - depth * min(strength, 1.0)), line_w, _AA, _SHIFT)

    cv2.fillPoly(img, [cf[sl["brow_l"]], cf[sl["brow_r"]]], identity.brows, _AA, _SHIFT)

    # Eyes: sclera, iris, pupil, catch light, lash line, lower lid.
    for k, (name, outer, inner) in enumerate((("eye_l", 36, 39), ("eye_r", 45, 42))):
        contour = cf[sl[name]]
        eye_w = float(np.hypot(lm[inner, 0] - lm[outer, 0], lm[inner, 1] - lm[outer, 1]))
        _draw_eye(img, contour, ct[sl["eye_centres"].start + k], eye_w, nuisance.gaze, identity.iris)
        half = len(contour) // 2
        cv2.polylines(img, [contour[: half + 1]], False, _LASH, line_w, _AA, _SHIFT)
        cv2.polylines(img, [contour[half:]], False, colours["lower_lid"], 1, _AA, _SHIFT)

    # Nose: nostrils and the alar crease.
    for k in (0, 1):
        _ellipse(img, centre("nostrils", k), 0.055 * s, 0.028 * s, roll, colours["nostril"])
    cv2.polylines(img, [cf[sl["alar"]]], False, colours["alar"], line_w, _AA, _SHIFT)

    # Mouth: lips, the opening with teeth when the lips part, the lip line.
    inner = cf[sl["mouth_inner"]]
    upper_inner = inner[: len(inner) // 2 + 1]
    cv2.fillPoly(img, [cf[sl["mouth_outer"]]], identity.lips, _AA, _SHIFT)
    cv2.fillPoly(img, [cf[sl["upper_lip"]]], colours["upper_lip"], _AA, _SHIFT)
    if lm[66, 1] - lm[62, 1] > 0.5 or lm[67, 1] - lm[61, 1] > 0.5 or lm[65, 1] - lm[63, 1] > 0.5:
        cv2.fillPoly(img, [inner], _MOUTH, _AA, _SHIFT)
        cv2.fillPoly(img, [cf[sl["teeth"]]], _TEETH, _AA, _SHIFT)
    cv2.polylines(img, [upper_inner], False, colours["lip_line"], line_w, _AA, _SHIFT)

    # Hair in front: the cap over the top of the head.
    cv2.fillPoly(img, [cf[sl["hair_cap"]]], colours["hair"], _AA, _SHIFT)


def _draw_occluder(img: np.ndarray, lm: np.ndarray, ct: np.ndarray, s: float, roll: float, occ: Occluder) -> None:
    if occ.kind == "sunglasses":
        eyes = ct[_SLICES["eye_centres"]]
        for c in eyes:
            _ellipse(img, _fx(*c), 0.3 * s, 0.19 * s, roll, occ.colour)
        cv2.polylines(img, [_fixed(eyes)], False, occ.colour, max(1, int(0.05 * s)), _AA, _SHIFT)
    elif occ.kind == "mask":
        top = lm[29, 1]
        outline = np.concatenate([lm[2:15], [(lm[14, 0], top), (lm[2, 0], top)]])
        cv2.fillPoly(img, [_fixed(outline)], occ.colour, _AA, _SHIFT)
    elif occ.kind == "hand":
        size = 2 * occ.size * s
        c = lm[occ.anchor] + np.array(occ.offset) * s
        _ellipse(img, _fx(*c), 0.32 * size, 0.45 * size, occ.angle, occ.colour)
        along = np.array([np.sin(np.deg2rad(occ.angle)), -np.cos(np.deg2rad(occ.angle))])
        across = np.array([along[1], -along[0]])
        for k in (-1.5, -0.5, 0.5, 1.5):
            base = c + across * k * 0.13 * size
            tip = base + along * 0.8 * size
            cv2.line(img, _fx(*base), _fx(*tip), occ.colour, max(1, int(0.11 * size)), _AA, _SHIFT)
    elif occ.kind == "bar":
        c = lm[occ.anchor] + np.array(occ.offset) * s
        box = cv2.boxPoints(((float(c[0]), float(c[1])), (0.25 * s, 2.4 * occ.size * s), occ.angle))
        cv2.fillPoly(img, [_fixed(box)], occ.colour, _AA, _SHIFT)
    else:
        raise ValueError(f"unknown occluder kind {occ.kind!r}")


def _apply_photometric(img: np.ndarray, nuisance: Nuisance) -> np.ndarray:
    size = img.shape[0]
    out = img.astype(np.float32)
    if nuisance.light != (0.0, 0.0) or nuisance.brightness != 1.0:
        ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        gain = 1.0 + nuisance.light[0] * ramp[None, :] + nuisance.light[1] * ramp[:, None]
        out *= (np.clip(gain, 0.1, 3.0) * nuisance.brightness)[..., None]
    if nuisance.contrast != 1.0:
        out = (out - 128.0) * nuisance.contrast + 128.0
    if nuisance.blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), nuisance.blur * size)
    if nuisance.noise > 0:
        noise = np.random.default_rng(nuisance.noise_seed).standard_normal(out.shape, dtype=np.float32)
        out += noise * nuisance.noise
    return np.clip(out, 0, 255).astype(np.uint8)


def render_batch(
    identities: Sequence[fm.Identity],
    aus: np.ndarray,
    poses: np.ndarray,
    nuisances: Sequence[Nuisance],
    image_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Render N faces. aus (N, 14) are clipped to [0, MAX_INTENSITY]; poses (N, 3) degrees.

    Returns images uint8 (N, S, S, 3) RGB and landmarks float32 (N, 68, 2) pixel (x, y), NaN where
    the nuisance says the frame holds no face.
    """
    n = len(identities)
    if len(nuisances) != n:
        raise ValueError(f"{len(nuisances)} nuisances for {n} identities")
    aus = np.clip(np.asarray(aus, dtype=np.float64).reshape(n, len(fm.AU_NAMES)), 0.0, fm.MAX_INTENSITY)
    poses = np.asarray(poses, dtype=np.float64).reshape(n, 3)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    if n == 0:
        return images, np.empty((0, 68, 2), np.float32)
    landmarks, contours, scales = face_geometry(identities, aus, poses, nuisances, image_size)
    fixed = np.round(contours * _ONE).astype(np.int32)
    palettes: dict[int, dict[str, Colour]] = {}
    for i in range(n):
        nui, identity = nuisances[i], identities[i]
        img = images[i]
        img[:] = np.clip(np.round(nui.background), 0, 255).astype(np.uint8)
        if nui.clutter:
            _draw_clutter(img, np.random.default_rng(nui.seed), nui.clutter)
        if nui.has_face:
            colours = palettes.get(id(identity))
            if colours is None:
                colours = palettes[id(identity)] = _palette(identity)
            roll = float(poses[i, 2])
            _paint_face(img, landmarks[i], contours[i], fixed[i], float(scales[i]), roll, identity, colours,
                        aus[i], nui, image_size)
            if nui.occluder is not None:
                _draw_occluder(img, landmarks[i], contours[i], float(scales[i]), roll, nui.occluder)
        if not nui.is_clean:
            images[i] = _apply_photometric(img, nui)
    landmarks = landmarks.astype(np.float32)
    landmarks[[not nui.has_face for nui in nuisances]] = np.nan
    return images, landmarks
