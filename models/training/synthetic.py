"""A synthetic talking-avatar domain: procedural 2D faces whose mouths follow real speech.

Training the tiny Live Avatar models needs video whose ground truth is known exactly. This module
draws it: a cartoon head and shoulders on a two-tone or gradient background, with a mouth that
opens with the loudness of the audio, a slow head sway and occasional blinks, at 25 fps.

- :func:`face_params` turns ``(identity, seed)`` into a :class:`FaceParams` (skin, hair style and
  colour, eyes, face shape, jaw, lips, brows, nose, background, accessory, head offset). About a
  thousand identities look distinct at 64x64.
- :func:`models.mouth.mouth_envelope` is THE audio envelope: per video frame loudness in [0, 1]. It
  drives the mouth here and is what the lip-sync metric correlates against.
- :func:`make_motion` builds the per-frame :class:`Motion` (mouth, head sway, blinks) of a clip.
- :func:`render_frame` draws one uint8 frame; :func:`render_clip` a whole clip.
- :func:`sample_clip` and :class:`SyntheticDataset` produce training samples deterministically.

Drawing: every shape is a signed distance field in pixels, and a pixel's coverage is
``clip(0.5 - distance, 0, 1)``: analytic anti-aliasing with a one-pixel ramp, so a sub-pixel head
offset moves every edge smoothly. The background, shoulders and neck do not move and are drawn
once per face (cached); the head and its features are drawn per frame, each inside its own small
bounding box. Geometry in :class:`FaceParams` is in fractions of the image side, so any ``size``
works; offsets passed to :func:`render_frame` (``dx``, ``dy``) are in pixels.

Only numpy is used here (no torch), so data generation is fast and light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from models.mouth import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, mouth_envelope

DEFAULT_SIZE = 64

# Geometry constants (fractions of the image side).
HEAD_CENTER_Y = 0.47  # default head centre row; FaceParams.head_x / head_y offset it
MOUTH_OPEN_MAX = 0.1  # interior height of a fully open mouth (6.4 px at 64)
MOUTH_NARROWING = 0.12  # a fully open mouth is this much narrower (rounder)
EYE_CLOSE_POINT = 0.2  # the lids meet this fraction of the eye half-height below its centre
LASH_WIDTH_PX = 0.7

# Motion constants.
SWAY_PERIOD_S = (1.5, 6.0)  # range of the periods of the sway sines
SWAY_AMPLITUDE_PX = (1.0, 2.5)  # horizontal peak sway at 64 px; vertical is SWAY_VERTICAL times it
SWAY_VERTICAL = 0.6
SWAY_SINES = 3
NOD_PX = 0.5  # extra downward head offset at full loudness (at 64 px), smoothed over NOD_WINDOW_S
NOD_WINDOW_S = 0.4
BLINK_INTERVAL_S = (2.0, 5.0)
BLINK_PROFILE = (0.5, 0.0, 0.2, 0.7)  # eye openness over a blink's frames (close fast, open slower)

HAIR_STYLES = ("bald", "buzz", "short", "side_part", "long", "bob", "bun", "curly", "afro",
               "ponytail", "mohawk")
BACKGROUND_STYLES = ("vertical_split", "horizontal_split", "diagonal_split", "vertical_gradient",
                     "horizontal_gradient", "radial_gradient")
ACCESSORIES = ("none", "glasses", "hat", "earrings", "beard", "moustache", "headband")
_ACCESSORY_WEIGHTS = (0.34, 0.16, 0.1, 0.1, 0.1, 0.08, 0.12)

_SKIN_TONES = ((255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 96), (160, 105, 70),
               (120, 75, 50), (85, 55, 38))
_HAIR_COLOURS = ((25, 20, 20), (60, 40, 30), (105, 70, 45), (140, 70, 40), (215, 180, 120),
                 (235, 225, 200), (170, 60, 30), (160, 160, 160), (225, 225, 225))
_EYE_COLOURS = ((90, 55, 30), (45, 30, 20), (70, 120, 190), (70, 130, 80), (120, 130, 140),
                (140, 110, 50))
_LIPSTICKS = ((190, 30, 45), (215, 90, 120), (120, 40, 70), (230, 110, 90))
_METALS = ((212, 175, 55), (192, 192, 200))
_MOUTH_DARK = (55, 18, 24)
_TEETH = (238, 234, 224)
_WHITE_OF_EYE = (245, 245, 240)
_PUPIL = (15, 12, 12)
_BLUSH = (225, 95, 95)

RGB = tuple[int, int, int]


class SyntheticError(ValueError):
    """Bad input to the synthetic data generator (wrong shape, length, seed or parameter)."""


# ---------------------------------------------------------------------------------------------
# Face parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceParams:
    """Everything that makes one synthetic identity look the way it does.

    Colours are RGB 0-255. Lengths are fractions of the image side; vertical offsets are relative
    to the head centre ``((0.5 + head_x), (HEAD_CENTER_Y + head_y))`` and positive downwards.
    """

    identity: int
    skin_rgb: RGB
    hair_rgb: RGB
    hair_style: str  # one of HAIR_STYLES
    eye_rgb: RGB
    eye_spacing: float  # horizontal distance of each eye centre from the face centre line
    eye_y: float  # vertical offset of the eye centres
    eye_width: float  # half-width of an open eye
    eye_height: float  # half-height of an open eye
    iris_radius: float
    face_width: float  # full width of the face
    face_height: float  # full height of the face (crown to chin)
    jaw: float  # -1 square jaw .. 0 oval .. 1 pointed chin
    lip_rgb: RGB
    mouth_y: float  # vertical offset of the upper lip's lower edge (the line of a closed mouth)
    mouth_width: float  # full width of a closed mouth
    lip_thickness: float
    eyebrow_rgb: RGB
    eyebrow_thickness: float
    eyebrow_tilt: float  # radians, positive raises the outer ends
    eyebrow_raise: float  # gap between the top of the eye and the brow
    nose_y: float
    nose_size: float
    blush: float  # opacity of the cheek blush, 0 = none
    shirt_rgb: RGB
    background_rgb: RGB
    background_rgb2: RGB
    background_style: str  # one of BACKGROUND_STYLES
    background_split: float  # where a split or gradient is centred, 0..1
    accessory: str  # one of ACCESSORIES
    accessory_rgb: RGB
    head_x: float
    head_y: float


def _check_int(name: str, value, minimum: int = 0) -> int:
    """``value`` as an int; SyntheticError unless it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SyntheticError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _rgb(values) -> RGB:
    r, g, b = (int(np.clip(round(float(v)), 0, 255)) for v in values)
    return (r, g, b)


