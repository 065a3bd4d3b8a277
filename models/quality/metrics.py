"""Quality metrics of an avatar video: pure functions on numpy arrays.

Every function here takes per-frame series (or frames) that the caller already has and returns
numbers; nothing here runs a network. :mod:`models.quality.report` feeds them the outputs of the
probes (:mod:`models.quality.probes`) and the audio envelope.

Conventions:

- A *series* is a float array ``[T]`` with one value per video frame at ``fps`` frames per second;
  frame ``t`` covers the time ``[t / fps, (t + 1) / fps)``.
- Time in summaries is in seconds; slopes are **per minute** (a drift of ``-0.01`` per minute is
  ``-0.6`` over an hour).
- A value that is undefined (the variance ratio of a still ground truth, the slope of one frame) is
  ``None``, never NaN, so that reports are valid JSON.
- Bad input (wrong shape, NaN, mismatched lengths) raises :class:`MetricError` naming the problem.

Metrics:

1. **Lip sync** (:func:`sync`): Pearson correlation of the predicted mouth opening with the audio
   envelope at every offset in ``[-max_offset, max_offset]`` frames; the best offset, the correlation
   there, and SyncNet's confidence (best minus median over offsets).
2. **Series summaries** (:func:`summarize`, :func:`identity`): mean, first / last window means, the
   mean in the window ending at given times ("at 1 minute", "at 1 hour"), the least-squares drift
   slope per minute, and the per-window series (for plots).
3. **Motion dynamics** (:func:`motion`): variance of the predicted mouth opening and head position
   relative to the ground truth's, and the ratio of mean frame-to-frame mouth speeds.
4. **Frame quality** (:func:`sharpness`, :func:`colour_drift`): variance of the Laplacian of the
   gray frame relative to the reference image's, and the mean absolute difference of per-channel mean
   colours against the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The probe's per-frame outputs, in column order: mouth opening (0 closed .. 1 open), head offset
#: in pixels (x right, y down) and eye openness (1 open, 0 closed).
MOTION_COLUMNS = ("mouth", "head_dx", "head_dy", "blink")
MOUTH, HEAD_DX, HEAD_DY, BLINK = range(len(MOTION_COLUMNS))

#: ITU-R BT.601 luma weights (R, G, B) for the gray image the sharpness proxy uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

#: The fewest frames a Pearson correlation is computed over (two points always correlate +-1).
MIN_SYNC_FRAMES = 3

SECONDS_PER_MINUTE = 60.0


class MetricError(ValueError):
    """A metric got input it cannot use (wrong shape, NaN / inf, mismatched lengths, too short)."""


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------


def _series(x: Any, name: str, ndim: int = 1) -> np.ndarray:
    """``x`` as a finite float64 array of ``ndim`` dimensions, or a :class:`MetricError`."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise MetricError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise MetricError(f"{name} contains NaN or inf")
    return arr


def _frames(x: Any, name: str) -> np.ndarray:
    """uint8 RGB frames ``[N, H, W, 3]`` (a single ``[H, W, 3]`` image is promoted to N = 1)."""
    arr = np.asarray(x)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise MetricError(f"{name} must be uint8 RGB [N, H, W, 3], got {arr.dtype} {arr.shape}")
    if arr.shape[1] < 3 or arr.shape[2] < 3:
        raise MetricError(f"{name} must be at least 3x3 pixels, got {arr.shape[1]}x{arr.shape[2]}")
    return arr


def _check_fps(fps: float) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise MetricError(f"fps must be a positive number, got {fps!r}")
    return float(fps)


def _opt(x: float | None) -> float | None:
    return None if x is None else float(x)


# ---------------------------------------------------------------------------------------------
# 1. lip sync
# ---------------------------------------------------------------------------------------------


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equal-length series; 0.0 when either is constant (no co-variation)."""
    a = _series(a, "a")
    b = _series(b, "b")
    if a.shape != b.shape:
        raise MetricError(f"series lengths differ: {a.shape[0]} vs {b.shape[0]}")
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    # relative threshold: a series whose spread is rounding noise counts as constant
    scale = max(float(np.abs(a).max(initial=0.0)), 1e-300) * max(float(np.abs(b).max(initial=0.0)), 1e-300)
    if denom <= 1e-12 * scale * a.shape[0]:
        return 0.0
    return float(np.clip(da @ db / denom, -1.0, 1.0))


def shifted_pair(video: np.ndarray, audio: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The overlapping parts of ``video[t]`` and ``audio[t - offset]``.

    A positive ``offset`` means the video **lags** the audio: what is heard at frame ``t`` is seen
    at frame ``t + offset``.
    """
    n = video.shape[0]
    if offset >= 0:
        return video[offset:], audio[:n - offset]
    return video[:n + offset], audio[-offset:]


