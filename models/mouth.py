"""The mouth envelope: per video frame loudness of speech in [0, 1].

It is the one audio envelope of the project: the synthetic faces of training open their mouths by
it (:mod:`models.training.synthetic`), and the lip-sync metric correlates a video's mouth opening
against it (:mod:`models.quality.report`). Both import it from here, so neither depends on the other.

Only numpy is used (no torch).
"""

from __future__ import annotations

import numpy as np

FPS = 25
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640

# Frame RMS in dBFS is mapped linearly from ENVELOPE_FLOOR_DB (-> 0) to ENVELOPE_LOUD_DB (-> 1). Real
# speech frames sit around -30 dBFS (median) to -18 dBFS (90th percentile), silence below -50 dBFS,
# so speech opens the mouth about half-way and loud syllables fully.
ENVELOPE_FLOOR_DB = -45.0
ENVELOPE_LOUD_DB = -15.0
ENVELOPE_SMOOTHING = (0.25, 0.5, 0.25)  # symmetric: smoothing adds no lag
_MIN_RMS = 1e-10


class EnvelopeError(ValueError):
    """Bad input to :func:`mouth_envelope` (not 1-D float PCM, NaN/inf, bad frame count or rates)."""


def _check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise EnvelopeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def mouth_envelope(pcm: np.ndarray, num_frames: int | None = None, fps: int = FPS,
                   sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Per-video-frame loudness of speech, ``[N]`` float PCM -> ``[T]`` float32 in [0, 1].

    Frame ``t`` covers samples ``[t * spf, (t + 1) * spf)`` with ``spf = sample_rate // fps``
    (640 at 16 kHz, 25 fps); samples past the end of ``pcm`` count as silence.

    1. ``rms_t = sqrt(mean(x[t * spf:(t + 1) * spf] ** 2))``.
    2. ``db_t = 20 log10(rms_t)`` (absolute dBFS, so the value of a frame depends only on its own
       samples: cropping a clip does not change the envelope of the frames kept).
    3. ``level_t = clip((db_t - ENVELOPE_FLOOR_DB) / (ENVELOPE_LOUD_DB - ENVELOPE_FLOOR_DB), 0, 1)``:
       0 at -45 dBFS and below, 1 at -15 dBFS and above.
    4. Light symmetric smoothing ``[0.25, 0.5, 0.25]`` over frames (edges repeated), no lag.

    Silence (all zeros) gives exactly 0. ``num_frames`` defaults to ``ceil(N / spf)``.
    """
    if not isinstance(pcm, np.ndarray) or pcm.ndim != 1:
        raise EnvelopeError(f"pcm must be a 1-D numpy array, got {getattr(pcm, 'shape', type(pcm).__name__)}")
    pcm = pcm.astype(np.float32, copy=False)
    if not np.isfinite(pcm).all():
        raise EnvelopeError("pcm contains NaN or inf samples")
    fps, sample_rate = _check_int("fps", fps, 1), _check_int("sample_rate", sample_rate, 1)
    if sample_rate % fps:
        raise EnvelopeError(f"sample_rate {sample_rate} is not a whole number of samples per frame at {fps} fps")
    spf = sample_rate // fps
    if num_frames is None:
        num_frames = -(-pcm.shape[0] // spf)
    num_frames = _check_int("num_frames", num_frames)
    # 1. frame the signal (zero-padded to whole frames): [N] -> [T, spf]
    x = np.zeros(num_frames * spf, dtype=np.float64)
    n = min(x.shape[0], pcm.shape[0])
    x[:n] = pcm[:n]
    rms = np.sqrt(np.mean(x.reshape(num_frames, spf) ** 2, axis=1))  # [T]
    # 2-3. dBFS -> [0, 1]
    db = 20.0 * np.log10(np.maximum(rms, _MIN_RMS))
    level = np.clip((db - ENVELOPE_FLOOR_DB) / (ENVELOPE_LOUD_DB - ENVELOPE_FLOOR_DB), 0.0, 1.0)
    if num_frames == 0:
        return level.astype(np.float32)
    # 4. smoothing
    half = len(ENVELOPE_SMOOTHING) // 2
    padded = np.pad(level, half, mode="edge")
    smooth = np.convolve(padded, np.asarray(ENVELOPE_SMOOTHING), mode="valid")  # [T]
    return np.clip(smooth, 0.0, 1.0).astype(np.float32)