def _hsv(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> RGB:
    """A random colour from hue uniform in [0, 1) and saturation / value in the given ranges."""
    h, s, v = rng.uniform(), rng.uniform(*sat), rng.uniform(*val)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return _rgb(np.array(rgb) * 255)


def _jitter(rng: np.random.Generator, rgb, amount: float) -> RGB:
    return _rgb(np.asarray(rgb, dtype=np.float64) + rng.uniform(-amount, amount, 3))


def face_params(identity: int, seed: int = 0) -> FaceParams:
    """The appearance of ``identity``: a pure, deterministic function of ``(identity, seed)``.

    Every parameter is drawn from one generator seeded with ``[seed, identity]``, in a fixed
    order, and constrained so the features fit inside the face (e.g. the fully open mouth stays
    above the chin, the nose between the eyes and the mouth).
    """
    identity, seed = _check_int("identity", identity), _check_int("seed", seed)
    rng = np.random.default_rng([seed, identity])
    # 1. colours
    tone = rng.uniform(0, len(_SKIN_TONES) - 1)
    lo = int(tone)
    hi = min(lo + 1, len(_SKIN_TONES) - 1)
    skin = np.array(_SKIN_TONES[lo]) * (1 - (tone - lo)) + np.array(_SKIN_TONES[hi]) * (tone - lo)
    skin_rgb = _jitter(rng, skin, 8)
    if rng.uniform() < 0.15:
        hair_rgb = _hsv(rng, (0.5, 0.9), (0.45, 0.9))  # dyed
    else:
        hair_rgb = _jitter(rng, _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))], 12)
    hair_style = HAIR_STYLES[rng.integers(len(HAIR_STYLES))]
    eye_rgb = _jitter(rng, _EYE_COLOURS[rng.integers(len(_EYE_COLOURS))], 15)
    if rng.uniform() < 0.25:
        lip_rgb = _jitter(rng, _LIPSTICKS[rng.integers(len(_LIPSTICKS))], 10)
    else:
        lip_rgb = _jitter(rng, skin * np.array([0.82, 0.55, 0.58]) + np.array([25, 0, 0]), 8)
    brow_base = np.array(hair_rgb if hair_style != "bald" else _HAIR_COLOURS[rng.integers(3)])
    eyebrow_rgb = _jitter(rng, brow_base * 0.8, 6)
    shirt_rgb = _hsv(rng, (0.2, 0.9), (0.25, 0.95))
    background_rgb = _hsv(rng, (0.1, 0.8), (0.3, 1.0))
    background_rgb2 = _hsv(rng, (0.1, 0.8), (0.3, 1.0))
    background_style = BACKGROUND_STYLES[rng.integers(len(BACKGROUND_STYLES))]
    background_split = float(rng.uniform(0.3, 0.7))
    # 2. face shape and position
    face_width = float(rng.uniform(0.44, 0.58))
    face_height = float(max(rng.uniform(0.6, 0.7), face_width * 1.1))
    jaw = float(rng.uniform(-1.0, 1.0))
    head_x = float(rng.uniform(-0.04, 0.04))
    head_y = float(rng.uniform(-0.025, 0.025))
    # 3. eyes and brows
    eye_width = float(rng.uniform(0.04, 0.06))
    eye_height = float(eye_width * rng.uniform(0.6, 0.85))
    eye_spacing = float(rng.uniform(0.085, min(0.125, face_width / 2 - eye_width - 0.06)))
    eye_y = float(rng.uniform(-0.04, 0.0))
    iris_radius = float(eye_height * rng.uniform(0.65, 0.9))
    eyebrow_thickness = float(rng.uniform(0.014, 0.03))
    eyebrow_tilt = float(rng.uniform(-0.35, 0.35))
    eyebrow_raise = float(rng.uniform(0.02, 0.045))
    # 4. mouth: the fully open mouth's lower lip stays 0.025 above the chin
    lip_thickness = float(rng.uniform(0.016, 0.024))
    mouth_width = float(rng.uniform(0.14, 0.22))
    mouth_limit = face_height / 2 - MOUTH_OPEN_MAX - 2 * lip_thickness - 0.025
    mouth_y = float(min(eye_y + rng.uniform(0.17, 0.21), mouth_limit))
    # 5. nose halfway between the eyes and the upper lip, small enough to keep clear of both
    gap = mouth_y - lip_thickness - (eye_y + eye_height)
    nose_y = float(eye_y + eye_height + gap * rng.uniform(0.5, 0.6))
    nose_size = float(min(rng.uniform(0.025, 0.045), gap * 0.3))
    blush = float(rng.uniform(0.0, 0.35) if rng.uniform() < 0.4 else 0.0)
    # 6. accessory
    accessory = ACCESSORIES[rng.choice(len(ACCESSORIES), p=_ACCESSORY_WEIGHTS)]
    if accessory in ("beard", "moustache"):
        accessory_rgb = _rgb(np.array(eyebrow_rgb) * 0.95)
    elif accessory == "earrings":
        accessory_rgb = _METALS[rng.integers(len(_METALS))]
    else:
        accessory_rgb = _hsv(rng, (0.3, 1.0), (0.1, 0.9))
    return FaceParams(
        identity=identity, skin_rgb=skin_rgb, hair_rgb=hair_rgb, hair_style=hair_style,
        eye_rgb=eye_rgb, eye_spacing=eye_spacing, eye_y=eye_y, eye_width=eye_width,
        eye_height=eye_height, iris_radius=iris_radius, face_width=face_width,
        face_height=face_height, jaw=jaw, lip_rgb=lip_rgb, mouth_y=mouth_y, mouth_width=mouth_width,
        lip_thickness=lip_thickness, eyebrow_rgb=eyebrow_rgb, eyebrow_thickness=eyebrow_thickness,
        eyebrow_tilt=eyebrow_tilt, eyebrow_raise=eyebrow_raise, nose_y=nose_y, nose_size=nose_size,
        blush=blush, shirt_rgb=shirt_rgb, background_rgb=background_rgb,
        background_rgb2=background_rgb2, background_style=background_style,
        background_split=background_split, accessory=accessory, accessory_rgb=accessory_rgb,
        head_x=head_x, head_y=head_y)


