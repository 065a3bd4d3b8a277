"""Synthetic test signals shared by several test modules."""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000


def speech_like(seconds: float, seed: int, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Noise with a syllable-rate (4 Hz) loudness envelope and short pauses: [seconds * rate] float32."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    envelope = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.3 * envelope * rng.standard_normal(n)).astype(np.float32)