@dataclass(frozen=True)
class SyncResult:
    """Lip sync of a mouth-opening series against the audio envelope (SyncNet-style).

    Attributes:
        offset_frames: the offset with the highest correlation; positive = the video lags the audio
            (the mouth moves ``offset_frames`` frames after the sound).
        correlation: Pearson correlation at that offset, in [-1, 1].
        confidence: ``correlation - median(curve)``: how much the best offset stands out (a video
            whose mouth ignores the audio has a flat curve and a confidence near 0).
        offsets: the offsets tried, ``-K .. K`` (``K = min(max_offset, (T - 1) // 2)``).
        curve: the correlation at each offset.
    """

    offset_frames: int
    correlation: float
    confidence: float
    offsets: tuple[int, ...]
    curve: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"offset_frames": self.offset_frames, "correlation": self.correlation,
                "confidence": self.confidence, "offsets": list(self.offsets), "curve": list(self.curve)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyncResult:
        return cls(int(d["offset_frames"]), float(d["correlation"]), float(d["confidence"]),
                   tuple(int(o) for o in d["offsets"]), tuple(float(c) for c in d["curve"]))


def sync(mouth_pred: np.ndarray, envelope: np.ndarray, max_offset: int = 15) -> SyncResult:
    """Correlation of ``mouth_pred [T]`` with ``envelope [T]`` over offsets, SyncNet-style.

    1. For each offset ``k`` in ``-K .. K`` (``K = min(max_offset, (T - 1) // 2)``, so every
       overlap holds at least half the frames), the Pearson correlation of ``mouth_pred[t]`` with
       ``envelope[t - k]`` over the frames where both exist (:func:`shifted_pair`).
    2. The best offset is the one with the highest correlation (ties: the smallest ``|k|``, then
       the negative one).
    3. Confidence = best correlation - median correlation over all offsets.
    """
    pred = _series(mouth_pred, "mouth_pred")
    env = _series(envelope, "envelope")
    if pred.shape != env.shape:
        raise MetricError(f"mouth_pred and envelope lengths differ: {pred.shape[0]} vs {env.shape[0]}")
    if isinstance(max_offset, bool) or not isinstance(max_offset, (int, np.integer)) or max_offset < 0:
        raise MetricError(f"max_offset must be a non-negative integer, got {max_offset!r}")
    n = pred.shape[0]
    if n < MIN_SYNC_FRAMES:
        raise MetricError(f"sync needs at least {MIN_SYNC_FRAMES} frames, got {n}")
    k_max = min(int(max_offset), (n - 1) // 2)
    # 1. the correlation curve
    offsets = tuple(range(-k_max, k_max + 1))
    curve = tuple(pearson(*shifted_pair(pred, env, k)) for k in offsets)
    # 2. best offset (ties -> smallest |k|)
    best = max(curve)
    best_k = min((k for k, c in zip(offsets, curve) if c == best), key=lambda k: (abs(k), k))
    # 3. confidence
    return SyncResult(offset_frames=best_k, correlation=best, confidence=best - float(np.median(curve)),
                      offsets=offsets, curve=curve)


# ---------------------------------------------------------------------------------------------
# 2. windows, trends and series summaries
# ---------------------------------------------------------------------------------------------


def window_bounds(num_frames: int, fps: float, window_s: float) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)`` of consecutive windows of ``N = round(window_s * fps)`` frames.

    Every full window is kept. The trailing partial window is kept when it holds at least half a
    window, or when there is no full window at all (a clip shorter than one window is one window);
    otherwise it is dropped.
    """
    fps = _check_fps(fps)
    if not isinstance(window_s, (int, float)) or not math.isfinite(window_s) or window_s <= 0:
        raise MetricError(f"window_s must be a positive number, got {window_s!r}")
    if num_frames < 0:
        raise MetricError(f"num_frames must be >= 0, got {num_frames}")
    size = max(1, round(window_s * fps))
    full, rest = divmod(int(num_frames), size)
    bounds = [(i * size, (i + 1) * size) for i in range(full)]
    if rest and (2 * rest >= size or full == 0):
        bounds.append((full * size, full * size + rest))
    return bounds


@dataclass(frozen=True)
class WindowSeries:
    """One value per time window (for plots and "value at time t" questions).

    Attributes:
        start_s, end_s: each window's time span in seconds.
        values: the window's value (``None`` where it is undefined).
    """

    start_s: tuple[float, ...]
    end_s: tuple[float, ...]
    values: tuple[float | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"start_s": list(self.start_s), "end_s": list(self.end_s), "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowSeries:
        return cls(tuple(float(s) for s in d["start_s"]), tuple(float(e) for e in d["end_s"]),
                   tuple(_opt(v) for v in d["values"]))


def windowed(series: np.ndarray, fps: float, window_s: float,
             fn: Callable[[np.ndarray], float | None] = lambda w: float(np.mean(w))) -> WindowSeries:
    """``fn`` applied to each window of ``series [T]`` (or ``[T, ...]``), windows per :func:`window_bounds`."""
    arr = np.asarray(series)
    if arr.ndim < 1:
        raise MetricError(f"series must have at least one dimension, got shape {arr.shape}")
    fps = _check_fps(fps)
    bounds = window_bounds(arr.shape[0], fps, window_s)
    return WindowSeries(start_s=tuple(s / fps for s, _ in bounds), end_s=tuple(e / fps for _, e in bounds),
                        values=tuple(_opt(fn(arr[s:e])) for s, e in bounds))


def linear_trend(series: np.ndarray, fps: float) -> tuple[float | None, float | None]:
    """Least-squares line ``series[t] ~ intercept + slope * minutes(t)``, ``minutes(t) = t / fps / 60``.

    Returns ``(slope per minute, intercept)``; ``(None, None)`` for fewer than two frames.
    """
    y = _series(series, "series")
    fps = _check_fps(fps)
    if y.shape[0] < 2:
        return None, None
    t = np.arange(y.shape[0], dtype=np.float64) / fps / SECONDS_PER_MINUTE
    tc = t - t.mean()
    slope = float(tc @ (y - y.mean()) / (tc @ tc))
    return slope, float(y.mean() - slope * t.mean())


@dataclass(frozen=True)
class SeriesSummary:
    """A per-frame series summarised over time.

    Attributes:
        mean: the mean over all frames.
        first_window, last_window: the means over the first and last windows of :attr:`windows`.
        at: ``{"60": mean over the window_s seconds before 60 s, ...}`` for each requested time; a time
            past the end of the video maps to ``None``.
        slope_per_minute: least-squares drift of the series per minute of video (``None`` for < 2 frames).
        intercept: the fitted line's value at t = 0.
        windows: the per-window means.
    """

    mean: float
    first_window: float
    last_window: float
    at: dict[str, float | None]
    slope_per_minute: float | None
    intercept: float | None
    windows: WindowSeries

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "first_window": self.first_window, "last_window": self.last_window,
                "at": dict(self.at), "slope_per_minute": self.slope_per_minute, "intercept": self.intercept,
                "windows": self.windows.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeriesSummary:
        return cls(float(d["mean"]), float(d["first_window"]), float(d["last_window"]),
                   {str(k): _opt(v) for k, v in d["at"].items()}, _opt(d["slope_per_minute"]),
                   _opt(d["intercept"]), WindowSeries.from_dict(d["windows"]))


#: The identity metric's result has exactly the shape of any summarised series.
IdentityResult = SeriesSummary


def _time_key(seconds: float) -> str:
    return f"{seconds:g}"


def summarize(series: np.ndarray, fps: float, window_s: float = 10.0,
              at_seconds: Sequence[float] = (60.0, 3600.0)) -> SeriesSummary:
    """Summarise a per-frame series ``[T]`` (see :class:`SeriesSummary`).

    The value "at" time ``t`` is the mean over frames ``[round((t - window_s) * fps), round(t * fps))``
    (clipped at 0): the ``window_s`` seconds of video before ``t``. It is ``None`` when the video is
    shorter than ``t``.
    """
    y = _series(series, "series")
    fps = _check_fps(fps)
    if y.shape[0] == 0:
        raise MetricError("series is empty")
    windows = windowed(y, fps, window_s)
    at: dict[str, float | None] = {}
    for t in at_seconds:
        end = round(t * fps)
        start = max(0, round((t - window_s) * fps))
        at[_time_key(t)] = float(y[start:end].mean()) if 0 < end <= y.shape[0] and start < end else None
    slope, intercept = linear_trend(y, fps)
    return SeriesSummary(mean=float(y.mean()), first_window=float(windows.values[0]),
                         last_window=float(windows.values[-1]), at=at, slope_per_minute=slope,
                         intercept=intercept, windows=windows)


def identity(similarity: np.ndarray, fps: float, window_s: float = 10.0,
             at_seconds: Sequence[float] = (60.0, 3600.0)) -> IdentityResult:
    """Identity preservation from the per-frame cosine similarity ``[T]`` (in [-1, 1]) of each frame's
    identity embedding to the reference image's: its mean, the first-window mean, the value at the
    given times and the drift slope per minute (negative = the face drifts away from the reference)."""
    sim = _series(similarity, "similarity")
    if sim.size and (sim.min() < -1.0 - 1e-6 or sim.max() > 1.0 + 1e-6):
        raise MetricError(f"similarity must lie in [-1, 1], got [{sim.min():.4g}, {sim.max():.4g}]")
    return summarize(sim, fps, window_s, at_seconds)


# ---------------------------------------------------------------------------------------------
# 3. motion dynamics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MotionResult:
    """How much the video moves compared with the ground truth for the same audio.

    Attributes:
        mouth_var_ratio: ``var(predicted mouth) / var(ground-truth mouth)``; 1 = as lively as the
            ground truth, ~0 = a frozen mouth. ``None`` when the ground truth does not move.
        head_var_ratio: ``(var(dx) + var(dy))`` of the predicted head position over the same of the
            ground truth (total positional variance).
        mouth_speed_ratio: ``mean |mouth[t+1] - mouth[t]|`` predicted over ground truth: catches a
            mouth that has the right range but moves too slowly or jitters.
        pred_mouth_var, gt_mouth_var, pred_head_var, gt_head_var: the variances themselves.
    """

    mouth_var_ratio: float | None
    head_var_ratio: float | None
    mouth_speed_ratio: float | None
    pred_mouth_var: float
    gt_mouth_var: float
    pred_head_var: float
    gt_head_var: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MotionResult:
        return cls(*(_opt(d[f]) for f in ("mouth_var_ratio", "head_var_ratio", "mouth_speed_ratio")),
                   *(float(d[f]) for f in ("pred_mouth_var", "gt_mouth_var", "pred_head_var", "gt_head_var")))


def ratio(num: float, den: float) -> float | None:
    """``num / den``, or ``None`` when ``den`` is (numerically) zero."""
    return None if den <= 1e-12 else float(num / den)


def _mean_speed(x: np.ndarray) -> float:
    return float(np.abs(np.diff(x)).mean()) if x.shape[0] > 1 else 0.0


def motion(pred: np.ndarray, gt_mouth: np.ndarray, gt_head: np.ndarray) -> MotionResult:
    """Motion dynamics of a video relative to ground truth.

    Args:
        pred: ``[T, 4]`` probe outputs per frame, columns :data:`MOTION_COLUMNS`.
        gt_mouth: ``[T']`` ground-truth mouth opening for the same audio (e.g. the synthetic
            renderer's ``Motion.mouth``); ``T'`` may differ from ``T`` (statistics are compared).
        gt_head: ``[T'', 2]`` ground-truth head offsets (dx, dy) in pixels: a sample of the sway the
            renderer produces.
    """
    p = _series(pred, "pred", ndim=2)
    if p.shape[1] != len(MOTION_COLUMNS) or p.shape[0] < 2:
        raise MetricError(f"pred must be [T >= 2, {len(MOTION_COLUMNS)}], got {p.shape}")
    gm = _series(gt_mouth, "gt_mouth")
    gh = _series(gt_head, "gt_head", ndim=2)
    if gh.shape[1] != 2 or gm.shape[0] < 2 or gh.shape[0] < 2:
        raise MetricError(f"gt_mouth must be [T >= 2] and gt_head [T >= 2, 2], got {gm.shape} and {gh.shape}")
    pm, ph = p[:, MOUTH], p[:, [HEAD_DX, HEAD_DY]]
    pmv, gmv = float(pm.var()), float(gm.var())
    phv, ghv = float(ph.var(axis=0).sum()), float(gh.var(axis=0).sum())
    return MotionResult(mouth_var_ratio=ratio(pmv, gmv), head_var_ratio=ratio(phv, ghv),
                        mouth_speed_ratio=ratio(_mean_speed(pm), _mean_speed(gm)),
                        pred_mouth_var=pmv, gt_mouth_var=gmv, pred_head_var=phv, gt_head_var=ghv)


# ---------------------------------------------------------------------------------------------
# 4. frame quality
# ---------------------------------------------------------------------------------------------


def gray(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[N, H, W, 3]`` -> float64 luma ``[N, H, W]`` in 0..255 (BT.601 weights)."""
    f = _frames(frames, "frames")
    return f.astype(np.float64) @ np.asarray(LUMA_WEIGHTS)


def laplacian_variance(frames: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian of each gray frame: ``[N, H, W, 3]`` -> ``[N]``.

    ``L[y, x] = g[y-1, x] + g[y+1, x] + g[y, x-1] + g[y, x+1] - 4 g[y, x]`` over interior pixels.
    High for crisp edges and texture, low for blurred or flat frames (a no-reference sharpness proxy).
    """
    g = gray(frames)                                                   # [N, H, W]
    lap = (g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:]
           - 4.0 * g[:, 1:-1, 1:-1])                                   # [N, H - 2, W - 2]
    return lap.reshape(lap.shape[0], -1).var(axis=1)


def sharpness(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Sharpness of each frame relative to the reference image: ``lapvar(frame) / lapvar(reference)``.

    ``frames [N, H, W, 3]`` and ``reference [H, W, 3]`` must have the same size (resize first).
    1 = as sharp as the reference; below 1 = blurrier; well above 1 = noise or artefacts.
    """
    f = _frames(frames, "frames")
    r = _frames(reference, "reference")
    if f.shape[1:] != r.shape[1:]:
        raise MetricError(f"frames {f.shape[1:3]} and reference {r.shape[1:3]} differ in size")
    ref = float(laplacian_variance(r)[0])
    if ref <= 1e-12:
        raise MetricError("the reference image is flat (zero Laplacian variance): no sharpness baseline")
    return laplacian_variance(f) / ref


def channel_means(frames: np.ndarray) -> np.ndarray:
    """Mean R, G, B of each frame: uint8 ``[N, H, W, 3]`` -> float64 ``[N, 3]`` in 0..255."""
    f = _frames(frames, "frames")
    return f.reshape(f.shape[0], -1, 3).mean(axis=1, dtype=np.float64)


def colour_drift(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Colour drift of each frame against the reference image, in 0..255 units: ``[N]``.

    ``mean over c in (R, G, B) of |mean_c(frame) - mean_c(reference)|``. Sizes may differ (only
    means are compared). A stable video stays near its small talking-motion baseline; a tint or a
    fading exposure grows it.
    """
    return np.abs(channel_means(frames) - channel_means(reference)).mean(axis=1)


@dataclass(frozen=True)
class WindowSync:
    """Lip sync measured separately in each time window (does sync hold over the hour?)."""

    start_s: tuple[float, ...]
    end_s: tuple[float, ...]
    correlation: tuple[float, ...]
    offset_frames: tuple[int, ...]
    confidence: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowSync:
        return cls(tuple(map(float, d["start_s"])), tuple(map(float, d["end_s"])),
                   tuple(map(float, d["correlation"])), tuple(map(int, d["offset_frames"])),
                   tuple(map(float, d["confidence"])))


def windowed_sync(mouth_pred: np.ndarray, envelope: np.ndarray, fps: float, window_s: float = 10.0,
                  max_offset: int = 15) -> WindowSync:
    """:func:`sync` in each window of :func:`window_bounds` (windows under 3 frames are skipped)."""
    pred = _series(mouth_pred, "mouth_pred")
    env = _series(envelope, "envelope")
    if pred.shape != env.shape:
        raise MetricError(f"mouth_pred and envelope lengths differ: {pred.shape[0]} vs {env.shape[0]}")
    fps = _check_fps(fps)
    rows = [(s, e, sync(pred[s:e], env[s:e], max_offset)) for s, e in window_bounds(pred.shape[0], fps, window_s)
            if e - s >= MIN_SYNC_FRAMES]
    return WindowSync(start_s=tuple(s / fps for s, _, _ in rows), end_s=tuple(e / fps for _, e, _ in rows),
                      correlation=tuple(r.correlation for *_, r in rows),
                      offset_frames=tuple(r.offset_frames for *_, r in rows),
                      confidence=tuple(r.confidence for *_, r in rows))


__all__ = [
    "BLINK", "HEAD_DX", "HEAD_DY", "LUMA_WEIGHTS", "MIN_SYNC_FRAMES", "MOTION_COLUMNS", "MOUTH",
    "IdentityResult", "MetricError", "MotionResult", "SeriesSummary", "SyncResult", "WindowSeries", "WindowSync",
    "channel_means", "colour_drift", "gray", "identity", "laplacian_variance", "linear_trend", "motion",
    "pearson", "ratio", "sharpness", "shifted_pair", "summarize", "sync", "window_bounds", "windowed", "windowed_sync",
]