# ---------------------------------------------------------------------------------------------
# Motion (the mouth follows models.mouth.mouth_envelope)
# ---------------------------------------------------------------------------------------------


def _check_pcm(pcm) -> np.ndarray:
    if not isinstance(pcm, np.ndarray) or pcm.ndim != 1:
        raise SyntheticError(f"pcm must be a 1-D numpy array, got "
                             f"{getattr(pcm, 'shape', type(pcm).__name__)}")
    pcm = pcm.astype(np.float32, copy=False)
    if not np.isfinite(pcm).all():
        raise SyntheticError("pcm contains NaN or inf samples")
    return pcm


@dataclass(frozen=True)
class Motion:
    """Per-frame animation of a clip; every field is float32 ``[T]``.

    mouth: 0 closed .. 1 wide open (the audio envelope). head_dx, head_dy: head offset in pixels
    at the clip's size. blink: eye openness, 1 open .. 0 closed.
    """

    mouth: np.ndarray
    head_dx: np.ndarray
    head_dy: np.ndarray
    blink: np.ndarray

    def __post_init__(self) -> None:
        lengths = {name: getattr(self, name).shape for name in ("mouth", "head_dx", "head_dy", "blink")}
        if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
            raise SyntheticError(f"motion fields must be 1-D arrays of one length, got {lengths}")

    @property
    def num_frames(self) -> int:
        return int(self.mouth.shape[0])


def _sway(rng: np.random.Generator, t: np.ndarray, amplitude: float) -> np.ndarray:
    """Sum of SWAY_SINES slow sines with seeded periods, phases and weights; peak <= amplitude."""
    periods = rng.uniform(*SWAY_PERIOD_S, SWAY_SINES)
    phases = rng.uniform(0, 2 * np.pi, SWAY_SINES)
    weights = rng.uniform(0.3, 1.0, SWAY_SINES)
    waves = np.sin(2 * np.pi * t[:, None] / periods[None, :] + phases[None, :])  # [T, K]
    return amplitude * (waves @ weights) / weights.sum()


