"""Evaluate a video: frames + audio + reference image -> a :class:`QualityReport` (JSON + PNG plots).

Streaming, so an hour of video (90,000 frames) runs in bounded memory::

    ev = Evaluator(probes, reference, fps=25)
    for frames, pcm in chunks:          # uint8 [n, H, W, 3] and the matching 16 kHz samples
        ev.add_frames(frames, pcm)
    report = ev.finish()
    write_report(report, "out/eval")    # report.json, series.npz, *.png

Per frame, the evaluator keeps only a handful of numbers (probe outputs, identity similarity,
sharpness, colour drift, the audio envelope); frames and audio are dropped once used. Frames of any
size are brought to the probe size first (:func:`models.quality.probes.to_probe_size`).

What each number means:

- ``sync``: :func:`models.quality.metrics.sync` of the probe's mouth opening against
  :func:`models.mouth.mouth_envelope` of the audio (the envelope the synthetic mouths
  follow), over the whole video; ``sync_windows``: the same per window.
- ``identity``: cosine similarity of each frame's identity embedding to the reference image's,
  summarised (mean, first window, at 1 minute / 1 hour, drift slope per minute).
- ``motion``: mouth and head variance relative to the ground truth. The ground truth is the
  caller's ``gt_motion`` when given (a rendered synthetic clip), else the synthetic renderer's
  motion for the same audio: the mouth is the audio envelope itself (``make_motion`` uses it
  exactly), the head is a sample of the renderer's sway, ``make_motion`` over the first
  ``gt_head_seconds`` of the audio with ``gt_head_seeds`` seeds (the sway amplitude is random per
  seed, so a single seed would make the ratio a lottery).
- ``sharpness``: variance of the Laplacian relative to the reference's; ``colour_drift``: mean
  absolute difference of per-channel means against the reference (0..255).
- ``series``: per-window mouth variance ratio and head variance, for the motion-over-time plot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.mouth import SAMPLE_RATE, mouth_envelope
from models.quality import metrics as M
from models.quality.probes import Probes

REPORT_FORMAT = "liveavatar-quality/1"
REPORT_FILE = "report.json"
SERIES_FILE = "series.npz"
#: Frames per probe pass when :func:`evaluate` is given a whole video at once.
CHUNK_FRAMES = 1024
#: The mouth plot shows this many seconds from the start (a whole hour would be a solid block).
MOUTH_PLOT_SECONDS = 20.0
#: Videos longer than this are plotted in minutes instead of seconds.
PLOT_MINUTES_AFTER_S = 600.0


class EvaluationError(ValueError):
    """The evaluator got unusable input (wrong frame shape, no audio, too few frames, used after finish)."""


@dataclass
class PerFrame:
    """Per-frame series of one evaluation (saved to ``series.npz``, not to the JSON)."""

    motion: np.ndarray          # [T, 4] probe outputs, columns metrics.MOTION_COLUMNS
    envelope: np.ndarray        # [T] audio envelope
    identity: np.ndarray        # [T] cosine similarity to the reference
    sharpness: np.ndarray       # [T] Laplacian variance / reference's
    colour_drift: np.ndarray    # [T] 0..255


@dataclass
class QualityReport:
    """Every number of one evaluation; :meth:`to_json` / :meth:`from_json` round-trip it (less
    :attr:`per_frame`, which :func:`write_report` saves separately)."""

    frames: int
    fps: float
    window_s: float
    max_offset: int
    sync: M.SyncResult
    sync_windows: M.WindowSync
    identity: M.SeriesSummary
    motion: M.MotionResult
    sharpness: M.SeriesSummary
    colour_drift: M.SeriesSummary
    series: dict[str, M.WindowSeries]
    gt_source: str                       # "given" or "audio" (see the module docstring)
    per_frame: PerFrame | None = None

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "frames": self.frames, "fps": self.fps, "seconds": self.seconds,
                "window_s": self.window_s, "max_offset": self.max_offset, "gt_source": self.gt_source,
                "sync": self.sync.to_dict(), "sync_windows": self.sync_windows.to_dict(),
                "identity": self.identity.to_dict(), "motion": self.motion.to_dict(),
                "sharpness": self.sharpness.to_dict(), "colour_drift": self.colour_drift.to_dict(),
                "series": {k: v.to_dict() for k, v in self.series.items()}}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualityReport:
        if d.get("format") != REPORT_FORMAT:
            raise EvaluationError(f"not a {REPORT_FORMAT} report (format {d.get('format')!r})")
        return cls(frames=int(d["frames"]), fps=float(d["fps"]), window_s=float(d["window_s"]),
                   max_offset=int(d["max_offset"]), sync=M.SyncResult.from_dict(d["sync"]),
                   sync_windows=M.WindowSync.from_dict(d["sync_windows"]),
                   identity=M.SeriesSummary.from_dict(d["identity"]), motion=M.MotionResult.from_dict(d["motion"]),
                   sharpness=M.SeriesSummary.from_dict(d["sharpness"]),
                   colour_drift=M.SeriesSummary.from_dict(d["colour_drift"]),
                   series={k: M.WindowSeries.from_dict(v) for k, v in d["series"].items()},
                   gt_source=str(d["gt_source"]))

    @classmethod
    def from_json(cls, text: str) -> QualityReport:
        return cls.from_dict(json.loads(text))

    def summary_line(self) -> str:
        """One line for a terminal."""
        def f(x: float | None, spec: str = ".3f") -> str:
            return "n/a" if x is None else format(x, spec)

        m, i = self.motion, self.identity
        return (f"sync corr {f(self.sync.correlation)} at offset {self.sync.offset_frames:+d} frames "
                f"(conf {f(self.sync.confidence)}) | identity {f(i.mean)} (first {f(i.first_window)}, "
                f"drift {f(i.slope_per_minute, '+.4f')}/min) | motion var mouth {f(m.mouth_var_ratio, '.2f')} "
                f"head {f(m.head_var_ratio, '.2f')} | sharpness {f(self.sharpness.mean, '.2f')} | "
                f"colour drift {f(self.colour_drift.mean, '.1f')} | {self.frames} frames, {self.seconds:.1f} s")


class _Envelope:
    """Streaming :func:`~models.mouth.mouth_envelope`, equal to computing it on the
    whole audio with ``num_frames`` = the video's frame count.

    The envelope smooths over a frame's neighbours, so frame ``t`` is final once frame ``t + 1``
    has both its audio and its video frame (the video's last frame takes the edge value instead);
    the buffer keeps audio from frame ``done - 1`` on (the left neighbour of the next frame).
    """

    def __init__(self, fps: int, sample_rate: int):
        self.fps, self.sample_rate = fps, sample_rate
        self.spf = sample_rate // fps
        self.buffer = np.zeros(0, dtype=np.float32)
        self.buffer_frame = 0                      # frame index of buffer[0]
        self.done = 0                              # frames whose envelope is final
        self.samples = 0                           # samples pushed so far
        self.values: list[np.ndarray] = []

    def push(self, pcm: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, pcm])
        self.samples += pcm.shape[0]

    def _compute(self, upto: int, end: bool) -> None:
        """Finalise frames ``done .. upto - 1``; ``end``: ``upto`` is the video's last frame + 1."""
        if upto <= self.done:
            return
        last = upto if end else upto + 1           # frames fed: the right neighbour too, unless at the end
        local = mouth_envelope(self.buffer, last - self.buffer_frame, self.fps, self.sample_rate)
        self.values.append(local[self.done - self.buffer_frame:upto - self.buffer_frame])
        self.done = upto
        keep = max(0, self.done - 1)
        self.buffer = self.buffer[(keep - self.buffer_frame) * self.spf:]
        self.buffer_frame = keep

    def update(self, video_frames: int) -> None:
        """Finalise every frame whose right neighbour has audio and a video frame."""
        audio_frames = self.samples // self.spf
        self._compute(min(audio_frames, video_frames) - 1, end=False)

    def finish(self, video_frames: int) -> np.ndarray:
        """All ``video_frames`` values (audio past the end is ignored, missing audio is silence)."""
        self._compute(video_frames, end=True)
        return np.concatenate(self.values).astype(np.float64) if self.values else np.zeros(0)


class Evaluator:
    """Streaming evaluation of one video against its reference image and audio.

    Args:
        probes: trained :class:`~models.quality.probes.Probes`.
        reference: uint8 ``[H, W, 3]`` reference image (any size).
        fps: video frame rate; 16 kHz audio must split into whole samples per frame.
        window_s: window length of the per-window series.
        max_offset: largest lip-sync offset searched, in frames.
        at_seconds: times at which identity is reported (the window before each).
        gt_motion: the ground-truth motion (an object with ``mouth``, ``head_dx``, ``head_dy``
            arrays, e.g. :class:`~models.training.synthetic.Motion`); ``None``: from the audio.
        gt_head_seeds, gt_head_seconds: the sway sample used as head ground truth without ``gt_motion``.
    """

    def __init__(self, probes: Probes, reference: np.ndarray, fps: int = 25, window_s: float = 10.0,
                 max_offset: int = 15, at_seconds: Sequence[float] = (60.0, 3600.0), gt_motion: Any = None,
                 gt_head_seeds: int = 32, gt_head_seconds: float = 60.0):
        # 1. settings
        if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps < 1 or SAMPLE_RATE % fps:
            raise EvaluationError(f"fps must be a positive integer dividing {SAMPLE_RATE}, got {fps!r}")
        if not (isinstance(window_s, (int, float)) and math.isfinite(window_s) and window_s > 0):
            raise EvaluationError(f"window_s must be a positive number, got {window_s!r}")
        if isinstance(max_offset, bool) or not isinstance(max_offset, (int, np.integer)) or max_offset < 0:
            raise EvaluationError(f"max_offset must be a non-negative integer, got {max_offset!r}")
        if gt_head_seeds < 1 or gt_head_seconds <= 0:
            raise EvaluationError("gt_head_seeds must be >= 1 and gt_head_seconds > 0")
        self.probes, self.fps, self.window_s, self.max_offset = probes, int(fps), float(window_s), int(max_offset)
        self.at_seconds = tuple(float(t) for t in at_seconds)
        self.gt_motion, self.gt_head_seeds, self.gt_head_seconds = gt_motion, int(gt_head_seeds), float(gt_head_seconds)
        # 2. the reference at the probe size: embedding, sharpness and colour baselines
        ref = np.asarray(reference)
        if ref.ndim != 3 or ref.shape[-1] != 3 or ref.dtype != np.uint8:
            raise EvaluationError(f"reference must be uint8 RGB [H, W, 3], got {ref.dtype} {ref.shape}")
        self.reference = probes.prepare(ref)                         # [1, S, S, 3]
        self.ref_embedding = probes.embed(self.reference)[0]         # [D]
        M.sharpness(self.reference, self.reference[0])               # fails early on a flat reference
        # 3. streaming state
        self._env = _Envelope(self.fps, SAMPLE_RATE)
        self._head_pcm: list[np.ndarray] = []                        # the first gt_head_seconds of audio
        self._head_samples = round(self.gt_head_seconds * SAMPLE_RATE)
        self._kept_samples = 0
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in ("motion", "identity", "sharpness", "colour_drift")}
        self.num_frames = 0
        self._finished = False

    def _check_open(self) -> None:
        if self._finished:
            raise EvaluationError("this evaluator has finished; start a new one")

    def add_audio(self, pcm: np.ndarray) -> None:
        """Feed 16 kHz mono float PCM ``[N]`` (any chunking; frame ``t`` is samples ``[t*spf, (t+1)*spf)``)."""
        self._check_open()
        x = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if not np.isfinite(x).all():
            raise EvaluationError("audio contains NaN or inf samples")
        self._env.push(x)
        if self._kept_samples < self._head_samples:
            piece = x[:self._head_samples - self._kept_samples]
            self._head_pcm.append(piece.copy())
            self._kept_samples += piece.shape[0]
        self._env.update(self.num_frames)

    def add_frames(self, frames: np.ndarray, pcm: np.ndarray | None = None) -> None:
        """Feed uint8 RGB frames ``[n, H, W, 3]`` (any size) and, optionally, more audio.

        1. resize to the probe size; 2. probe outputs and identity similarity; 3. sharpness and
        colour drift against the reference; 4. audio (the envelope advances as far as it can).
        """
        self._check_open()
        f = np.asarray(frames)
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8 or f.shape[0] == 0:
            raise EvaluationError(f"frames must be uint8 RGB [n >= 1, H, W, 3], got {f.dtype} {f.shape}")
        # 1. probe size
        small = self.probes.prepare(f)                               # [n, S, S, 3]
        # 2. probes
        self._parts["motion"].append(self.probes.motion(small))     # [n, 4]
        sim = self.probes.embed(small) @ self.ref_embedding          # [n]
        self._parts["identity"].append(np.clip(sim, -1.0, 1.0))
        # 3. frame quality
        self._parts["sharpness"].append(M.sharpness(small, self.reference[0]))
        self._parts["colour_drift"].append(M.colour_drift(small, self.reference[0]))
        self.num_frames += f.shape[0]
        # 4. audio
        if pcm is not None:
            self.add_audio(pcm)
        else:
            self._env.update(self.num_frames)

    def _ground_truth(self, envelope: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """(gt mouth [T'], gt head [T'', 2], source) per the module docstring."""
        from models.training.synthetic import make_motion

        if self.gt_motion is not None:
            g = self.gt_motion
            head = np.stack([np.asarray(g.head_dx, dtype=np.float64), np.asarray(g.head_dy, dtype=np.float64)], axis=1)
            return np.asarray(g.mouth, dtype=np.float64), head, "given"
        pcm = np.concatenate(self._head_pcm) if self._head_pcm else np.zeros(0, dtype=np.float32)
        n = max(2, min(self.num_frames, round(self.gt_head_seconds * self.fps)))
        sample = [make_motion(pcm, n, seed) for seed in range(self.gt_head_seeds)]
        head = np.concatenate([np.stack([m.head_dx, m.head_dy], axis=1) for m in sample]).astype(np.float64)
        return envelope, head, "audio"

    def finish(self) -> QualityReport:
        """Compute every metric over everything fed so far; the evaluator cannot be used afterwards."""
        self._check_open()
        if self.num_frames < M.MIN_SYNC_FRAMES:
            raise EvaluationError(f"need at least {M.MIN_SYNC_FRAMES} frames, got {self.num_frames}")
        if self._env.samples == 0:
            raise EvaluationError("no audio was given: lip sync needs the audio the video was made from")
        self._finished = True
        # 1. per-frame series
        per = PerFrame(envelope=self._env.finish(self.num_frames),
                       **{k: np.concatenate(v) for k, v in self._parts.items()})
        self._parts = {}
        fps, win = self.fps, self.window_s
        # 2. lip sync
        mouth = per.motion[:, M.MOUTH]
        sync = M.sync(mouth, per.envelope, self.max_offset)
        sync_windows = M.windowed_sync(mouth, per.envelope, fps, win, self.max_offset)
        # 3. motion dynamics, overall and per window
        gt_mouth, gt_head, source = self._ground_truth(per.envelope)
        motion = M.motion(per.motion, gt_mouth, gt_head)
        series = {"head_var": M.windowed(per.motion[:, [M.HEAD_DX, M.HEAD_DY]], fps, win,
                                         lambda w: float(w.var(axis=0).sum()))}
        if gt_mouth.shape[0] == self.num_frames:
            both = np.stack([mouth, gt_mouth], axis=1)                 # [T, 2]
            series["mouth_var_ratio"] = M.windowed(both, fps, win, lambda w: M.ratio(w[:, 0].var(), w[:, 1].var()))
        # 4. identity and frame quality
        return QualityReport(
            frames=self.num_frames, fps=float(fps), window_s=win, max_offset=self.max_offset, sync=sync,
            sync_windows=sync_windows, identity=M.identity(per.identity, fps, win, self.at_seconds), motion=motion,
            sharpness=M.summarize(per.sharpness, fps, win, self.at_seconds),
            colour_drift=M.summarize(per.colour_drift, fps, win, self.at_seconds),
            series=series, gt_source=source, per_frame=per)


def evaluate(frames: np.ndarray, pcm16k: np.ndarray, reference: np.ndarray, probes: Probes, fps: int = 25,
             gt_motion: Any = None, window_s: float = 10.0, max_offset: int = 15,
             at_seconds: Sequence[float] = (60.0, 3600.0)) -> QualityReport:
    """Evaluate a whole in-memory video: ``frames`` uint8 ``[T, H, W, 3]``, ``pcm16k`` ``[N]`` 16 kHz
    mono, ``reference`` uint8 ``[H, W, 3]``. Same as an :class:`Evaluator` fed in chunks."""
    ev = Evaluator(probes, reference, fps, window_s, max_offset, at_seconds, gt_motion)
    f = np.asarray(frames)
    if f.ndim != 4:
        raise EvaluationError(f"frames must be uint8 RGB [T, H, W, 3], got shape {f.shape}")
    for i in range(0, f.shape[0], CHUNK_FRAMES):
        ev.add_frames(f[i:i + CHUNK_FRAMES])
    ev.add_audio(pcm16k)
    return ev.finish()


# ---------------------------------------------------------------------------------------------
# writing: JSON, per-frame arrays, plots
# ---------------------------------------------------------------------------------------------


def _time_axis(seconds: Sequence[float] | np.ndarray, total_s: float) -> tuple[np.ndarray, str]:
    t = np.asarray(seconds, dtype=np.float64)
    return (t / 60.0, "time (min)") if total_s > PLOT_MINUTES_AFTER_S else (t, "time (s)")


def _mid(w: M.WindowSeries | M.WindowSync) -> np.ndarray:
    return (np.asarray(w.start_s) + np.asarray(w.end_s)) / 2.0


def _values(w: M.WindowSeries) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in w.values], dtype=np.float64)


