"""The mouth envelope (models/mouth.py): against a loop-by-loop reimplementation of its documented
definition, a sine burst placed in known frames, and bad input.
"""

import math

import numpy as np
import pytest

from models import mouth
from models.mouth import SAMPLE_RATE, SAMPLES_PER_FRAME, EnvelopeError, mouth_envelope
from tests.signals import speech_like as _speech_like

pytestmark = pytest.mark.unit


def _envelope_by_loops(pcm: np.ndarray, num_frames: int) -> np.ndarray:
    """The documented envelope, computed one frame and one sample at a time."""
    level = []
    for t in range(num_frames):
        chunk = [float(pcm[k]) if k < len(pcm) else 0.0
                 for k in range(t * SAMPLES_PER_FRAME, (t + 1) * SAMPLES_PER_FRAME)]
        rms = math.sqrt(sum(v * v for v in chunk) / len(chunk))
        db = 20 * math.log10(rms) if rms > 0 else -math.inf
        level.append(min(1.0, max(0.0, (db - mouth.ENVELOPE_FLOOR_DB)
                                  / (mouth.ENVELOPE_LOUD_DB - mouth.ENVELOPE_FLOOR_DB))))
    out = []
    for t in range(num_frames):
        prev, nxt = level[max(t - 1, 0)], level[min(t + 1, num_frames - 1)]
        out.append(0.25 * prev + 0.5 * level[t] + 0.25 * nxt)
    return np.array(out)


def test_envelope_matches_its_definition():
    pcm = _speech_like(1.3, seed=1) * np.float32(0.5)
    pcm[:SAMPLES_PER_FRAME] = 0.1  # a loud first frame: exercises the edge handling
    num_frames = 40  # longer than the audio: the tail is silence
    env = mouth_envelope(pcm, num_frames)
    assert env.dtype == np.float32 and env.shape == (num_frames,)
    np.testing.assert_allclose(env, _envelope_by_loops(pcm, num_frames), atol=1e-5)
    assert mouth_envelope(pcm).shape == (math.ceil(len(pcm) / SAMPLES_PER_FRAME),)
    assert 0.2 < env[:30].mean() < 0.95 and np.all(env[-5:] == 0.0)


def test_envelope_of_silence_is_zero_and_a_burst_is_seen_exactly_where_it_is():
    assert np.array_equal(mouth_envelope(np.zeros(30 * SAMPLES_PER_FRAME, np.float32)), np.zeros(30))
    # a 220 Hz sine at amplitude 0.5 (RMS 0.35, -9 dBFS) in frames 10..19 of 30
    pcm = np.zeros(30 * SAMPLES_PER_FRAME, np.float32)
    span = np.arange(10 * SAMPLES_PER_FRAME, 20 * SAMPLES_PER_FRAME)
    pcm[span] = 0.5 * np.sin(2 * np.pi * 220 * span / SAMPLE_RATE)
    env = mouth_envelope(pcm)
    assert np.all(env[10:20] >= 0.75) and np.all(env[11:19] > 0.99)
    assert np.all(env[9] <= 0.25) and np.all(env[20] <= 0.25)
    assert np.all(env[:9] == 0) and np.all(env[21:] == 0)
    # louder speech opens the mouth wider
    quiet, loud = mouth_envelope(pcm * 0.05), mouth_envelope(pcm * 1.0)
    assert loud[12:18].mean() > quiet[12:18].mean() + 0.3


@pytest.mark.parametrize("bad, match", [(np.zeros((2, 640), np.float32), "1-D"),
                                        (np.array([0.0, np.nan], np.float32), "NaN"),
                                        ([0.0] * 640, "numpy")])
def test_envelope_rejects_bad_pcm(bad, match):
    with pytest.raises(EnvelopeError, match=match):
        mouth_envelope(bad)


def test_the_synthetic_mouth_is_this_envelope_and_keeps_its_own_error():
    from models.training.synthetic import SyntheticError, make_motion

    pcm = _speech_like(2.0, seed=4)
    assert np.array_equal(make_motion(pcm, 50, seed=0).mouth, mouth_envelope(pcm, 50))
    with pytest.raises(SyntheticError, match="NaN"):
        make_motion(np.array([0.0, np.nan], np.float32), 1, seed=0)