def make_motion(pcm: np.ndarray, num_frames: int, seed: int, size: int = DEFAULT_SIZE) -> Motion:
    """The animation of one clip: mouth from the audio, seeded sway and blinks.

    1. mouth = :func:`mouth_envelope` of ``pcm`` (exactly; it is the lip-sync ground truth).
    2. head sway: per axis, a sum of slow sines (periods 1.5-6 s, seeded phases); peak
       horizontal amplitude 1-2.5 px at 64 px (scaled with ``size``), vertical 0.6 times that,
       plus a small nod: the head dips up to NOD_PX with the loudness averaged over 0.4 s.
    3. blinks: every 2-5 s (seeded), eye openness follows BLINK_PROFILE over 4 frames.
    """
    seed, num_frames = _check_int("seed", seed), _check_int("num_frames", num_frames, 1)
    size = _check_size(size)
    rng = np.random.default_rng([seed])
    scale = size / DEFAULT_SIZE
    t = np.arange(num_frames, dtype=np.float64) / FPS  # [T] seconds
    # 1. mouth
    mouth = mouth_envelope(_check_pcm(pcm), num_frames)
    # 2. sway and nod
    amplitude = rng.uniform(*SWAY_AMPLITUDE_PX) * scale
    head_dx = _sway(rng, t, amplitude)
    head_dy = _sway(rng, t, amplitude * SWAY_VERTICAL)
    window = max(1, round(NOD_WINDOW_S * FPS))
    nod = np.convolve(np.pad(mouth.astype(np.float64), (window // 2, window - 1 - window // 2),
                             mode="edge"), np.full(window, 1.0 / window), mode="valid")  # [T]
    head_dy = head_dy + NOD_PX * scale * nod
    # 3. blinks
    blink = np.ones(num_frames, dtype=np.float64)
    frame = rng.uniform(0, BLINK_INTERVAL_S[1]) * FPS
    while frame < num_frames:
        start = int(frame)
        for k, openness in enumerate(BLINK_PROFILE):
            if start + k < num_frames:
                blink[start + k] = openness
        frame += rng.uniform(*BLINK_INTERVAL_S) * FPS
    f32 = np.float32
    return Motion(mouth=mouth, head_dx=head_dx.astype(f32), head_dy=head_dy.astype(f32),
                  blink=blink.astype(f32))


# ---------------------------------------------------------------------------------------------
# Rendering: signed distances (pixels) and coverage
# ---------------------------------------------------------------------------------------------


def _check_size(size) -> int:
    return _check_int("size", size, 16)


def _ellipse(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance (px) to an axis-aligned ellipse with semi-axes a, b at the
    origin: ``(q - 1) / |grad q|`` with ``q = sqrt((x/a)^2 + (y/b)^2)`` (exact for circles)."""
    nx, ny = x / a, y / b
    q = np.sqrt(nx * nx + ny * ny)
    grad = np.sqrt((nx / a) ** 2 + (ny / b) ** 2) / np.maximum(q, 1e-6)
    return (q - 1.0) / np.maximum(grad, 1.0 / max(a, b))


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return x * c + y * s, y * c - x * s


class _Canvas:
    """A float32 ``[S, S, 3]`` image plus the helpers that paint a distance field into a box."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.size = image.shape[0]
        self.pix = _pixel_centres(self.size)

    def box(self, cx: float, cy: float, half_w: float, half_h: float):
        """Pixel box around (cx, cy) holding every pixel within half extents + 1 px, and the
        pixel-centre offsets from (cx, cy): ``(rows, cols, x [1, w], y [h, 1])`` or None."""
        x0, x1 = max(0, math.floor(cx - half_w - 1)), min(self.size, math.ceil(cx + half_w + 1))
        y0, y1 = max(0, math.floor(cy - half_h - 1)), min(self.size, math.ceil(cy + half_h + 1))
        if x0 >= x1 or y0 >= y1:
            return None
        return (slice(y0, y1), slice(x0, x1), self.pix[None, x0:x1] - cx, self.pix[y0:y1, None] - cy)

    def paint(self, box, dist: np.ndarray, rgb: np.ndarray, alpha: float = 1.0) -> None:
        """Blend ``rgb`` over the box with coverage ``clip(0.5 - dist, 0, 1) * alpha``."""
        rows, cols = box[0], box[1]
        region = self.image[rows, cols]
        cover = np.clip(0.5 - dist, 0.0, 1.0)
        if alpha != 1.0:
            cover = cover * alpha
        cover = np.broadcast_to(cover, region.shape[:2])
        region += cover[..., None] * (rgb - region)


@lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    return np.arange(size, dtype=np.float32) + np.float32(0.5)


@dataclass(frozen=True)
class _Layout:
    """Pixel geometry and float32 colours of one face at one size (derived once, cached)."""

    face: FaceParams
    size: int
    cx: float
    cy: float
    a: float  # face half-width
    b: float  # face half-height
    taper: float
    square: float
    colours: dict
    static: np.ndarray  # [S, S, 3] float32: background, shoulders, neck


def _colour(rgb) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float32)


@lru_cache(maxsize=512)
def _layout(face: FaceParams, size: int) -> _Layout:
    s = float(size)
    cx, cy = (0.5 + face.head_x) * s, (HEAD_CENTER_Y + face.head_y) * s
    a, b = face.face_width / 2 * s, face.face_height / 2 * s
    skin = _colour(face.skin_rgb)
    colours = {
        "skin": skin, "shade": skin * 0.88, "lid": skin * 0.92, "hair": _colour(face.hair_rgb),
        "eye": _colour(face.eye_rgb), "lip": _colour(face.lip_rgb), "brow": _colour(face.eyebrow_rgb),
        "acc": _colour(face.accessory_rgb), "white": _colour(_WHITE_OF_EYE), "pupil": _colour(_PUPIL),
        "dark": _colour(_MOUTH_DARK), "teeth": _colour(_TEETH), "blush": _colour(_BLUSH),
        "crease": _colour(face.lip_rgb) * 0.55, "lash": _colour(face.eyebrow_rgb) * 0.6,
        "shirt": _colour(face.shirt_rgb),
    }
    static = _static_layer(face, size, cx, cy, a, b, colours)
    static.setflags(write=False)
    return _Layout(face=face, size=size, cx=cx, cy=cy, a=a, b=b, taper=0.35 * max(face.jaw, 0.0),
                   square=0.7 * max(-face.jaw, 0.0), colours=colours, static=static)


def _static_layer(face: FaceParams, size: int, cx: float, cy: float, a: float, b: float,
                  colours: dict) -> np.ndarray:
    """Background (two-tone or gradient), shoulders and neck: the part of a frame that never moves."""
    s = float(size)
    pix = _pixel_centres(size) / s  # [S] in [0, 1]
    u, v = pix[None, :], pix[:, None]  # x [1, S], y [S, 1]
    c1, c2 = _colour(face.background_rgb), _colour(face.background_rgb2)
    split, style = face.background_split, face.background_style
    ramp = 2.0 / s  # split edges get the same one-pixel anti-aliasing as the shapes
    # 1. background: t = weight of the second colour, [S, S]
    if style == "vertical_split":
        t = np.clip((u - split) / ramp + 0.5, 0, 1) + 0 * v
    elif style == "horizontal_split":
        t = np.clip((v - split) / ramp + 0.5, 0, 1) + 0 * u
    elif style == "diagonal_split":
        t = np.clip((u + v - 2 * split) / (np.sqrt(2) * ramp) + 0.5, 0, 1)
    elif style == "vertical_gradient":
        t = np.clip(v / (2 * split), 0, 1) + 0 * u
    elif style == "horizontal_gradient":
        t = np.clip(u / (2 * split), 0, 1) + 0 * v
    elif style == "radial_gradient":
        t = np.clip(np.sqrt((u - 0.5) ** 2 + (v - 0.45) ** 2) / (split * 0.9), 0, 1)
    else:
        raise SyntheticError(f"unknown background_style {style!r}; expected one of {BACKGROUND_STYLES}")
    image = (c1 + t[..., None] * (c2 - c1)).astype(np.float32)  # [S, S, 3]
    canvas = _Canvas(image)
    # 2. neck: from the head centre down to the shoulders, shaded skin
    neck_w = 0.3 * a
    shoulder_top = cy + b + 0.04 * s
    box = canvas.box(cx, (cy + s) / 2, neck_w, (s - cy) / 2)
    if box is not None:
        x, y = box[2], box[3] + ((cy + s) / 2 - cy)  # y relative to the head centre
        canvas.paint(box, np.maximum(np.abs(x) - neck_w, -y), colours["shade"])
    # 3. shoulders: a wide ellipse under the chin
    sh_cy, sh_a, sh_b = shoulder_top + 0.22 * s, 0.42 * s, 0.22 * s
    box = canvas.box(cx, sh_cy, sh_a, sh_b)
    if box is not None:
        canvas.paint(box, _ellipse(box[2], box[3], sh_a, sh_b), colours["shirt"])
    return image


# ---------------------------------------------------------------------------------------------
# Rendering: the moving head
# ---------------------------------------------------------------------------------------------


def _head_dist(lay: _Layout, x: np.ndarray, y: np.ndarray, grow: float = 1.0) -> np.ndarray:
    """Signed distance (px) to the face outline scaled by ``grow``: an ellipse whose lower half
    narrows toward the chin (``taper``, pointed) or fills toward the corners (``square``)."""
    a, b = lay.a * grow, lay.b * grow
    ny = y / b
    lower = np.clip(ny, 0.0, 1.0)  # 0 in the upper half
    a_eff = a * (1.0 - lay.taper * lower * lower)
    nx = x / a_eff
    squeeze = 1.0 - lay.square * (y > 0) * (1.0 - lower * lower)
    q = np.sqrt(nx * nx + ny * ny * squeeze)
    grad = np.sqrt((nx / a_eff) ** 2 + (ny / b) ** 2) / np.maximum(q, 1e-6)
    return (q - 1.0) / np.maximum(grad, 1.0 / max(a, b))


def _draw_back_hair(c: _Canvas, lay: _Layout, hx: float, hy: float) -> None:
    """Hair behind the head (long, bob, afro, ponytail), drawn before the face."""
    style, a, b, s = lay.face.hair_style, lay.a, lay.b, float(lay.size)
    hair = lay.colours["hair"]
    if style == "long":
        ha, hb, ccy = a * 1.25, b * 1.15, hy + 0.14 * s
        box = c.box(hx, ccy, ha, hb)
        if box is not None:
            d = np.maximum(_ellipse(box[2], box[3], ha, hb), box[3] - 0.6 * hb)
            c.paint(box, d, hair)
    elif style == "bob":
        ha, hb = a * 1.2, b * 1.12
        box = c.box(hx, hy, ha, hb)
        if box is not None:
            c.paint(box, np.maximum(_ellipse(box[2], box[3], ha, hb), box[3] - 0.45 * b), hair)
    elif style == "afro":
        ha, hb, ccy = a * 1.45, b * 1.12, hy - 0.1 * b
        box = c.box(hx, ccy, ha + 1, hb + 1)
        if box is not None:
            bumps = 0.8 * np.abs(np.sin(box[2] * (6.0 / a) + box[3] * (4.0 / b)))
            c.paint(box, _ellipse(box[2], box[3], ha, hb) - bumps, hair)
    elif style == "ponytail":
        side = 1.0 if lay.face.identity % 2 else -1.0
        px, py, pa, pb = hx + side * a * 0.95, hy + 0.2 * b, 0.09 * s, 0.2 * s
        box = c.box(px, py, pb, pb)
        if box is not None:
            x, y = _rotate(box[2], box[3], -side * 0.35)
            c.paint(box, _ellipse(x, y, pa, pb), hair)


def _draw_front_hair(c: _Canvas, lay: _Layout, hx: float, hy: float) -> None:
    """Hair over the top of the head: a cap cut by a hairline above the brows."""
    f, style, a, b, s = lay.face, lay.face.hair_style, lay.a, lay.b, float(lay.size)
    hair = lay.colours["hair"]
    if style == "bald":
        return
    brow_top = (f.eye_y - f.eye_height - f.eyebrow_raise) * s - f.eyebrow_thickness * s
    hairline = brow_top - 0.04 * s  # relative to the head centre, at the centre line
    side_drop = 0.55 * b if style in ("long", "bob") else 0.3 * b  # hairline at the temples
    grow = 1.12 if style in ("curly", "afro") else 1.06
    box = c.box(hx, hy - 0.4 * b, a * grow, b)  # rows -1.4 b .. +0.6 b around the head centre
    if box is None:
        return
    x, y = box[2], box[3] - 0.4 * b  # relative to the head centre
    line = hairline + (side_drop - hairline) * (x / a) ** 2
    if style == "side_part":
        line = line + 0.12 * b * x / a
    elif style == "bob":
        line = np.maximum(line, hairline + 0.04 * s)  # straight fringe
    cap = np.maximum(_head_dist(lay, x, y, grow), y - line)
    if style == "curly":
        cap = cap - 0.9 * np.abs(np.sin(x * (7.0 / a)))
    if style == "mohawk":
        c.paint(box, cap, hair, alpha=0.45)
        ridge = np.maximum(_ellipse(x, y + b * 0.95, 0.12 * a, 0.35 * b), y - line)
        c.paint(box, ridge, hair)
        return
    c.paint(box, cap, hair, alpha=0.55 if style == "buzz" else 1.0)
    if style == "bun":
        r = 0.085 * s
        box = c.box(hx, hy - b * grow - 0.3 * r, r, r)
        if box is not None:
            c.paint(box, _ellipse(box[2], box[3], r, r), hair)


def _draw_eyes(c: _Canvas, lay: _Layout, hx: float, hy: float, blink: float) -> None:
    """Both eyes at once (mirrored about the face centre line): white, iris, pupil, lids, lashes.
    The lids close from above and below toward EYE_CLOSE_POINT as ``blink`` goes 1 -> 0."""
    f, s, col = lay.face, float(lay.size), lay.colours
    ew, eh, sp = f.eye_width * s, f.eye_height * s, f.eye_spacing * s
    ey = hy + f.eye_y * s
    box = c.box(hx, ey, sp + ew, eh)
    if box is None:
        return
    x, y = np.abs(box[2]) - sp, box[3]  # offsets from the nearer eye centre
    shut = 1.0 - float(np.clip(blink, 0.0, 1.0))
    close_at = EYE_CLOSE_POINT * eh
    top = -eh + (eh + close_at) * shut  # upper lid edge
    bottom = eh - (eh - close_at) * shut  # lower lid edge
    eye = _ellipse(x, y, ew, eh)  # [h, w]
    open_part = np.maximum(eye, np.maximum(top - y, y - bottom))
    c.paint(box, eye, col["lid"])
    c.paint(box, open_part, col["white"])
    r = f.iris_radius * s
    iris = np.sqrt(x * x + y * y) - r
    c.paint(box, np.maximum(iris, open_part), col["eye"])
    c.paint(box, np.maximum(iris + 0.55 * r, open_part), col["pupil"])
    lash = np.maximum(eye - LASH_WIDTH_PX / 2, np.abs(y - top) - LASH_WIDTH_PX / 2)
    c.paint(box, lash, col["lash"])


def _draw_brows_nose_cheeks(c: _Canvas, lay: _Layout, hx: float, hy: float) -> None:
    f, s, col = lay.face, float(lay.size), lay.colours
    ew, sp = f.eye_width * s, f.eye_spacing * s
    # 1. eyebrows: thin rotated ellipses above the eyes, mirrored
    half_len, half_th = ew * 1.2, f.eyebrow_thickness * s / 2
    by = hy + (f.eye_y - f.eye_height - f.eyebrow_raise) * s
    box = c.box(hx, by, sp + half_len, half_len)
    if box is not None:
        x, y = _rotate(np.abs(box[2]) - sp, box[3], f.eyebrow_tilt)
        c.paint(box, _ellipse(x, y, half_len, half_th), col["brow"])
    # 2. nose: a soft shadow with a darker tip
    ns = f.nose_size * s
    box = c.box(hx, hy + f.nose_y * s, ns, ns)
    if box is not None:
        c.paint(box, _ellipse(box[2], box[3], 0.6 * ns, ns), col["shade"], alpha=0.7)
        c.paint(box, _ellipse(box[2], box[3] - 0.5 * ns, 0.55 * ns, 0.35 * ns), col["shade"] * 0.85)
    # 3. blush on the cheeks
    if f.blush > 0:
        ca, cyy = 0.07 * s, hy + (f.nose_y + 0.01) * s
        box = c.box(hx, cyy, sp + ca, ca)
        if box is not None:
            c.paint(box, _ellipse(np.abs(box[2]) - sp * 1.1, box[3], ca, 0.6 * ca), col["blush"],
                    alpha=f.blush)


def _draw_mouth(c: _Canvas, lay: _Layout, hx: float, hy: float, mouth: float) -> None:
    """Lips, closed-mouth crease, dark interior and upper teeth.

    Upper edge fixed at ``mouth_y - lip_thickness``; the jaw drops: an opening of
    ``h = mouth * MOUTH_OPEN_MAX * size`` px moves the lower lip down by h. The mouth narrows
    by up to MOUTH_NARROWING. Everything stays within the box ``|x - mx| <= mouth_width / 2``,
    ``mouth_y - lip <= y - cy <= mouth_y + MOUTH_OPEN_MAX + lip`` (+ one anti-aliasing pixel).
    """
    f, s, col = lay.face, float(lay.size), lay.colours
    m = float(np.clip(mouth, 0.0, 1.0))
    h = m * MOUTH_OPEN_MAX * s
    lip = f.lip_thickness * s
    w = f.mouth_width / 2 * s * (1.0 - MOUTH_NARROWING * m)
    my = hy + f.mouth_y * s + h / 2  # centre of the opening
    box = c.box(hx, my, f.mouth_width / 2 * s, h / 2 + lip)
    if box is None:
        return
    x, y = box[2], box[3]
    c.paint(box, _ellipse(x, y, w, h / 2 + lip), col["lip"])
    c.paint(box, _ellipse(x, y, w * 0.9, 0.4), col["crease"])
    if h > 0:
        inner = _ellipse(x, y, w * 0.82, h / 2)
        c.paint(box, inner, col["dark"])
        c.paint(box, np.maximum(inner, y + h / 2 - 0.3 * h), col["teeth"])


def _draw_accessory(c: _Canvas, lay: _Layout, hx: float, hy: float, stage: str) -> None:
    """Accessories: 'under' ones go below the mouth and eyes (beard, moustache), 'over' ones on top."""
    f, s, a, b = lay.face, float(lay.size), lay.a, lay.b
    acc, rgb = f.accessory, lay.colours["acc"]
    if stage == "under" and acc == "beard":
        box = c.box(hx, hy + 0.5 * b, a * 1.05, 0.55 * b)
        if box is not None:
            x, y = box[2], box[3] + 0.5 * b
            d = np.maximum(_head_dist(lay, x, y, 1.03), (f.mouth_y - 0.06) * s - y)
            c.paint(box, d, rgb)
    elif stage == "under" and acc == "moustache":
        mw, my = f.mouth_width * 0.55 * s, hy + (f.mouth_y - f.lip_thickness - 0.012) * s
        box = c.box(hx, my, mw, 0.03 * s)
        if box is not None:
            c.paint(box, _ellipse(box[2], box[3], mw, 0.022 * s), rgb)
    elif stage == "over" and acc == "glasses":
        r = max(f.eye_width, f.eye_height) * s * 1.35
        sp, ey = f.eye_spacing * s, hy + f.eye_y * s
        box = c.box(hx, ey, sp + r, r)
        if box is not None:
            x, y = np.abs(box[2]) - sp, box[3]
            circle = np.sqrt(x * x + y * y) - r
            c.paint(box, circle, rgb, alpha=0.15)  # tinted lens
            c.paint(box, np.abs(circle) - 0.45, rgb)  # frame
            bridge = np.maximum(np.abs(y + 0.2 * r) - 0.45, np.abs(box[2]) - (sp - r))
            c.paint(box, bridge, rgb)
    elif stage == "over" and acc == "hat":
        brim_y = hy + (f.eye_y - f.eye_height - f.eyebrow_raise - 0.07) * s
        box = c.box(hx, brim_y - 0.1 * s, a * 1.3, 0.14 * s)
        if box is not None:
            x, y = box[2], box[3] - 0.1 * s  # relative to the brim line
            crown = np.maximum(_ellipse(x, y, a * 0.95, 0.2 * s), y)
            brim = _ellipse(x, y, a * 1.3, 0.025 * s)
            c.paint(box, np.minimum(crown, brim), rgb)
    elif stage == "over" and acc == "headband":
        band_y = (f.eye_y - f.eye_height - f.eyebrow_raise - 0.08) * s
        box = c.box(hx, hy + band_y, a * 1.05, 0.03 * s)
        if box is not None:
            x, y = box[2], box[3] + band_y
            c.paint(box, np.maximum(_head_dist(lay, x, y, 1.03), np.abs(y - band_y) - 0.022 * s), rgb)
    elif stage == "over" and acc == "earrings":
        r, ey = 0.022 * s, hy + (f.eye_y + 0.1) * s
        box = c.box(hx, ey, a + r, r)
        if box is not None:
            x = np.abs(box[2]) - (a * 0.97)
            c.paint(box, np.sqrt(x * x + box[3] ** 2) - r, rgb)


def render_frame(face: FaceParams, mouth: float, dx: float, dy: float, blink: float,
                 size: int = DEFAULT_SIZE) -> np.ndarray:
    """One frame, uint8 ``[size, size, 3]``.

    ``mouth`` 0 closed .. 1 open; ``dx, dy`` head offset in pixels (sub-pixel offsets move every
    edge smoothly); ``blink`` 1 open .. 0 closed. Drawing order: cached static layer (background,
    neck, shoulders), back hair, ears, face, cheeks / brows / nose, beard or moustache, mouth,
    eyes, front hair, glasses / hat / headband / earrings.
    """
    if not isinstance(face, FaceParams):
        raise SyntheticError(f"face must be a FaceParams, got {type(face).__name__}")
    for name, v in (("mouth", mouth), ("dx", dx), ("dy", dy), ("blink", blink)):
        if not math.isfinite(float(v)):
            raise SyntheticError(f"{name} must be finite, got {v!r}")
    lay = _layout(face, _check_size(size))
    c = _Canvas(lay.static.copy())
    hx, hy = lay.cx + float(dx), lay.cy + float(dy)
    col, a, b, s = lay.colours, lay.a, lay.b, float(lay.size)
    # 1. back hair and ears
    _draw_back_hair(c, lay, hx, hy)
    ear_a, ear_b, ear_y = 0.035 * s, 0.06 * s, hy + (face.eye_y + 0.04) * s
    box = c.box(hx, ear_y, a + ear_a, ear_b)
    if box is not None:
        c.paint(box, _ellipse(np.abs(box[2]) - a * 0.97, box[3], ear_a, ear_b), col["shade"])
    # 2. the face
    box = c.box(hx, hy, a, b)
    if box is not None:
        c.paint(box, _head_dist(lay, box[2], box[3]), col["skin"])
    # 3. features
    _draw_brows_nose_cheeks(c, lay, hx, hy)
    _draw_accessory(c, lay, hx, hy, "under")
    _draw_mouth(c, lay, hx, hy, mouth)
    _draw_eyes(c, lay, hx, hy, blink)
    _draw_front_hair(c, lay, hx, hy)
    _draw_accessory(c, lay, hx, hy, "over")
    # 4. quantise
    return (np.clip(c.image, 0.0, 255.0) + 0.5).astype(np.uint8)


def render_clip(face: FaceParams, motion: Motion, size: int = DEFAULT_SIZE) -> np.ndarray:
    """All frames of ``motion``: uint8 ``[T, size, size, 3]``."""
    if not isinstance(motion, Motion):
        raise SyntheticError(f"motion must be a Motion, got {type(motion).__name__}")
    size = _check_size(size)
    frames = np.empty((motion.num_frames, size, size, 3), dtype=np.uint8)
    for t in range(motion.num_frames):
        frames[t] = render_frame(face, motion.mouth[t], motion.head_dx[t], motion.head_dy[t],
                                 motion.blink[t], size)
    return frames


def mouth_mask(face: FaceParams, motion: Motion, size: int = DEFAULT_SIZE, margin: float = 1.5) -> np.ndarray:
    """Where the mouth can be, per frame: float32 ``[T, size, size]``, 1 inside, 0 outside.

    The box is that of the fully open mouth (:func:`_draw_mouth`'s bound: ``|x - mx| <= mouth_width
    / 2``, ``mouth_y - lip <= y - cy <= mouth_y + MOUTH_OPEN_MAX + lip``), moved with the head's
    offset in each frame and grown by ``margin`` pixels (anti-aliasing reaches one pixel past an edge,
    plus half a pixel for the pixel-centre grid). It is ground truth for a loss that weights
    the mouth (a few percent of the pixels) above the rest of the frame.
    """
    if not isinstance(motion, Motion):
        raise SyntheticError(f"motion must be a Motion, got {type(motion).__name__}")
    lay = _layout(face, _check_size(size))
    s, pix = float(lay.size), _pixel_centres(lay.size)
    lip = face.lip_thickness * s
    half_w = face.mouth_width / 2 * s + margin
    top, bottom = face.mouth_y * s - lip - margin, (face.mouth_y + MOUTH_OPEN_MAX) * s + lip + margin
    x = pix[None, None, :] - (lay.cx + motion.head_dx.astype(np.float32)[:, None, None])   # [T, 1, S]
    y = pix[None, :, None] - (lay.cy + motion.head_dy.astype(np.float32)[:, None, None])   # [T, S, 1]
    inside = (np.abs(x) <= half_w) & (y >= top) & (y <= bottom)                           # [T, S, S]
    return inside.astype(np.float32)


def reference_image(face: FaceParams, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The neutral reference: mouth closed, eyes open, head centred. uint8 ``[size, size, 3]``."""
    return render_frame(face, 0.0, 0.0, 0.0, 1.0, size)


# ---------------------------------------------------------------------------------------------
# Samples and the dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class ClipSample:
    """One training clip with its ground truth.

    identity: the face. frames: uint8 ``[T, H, W, 3]``. pcm: float32 ``[T * 640]`` at 16 kHz,
    frame t <-> samples ``[t * 640, (t + 1) * 640)``. motion: per-frame ground truth (mouth
    opening, head offset, blink). reference: uint8 ``[H, W, 3]`` neutral image of the identity.
    mouth: float32 ``[T, H, W]`` mask of where the mouth can be (:func:`mouth_mask`).
    """

    identity: int
    frames: np.ndarray
    pcm: np.ndarray
    motion: Motion
    reference: np.ndarray
    mouth: np.ndarray


def sample_clip(identity: int, pcm: np.ndarray, num_frames: int, seed: int,
                size: int = DEFAULT_SIZE, face_seed: int = 0, frames: slice | None = None) -> ClipSample:
    """Render ``identity`` speaking the first ``num_frames * 640`` samples of ``pcm``.

    ``frames`` (a slice of the ``num_frames``) renders only those frames: the sample then holds
    those frames, their motion, audio and mouth masks, equal to the same slice of the whole clip's
    (the motion is made for the whole clip first; only the drawing is skipped).

    Raises:
        SyntheticError: ``pcm`` is not 1-D / finite or has fewer than ``num_frames * 640`` samples,
            or ``frames`` is not a slice with step 1 that selects at least one frame.
    """
    pcm, num_frames = _check_pcm(pcm), _check_int("num_frames", num_frames, 1)
    needed = num_frames * SAMPLES_PER_FRAME
    if pcm.shape[0] < needed:
        raise SyntheticError(f"pcm too short: {num_frames} frames need {needed} samples "
                             f"({SAMPLES_PER_FRAME} per frame), got {pcm.shape[0]}")
    face = face_params(identity, face_seed)
    pcm = np.ascontiguousarray(pcm[:needed], dtype=np.float32)
    motion = make_motion(pcm, num_frames, seed, size)
    if frames is not None:
        if not isinstance(frames, slice) or frames.step not in (None, 1):
            raise SyntheticError(f"frames must be a slice with step 1, got {frames!r}")
        start, stop, _ = frames.indices(num_frames)
        if stop <= start:
            raise SyntheticError(f"frames {frames!r} selects no frame of {num_frames}")
        motion = Motion(**{name: getattr(motion, name)[start:stop] for name in ("mouth", "head_dx", "head_dy", "blink")})
        pcm = pcm[start * SAMPLES_PER_FRAME:stop * SAMPLES_PER_FRAME]
    return ClipSample(identity=face.identity, frames=render_clip(face, motion, size), pcm=pcm,
                      motion=motion, reference=reference_image(face, size), mouth=mouth_mask(face, motion, size))


class SyntheticDataset:
    """A deterministic, map-style dataset of talking clips: ``dataset[i]`` depends only on
    ``(seed, i)`` and the constructor arguments.

    For item ``i`` a generator seeded with ``[seed, i]`` picks, in order:
      1. an identity from ``identities`` and a speech clip from ``speech``;
      2. a window of ``num_frames * 640`` samples at a random offset (a clip that is too short
         is looped with 0.2-0.6 s of silence between repeats);
      3. a loudness change of -6..+3 dB (clipped to [-1, 1]), so the mouth sees varied levels;
      4. with probability ``silence_prob``, a zeroed span of 0.4 s up to the whole window, so
         the model also learns closed mouths during pauses;
      5. the motion seed; then :func:`sample_clip` renders it.
    ``len(dataset)`` is the nominal epoch size ``epoch_size``; iteration yields items 0..len-1.
    """

    GAIN_DB = (-6.0, 3.0)
    LOOP_GAP_S = (0.2, 0.6)
    MIN_SILENCE_S = 0.4

    def __init__(self, speech: list[np.ndarray], identities: Sequence[int], num_frames: int,
                 seed: int, size: int = DEFAULT_SIZE, epoch_size: int = 10000,
                 silence_prob: float = 0.3, face_seed: int = 0) -> None:
        if not speech:
            raise SyntheticError("speech must hold at least one clip")
        self.speech = [_check_pcm(clip) for clip in speech]
        if any(clip.shape[0] == 0 for clip in self.speech):
            raise SyntheticError("speech clips must not be empty")
        self.identities = [_check_int("identity", i) for i in identities]
        if not self.identities:
            raise SyntheticError("identities must not be empty")
        if not 0.0 <= float(silence_prob) <= 1.0:
            raise SyntheticError(f"silence_prob must be in [0, 1], got {silence_prob!r}")
        self.num_frames, self.seed = _check_int("num_frames", num_frames, 1), _check_int("seed", seed)
        self.size, self.epoch_size = _check_size(size), _check_int("epoch_size", epoch_size, 1)
        self.silence_prob, self.face_seed = float(silence_prob), _check_int("face_seed", face_seed)

    def __len__(self) -> int:
        return self.epoch_size

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def window(self, i: int) -> tuple[int, np.ndarray, int]:
        """Steps 1-5 for item ``i``: ``(identity, pcm [num_frames * 640], motion_seed)``."""
        i = _check_int("index", i)
        rng = np.random.default_rng([self.seed, i])
        needed = self.num_frames * SAMPLES_PER_FRAME
        # 1. identity and speech
        identity = self.identities[rng.integers(len(self.identities))]
        clip = self.speech[rng.integers(len(self.speech))]
        # 2. loop short clips, then a random window
        if clip.shape[0] < needed:
            pieces, total = [], 0
            while total < needed:
                gap = np.zeros(int(rng.uniform(*self.LOOP_GAP_S) * SAMPLE_RATE), dtype=np.float32)
                pieces += [clip, gap]
                total += clip.shape[0] + gap.shape[0]
            clip = np.concatenate(pieces)
        start = int(rng.integers(0, clip.shape[0] - needed + 1))
        pcm = clip[start:start + needed].astype(np.float32)  # copy
        # 3. loudness
        pcm = np.clip(pcm * np.float32(10.0 ** (rng.uniform(*self.GAIN_DB) / 20.0)), -1.0, 1.0)
        # 4. a pause
        if rng.uniform() < self.silence_prob:
            span = int(rng.integers(min(needed, int(self.MIN_SILENCE_S * SAMPLE_RATE)), needed + 1))
            at = int(rng.integers(0, needed - span + 1))
            pcm[at:at + span] = 0.0
        # 5. motion seed
        return identity, pcm, int(rng.integers(2 ** 31))

    def __getitem__(self, i: int) -> ClipSample:
        return self.get(i)

    def get(self, i: int, frames: slice | None = None) -> ClipSample:
        """Item ``i``; with ``frames``, only that slice of it is rendered (equal to ``self[i]``'s slice)."""
        if isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i < 0:
            i += len(self)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < len(self):
            raise IndexError(f"index {i!r} out of range for a dataset of {len(self)} items")
        identity, pcm, motion_seed = self.window(int(i))
        return sample_clip(identity, pcm, self.num_frames, motion_seed, self.size, self.face_seed, frames)