def write_plots(report: QualityReport, out_dir: str | Path) -> list[Path]:
    """PNG plots of the metrics over time (matplotlib, Agg backend); returns the files written.

    identity.png (similarity per frame + window means + fitted drift), sync.png (correlation per
    window; the correlation-vs-offset curve), mouth.png (predicted mouth vs envelope, first
    seconds; needs per-frame series), motion.png (per-window mouth variance ratio and head
    variance), quality.png (colour drift and sharpness per window).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total, per, written = report.seconds, report.per_frame, []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    # 1. identity
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ident = report.identity
    if per is not None:
        t, label = _time_axis(np.arange(report.frames) / report.fps, total)
        ax.plot(t, per.identity, lw=0.5, alpha=0.4, label="per frame")
    t, label = _time_axis(_mid(ident.windows), total)
    ax.plot(t, _values(ident.windows), "o-", ms=3, label=f"{report.window_s:g} s windows")
    if ident.slope_per_minute is not None:
        ends = np.array([0.0, total])
        te, _ = _time_axis(ends, total)
        ax.plot(te, ident.intercept + ident.slope_per_minute * ends / 60.0, "--",
                label=f"drift {ident.slope_per_minute:+.4f}/min")
    ax.set(xlabel=label, ylabel="cosine to reference", title="identity similarity")
    ax.legend(loc="lower left", fontsize=8)
    save(fig, "identity.png")
    # 2. sync
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    sw = report.sync_windows
    t, label = _time_axis(_mid(sw), total)
    a1.plot(t, sw.correlation, "o-", ms=3)
    a1.set(xlabel=label, ylabel="Pearson r at best offset", title="lip sync per window", ylim=(-1.05, 1.05))
    a2.plot(report.sync.offsets, report.sync.curve, "-")
    a2.axvline(report.sync.offset_frames, ls="--", color="gray")
    a2.set(xlabel="offset (frames, + = video lags)", ylabel="Pearson r",
           title=f"whole video: r {report.sync.correlation:.3f} at {report.sync.offset_frames:+d}")
    save(fig, "sync.png")
    # 3. mouth vs envelope
    if per is not None:
        n = min(report.frames, round(MOUTH_PLOT_SECONDS * report.fps))
        t = np.arange(n) / report.fps
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ax.plot(t, per.envelope[:n], label="audio envelope")
        ax.plot(t, per.motion[:n, M.MOUTH], label="mouth opening (probe)")
        ax.set(xlabel="time (s)", ylabel="0 closed .. 1 open", title="mouth opening vs audio envelope")
        ax.legend(loc="upper right", fontsize=8)
        save(fig, "mouth.png")
    # 4. motion over time
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    w = report.series["head_var"]
    t, label = _time_axis(_mid(w), total)
    if "mouth_var_ratio" in report.series:
        m = report.series["mouth_var_ratio"]
        a1.plot(_time_axis(_mid(m), total)[0], _values(m), "o-", ms=3)
        a1.axhline(1.0, ls="--", color="gray")
    a1.set(xlabel=label, ylabel="var(pred) / var(gt)", title="mouth motion vs ground truth")
    a2.plot(t, _values(w), "o-", ms=3, label="video")
    a2.axhline(report.motion.gt_head_var, ls="--", color="gray", label="ground truth")
    a2.set(xlabel=label, ylabel="var(dx) + var(dy) (px^2)", title="head motion")
    a2.legend(fontsize=8)
    save(fig, "motion.png")
    # 5. frame quality
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, s, name, unit in ((a1, report.colour_drift, "colour drift", "mean |d channel mean| (0..255)"),
                              (a2, report.sharpness, "sharpness", "Laplacian var / reference's")):
        t, label = _time_axis(_mid(s.windows), total)
        ax.plot(t, _values(s.windows), "o-", ms=3)
        ax.set(xlabel=label, ylabel=unit, title=name)
    a2.axhline(1.0, ls="--", color="gray")
    save(fig, "quality.png")
    return written


def write_report(report: QualityReport, out_dir: str | Path, plots: bool = True) -> Path:
    """Write ``out_dir/report.json``, ``out_dir/series.npz`` (per-frame series, when the report has
    them) and the PNG plots of :func:`write_plots`; returns the JSON's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(report.to_json() + "\n")
    tmp.replace(path)
    if report.per_frame is not None:
        np.savez_compressed(out / SERIES_FILE, **report.per_frame.__dict__)
    if plots:
        write_plots(report, out)
    return path
