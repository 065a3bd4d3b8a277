"""The synthetic talking-avatar domain: faces, motion, rendering, dataset, speech.

Geometry checks recompute the mouth and eye boxes from the documented FaceParams geometry (the
audio envelope the mouth follows is tested in test_mouth.py); speech lengths are checked against espeak-ng run directly and the raw WAV length.
"""

import dataclasses
import io
import math
import subprocess
import wave

import numpy as np
import pytest

from models.inputs import load_audio
from models.mouth import mouth_envelope
from models.training import speech as speech_mod
from models.training import synthetic as syn
from models.training.speech import (
    HELD_OUT_EXAMPLE,
    TARGET_ACTIVE_DBFS,
    SpeechCorpus,
    SpeechError,
    SpeechInputError,
    active_level_dbfs,
    espeak_available,
    parse_wav_pcm16,
    synthesize,
)
from models.training.synthetic import (
    BLINK_PROFILE,
    FPS,
    HEAD_CENTER_Y,
    MOUTH_OPEN_MAX,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    ClipSample,
    Motion,
    SyntheticDataset,
    SyntheticError,
    face_params,
    make_motion,
    reference_image,
    render_clip,
    render_frame,
    sample_clip,
)
from tests.signals import speech_like as _speech_like

pytestmark = pytest.mark.unit

S = 64
MARGIN_PX = 1.5  # one anti-aliasing pixel plus half a pixel for the pixel-centre grid
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")


def _box_mask(cx: float, cy: float, half_w: float, half_h: float) -> np.ndarray:
    """[S, S] bool: pixel centres within |x - cx| <= half_w, |y - cy| <= half_h."""
    c = np.arange(S) + 0.5
    return (np.abs(c[None, :] - cx) <= half_w) & (np.abs(c[:, None] - cy) <= half_h)


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------


def test_face_params_is_a_pure_function_of_identity_and_seed():
    assert face_params(7) == face_params(7)
    assert face_params(7, seed=3) == face_params(7, seed=3)
    assert face_params(7) != face_params(8)
    assert face_params(7, seed=0) != face_params(7, seed=1)
    assert np.array_equal(reference_image(face_params(7)), reference_image(face_params(7)))
    assert not np.array_equal(reference_image(face_params(7)), reference_image(face_params(8)))
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(SyntheticError, match="identity"):
            face_params(bad)


def test_every_hair_style_background_and_accessory_occurs():
    faces = [face_params(i) for i in range(400)]
    assert {f.hair_style for f in faces} == set(syn.HAIR_STYLES)
    assert {f.background_style for f in faces} == set(syn.BACKGROUND_STYLES)
    assert {f.accessory for f in faces} == set(syn.ACCESSORIES)


def test_identities_differ_more_than_one_identity_differs_from_itself():
    """Threshold: the largest change one identity goes through while animating (mouth wide open,
    eyes shut, head at the edge of its sway: +2.5 px, +2 px). Two different identities must
    differ (mean abs pixel difference) by more than that, so identity is never confusable with
    motion."""
    n = 50
    refs = np.stack([reference_image(face_params(i)) for i in range(n)]).astype(np.float32)
    within = max(np.abs(render_frame(face_params(i), 1.0, 2.5, 2.0, 0.0).astype(np.float32)
                        - refs[i]).mean() for i in range(n))
    flat = refs.reshape(n, -1)
    between = np.abs(flat[:, None, :] - flat[None, :, :]).mean(axis=2)  # [n, n]
    between[np.arange(n), np.arange(n)] = np.inf
    assert within > 3.0  # the animation itself is visible
    assert between.min() > within, (between.min(), within)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _mouth_box(f, dx: float, dy: float) -> np.ndarray:
    """The documented mouth extent: upper edge at mouth_y - lip_thickness, lower edge at most
    mouth_y + MOUTH_OPEN_MAX + lip_thickness, half-width mouth_width / 2 (fractions of S)."""
    cx = (0.5 + f.head_x) * S + dx
    top = (HEAD_CENTER_Y + f.head_y + f.mouth_y - f.lip_thickness) * S + dy
    bottom = (HEAD_CENTER_Y + f.head_y + f.mouth_y + MOUTH_OPEN_MAX + f.lip_thickness) * S + dy
    return _box_mask(cx, (top + bottom) / 2, f.mouth_width / 2 * S + MARGIN_PX,
                     (bottom - top) / 2 + MARGIN_PX)


def _eye_boxes(f, dx: float, dy: float) -> np.ndarray:
    cy = (HEAD_CENTER_Y + f.head_y + f.eye_y) * S + dy
    mask = np.zeros((S, S), bool)
    for side in (-1, 1):
        cx = (0.5 + f.head_x + side * f.eye_spacing) * S + dx
        mask |= _box_mask(cx, cy, f.eye_width * S + MARGIN_PX, f.eye_height * S + MARGIN_PX)
    return mask


@pytest.mark.parametrize("identity", [0, 3, 11, 42, 123])
def test_mouth_opening_changes_only_the_mouth_box_and_shows_a_dark_interior(identity):
    f, dx, dy = face_params(identity), 0.3, -0.4
    closed = render_frame(f, 0.0, dx, dy, 1.0).astype(np.int32)
    half = render_frame(f, 0.5, dx, dy, 1.0).astype(np.int32)
    wide = render_frame(f, 1.0, dx, dy, 1.0).astype(np.int32)
    box = _mouth_box(f, dx, dy)
    for frame in (half, wide):
        assert np.array_equal(frame[~box], closed[~box])
    # the opening spans several rows (interior up to 6.4 px) and grows with `mouth`
    changed_wide = np.abs(closed - wide).sum(axis=-1) > 60  # [S, S]
    changed_half = np.abs(closed - half).sum(axis=-1) > 60
    assert np.flatnonzero(changed_wide.any(axis=1)).size >= 6 and changed_wide.sum() >= 25
    assert changed_wide.sum() > changed_half.sum() > 0
    # the centre of the fully open mouth is the dark interior
    row = int((HEAD_CENTER_Y + f.head_y + f.mouth_y + MOUTH_OPEN_MAX / 2) * S + dy)
    col = int((0.5 + f.head_x) * S + dx)
    assert np.abs(wide[row, col] - np.array(syn._MOUTH_DARK)).max() <= 25


@pytest.mark.parametrize("identity", [0, 3, 11, 42, 123, 905])
def test_mouth_mask_holds_every_pixel_the_mouth_changes_and_moves_with_the_head(identity):
    """Per frame, the pixels that differ between an open and a closed mouth (same head offset) all lie
    inside mouth_mask; the mask is a few percent of the frame and follows the head's offset."""
    f = face_params(identity)
    dx = np.array([0.0, 0.3, -1.7, 2.4], np.float32)
    dy = np.array([0.0, -0.4, 1.2, -2.1], np.float32)
    motion = Motion(mouth=np.ones(4, np.float32), head_dx=dx, head_dy=dy, blink=np.ones(4, np.float32))
    mask = syn.mouth_mask(f, motion)                                                     # [4, S, S]
    assert mask.shape == (4, S, S) and mask.dtype == np.float32
    for t in range(4):
        closed = render_frame(f, 0.0, dx[t], dy[t], 1.0).astype(np.int32)
        for m in (0.3, 1.0):
            changed = np.abs(render_frame(f, m, dx[t], dy[t], 1.0).astype(np.int32) - closed).sum(-1) > 0
            assert changed.any() and not (changed & (mask[t] == 0)).any()
        assert 0.01 < mask[t].mean() < 0.08
    # the mask of a frame with an offset is the offset frame's mask, not frame 0's
    assert not np.array_equal(mask[2], mask[0])
    with pytest.raises(syn.SyntheticError, match="Motion"):
        syn.mouth_mask(f, "not motion")


@pytest.mark.parametrize("identity", [1, 4, 9, 42, 77])
def test_blink_changes_only_the_eye_boxes(identity):
    f, dx, dy = face_params(identity), -0.6, 0.7
    open_ = render_frame(f, 0.3, dx, dy, 1.0).astype(np.int32)
    shut = render_frame(f, 0.3, dx, dy, 0.0).astype(np.int32)
    boxes = _eye_boxes(f, dx, dy)
    assert np.array_equal(open_[~boxes], shut[~boxes])
    assert (np.abs(open_ - shut).sum(axis=-1) > 30).sum() >= 6


@pytest.mark.parametrize("dx", [0.1, 0.25, 0.5, 1.0, 2.0, -1.5])
def test_dx_moves_the_head_by_dx_pixels_even_below_one_pixel(dx):
    """Centroid of the head (pixels differing from a uniform background, rows above the head
    centre, where the static neck and shoulders are not) moves by dx."""
    base = face_params(5)
    f = dataclasses.replace(base, background_rgb2=base.background_rgb, hair_style="short")
    rows = int((HEAD_CENTER_Y + f.head_y) * S) - 2
    bg = np.array(f.background_rgb, np.float64)

    def centroid_x(offset: float) -> float:
        weight = np.abs(render_frame(f, 0.0, offset, 0.0, 1.0)[:rows] - bg).sum(axis=-1)  # [rows, S]
        return float((weight * (np.arange(S) + 0.5)).sum() / weight.sum())

    assert centroid_x(dx) - centroid_x(0.0) == pytest.approx(dx, abs=0.05)


def test_render_shapes_sizes_and_bad_input():
    f = face_params(2)
    frame = render_frame(f, 0.4, 0.5, 0.5, 1.0)
    assert frame.dtype == np.uint8 and frame.shape == (S, S, 3)
    assert render_frame(f, 0.4, 1.0, 1.0, 1.0, size=128).shape == (128, 128, 3)
    assert np.array_equal(reference_image(f), render_frame(f, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(SyntheticError, match="dx"):
        render_frame(f, 0.0, float("nan"), 0.0, 1.0)
    with pytest.raises(SyntheticError, match="size"):
        render_frame(f, 0.0, 0.0, 0.0, 1.0, size=8)
    with pytest.raises(SyntheticError, match="FaceParams"):
        render_frame("face", 0.0, 0.0, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Motion and samples
# ---------------------------------------------------------------------------------------------


def test_motion_mouth_is_the_envelope_sway_is_small_and_smooth_blinks_happen():
    num_frames = 10 * FPS
    pcm = _speech_like(10.0, seed=2)
    m = make_motion(pcm, num_frames, seed=4)
    assert all(a.dtype == np.float32 and a.shape == (num_frames,)
               for a in (m.mouth, m.head_dx, m.head_dy, m.blink))
    assert np.array_equal(m.mouth, mouth_envelope(pcm, num_frames))
    assert np.abs(m.head_dx).max() <= syn.SWAY_AMPLITUDE_PX[1] + 1e-4
    assert np.abs(np.diff(m.head_dx)).max() < 0.5 and np.abs(np.diff(m.head_dy)).max() < 0.5
    assert m.head_dx.std() > 0.1
    big = make_motion(pcm, num_frames, seed=4, size=128)
    np.testing.assert_allclose(big.head_dx, 2 * m.head_dx, rtol=1e-5, atol=1e-5)
    # blinks: eye openness takes only the profile's values; starts are 2-5 s apart
    assert set(np.unique(m.blink)) <= set(np.float32(BLINK_PROFILE)) | {np.float32(1.0)}
    starts = np.flatnonzero((m.blink[1:] < 1) & (m.blink[:-1] == 1)) + 1
    assert starts.size >= 2 and np.all(np.diff(starts) >= syn.BLINK_INTERVAL_S[0] * FPS - 1)


def test_sample_clip_is_deterministic_and_consistent():
    num_frames = 12
    pcm = _speech_like(1.0, seed=3)
    a = sample_clip(17, pcm, num_frames, seed=5)
    b = sample_clip(17, pcm, num_frames, seed=5)
    assert isinstance(a, ClipSample) and a.identity == 17
    for field in ("frames", "pcm", "reference", "mouth"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert np.array_equal(a.mouth, syn.mouth_mask(face_params(17), a.motion))
    assert a.frames.shape == (num_frames, S, S, 3) and a.frames.dtype == np.uint8
    assert a.pcm.shape == (num_frames * SAMPLES_PER_FRAME,) and np.array_equal(a.pcm, pcm[:a.pcm.size])
    assert np.array_equal(a.motion.mouth, mouth_envelope(pcm[:num_frames * SAMPLES_PER_FRAME]))
    f = face_params(17)
    t = 7
    assert np.array_equal(a.frames[t], render_frame(f, a.motion.mouth[t], a.motion.head_dx[t],
                                                    a.motion.head_dy[t], a.motion.blink[t]))
    assert np.array_equal(a.reference, reference_image(f))
    other = sample_clip(18, pcm, num_frames, seed=5)
    assert not np.array_equal(other.frames, a.frames)
    assert np.array_equal(render_clip(f, a.motion), a.frames)


def test_a_slice_of_a_clip_renders_only_those_frames_and_equals_the_whole_clips_slice():
    data = SyntheticDataset([_speech_like(3.0, seed=1)], [4, 9], num_frames=21, seed=2)
    for i, frames in ((0, slice(0, 9)), (1, slice(7, 8)), (2, slice(13, None))):
        whole, part = data[i], data.get(i, frames)
        start, stop, _ = frames.indices(21)
        assert part.identity == whole.identity and part.frames.shape[0] == stop - start
        # exact: the motion is made for the whole clip first, then each kept frame is drawn by the
        # same per-frame code from the same values
        for field in ("frames", "mouth"):
            assert np.array_equal(getattr(part, field), getattr(whole, field)[frames])
        assert np.array_equal(part.pcm, whole.pcm[start * SAMPLES_PER_FRAME:stop * SAMPLES_PER_FRAME])
        for name in ("mouth", "head_dx", "head_dy", "blink"):
            assert np.array_equal(getattr(part.motion, name), getattr(whole.motion, name)[frames])
        assert np.array_equal(part.reference, whole.reference)
    for bad in (slice(5, 5), slice(0, 10, 2), 3):
        with pytest.raises(syn.SyntheticError, match="frames"):
            data.get(0, bad)


def test_sample_clip_rejects_short_or_bad_pcm():
    with pytest.raises(SyntheticError, match="too short"):
        sample_clip(0, np.zeros(10 * SAMPLES_PER_FRAME - 1, np.float32), 10, seed=0)
    with pytest.raises(ValueError, match="num_frames"):
        sample_clip(0, np.zeros(640, np.float32), 0, seed=0)
    with pytest.raises(SyntheticError, match="seed"):
        sample_clip(0, np.zeros(640, np.float32), 1, seed=-1)
    with pytest.raises(SyntheticError, match="one length"):
        Motion(np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(2, np.float32),
               np.ones(3, np.float32))


def test_dataset_is_deterministic_loops_short_clips_and_inserts_pauses():
    speech = [_speech_like(3.0, seed=6), _speech_like(0.5, seed=7)]  # the second is too short
    num_frames = 25  # 1 s
    ds = SyntheticDataset(speech, identities=[3, 8, 21], num_frames=num_frames, seed=1,
                          epoch_size=40, silence_prob=1.0)
    assert len(ds) == 40
    again = SyntheticDataset(speech, identities=[3, 8, 21], num_frames=num_frames, seed=1,
                             epoch_size=40, silence_prob=1.0)
    first, second = ds[4], again[4]
    assert np.array_equal(first.frames, second.frames) and np.array_equal(first.pcm, second.pcm)
    other_seed = SyntheticDataset(speech, [3, 8, 21], num_frames, seed=2, epoch_size=40)
    assert not np.array_equal(other_seed.window(4)[1], ds.window(4)[1])
    needed = num_frames * SAMPLES_PER_FRAME
    min_pause = int(SyntheticDataset.MIN_SILENCE_S * SAMPLE_RATE)
    identities = set()
    for i in range(len(ds)):
        identity, pcm, _ = ds.window(i)
        identities.add(identity)
        assert pcm.shape == (needed,) and pcm.dtype == np.float32
        zero = np.concatenate([[0], (pcm == 0).astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(zero))
        assert (edges[1::2] - edges[::2]).max() >= min_pause  # a pause of at least 0.4 s
    assert identities == {3, 8, 21}
    assert ds[-1].identity in identities
    with pytest.raises(IndexError):
        ds[40]
    with pytest.raises(SyntheticError, match="speech"):
        SyntheticDataset([], [1], 5, seed=0)


# ---------------------------------------------------------------------------------------------
# Speech
# ---------------------------------------------------------------------------------------------


def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


def test_parse_wav_reads_a_streamed_header_with_placeholder_sizes():
    samples = (np.arange(-500, 500) * 30).astype(np.int16)
    data = bytearray(_wav_bytes(samples, 22050))
    placeholder = (0x7FFFF000).to_bytes(4, "little")
    data[4:8] = placeholder
    data[data.index(b"data") + 4:data.index(b"data") + 8] = placeholder
    pcm, rate = parse_wav_pcm16(bytes(data))
    assert rate == 22050
    np.testing.assert_array_equal(pcm, samples / 32768.0)
    with pytest.raises(SpeechError, match="RIFF"):
        parse_wav_pcm16(b"not a wav file")


def test_synthesize_errors(monkeypatch):
    with pytest.raises(SpeechInputError, match="text"):
        synthesize("   ")
    with pytest.raises(SpeechInputError, match="speed"):
        synthesize("hello", speed=10)
    monkeypatch.setattr(speech_mod.shutil, "which", lambda name: None)
    assert not espeak_available()
    with pytest.raises(SpeechError, match="not found"):
        synthesize("hello")


@needs_espeak
def test_synthesize_returns_16khz_audio_of_espeak_length():
    text, voice, speed, pitch = "-hello there, how are you", "en-us+f2", 150, 60
    pcm = synthesize(text, voice=voice, speed=speed, pitch=pitch)
    raw = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout",
                          "--", text], capture_output=True, check=True).stdout
    raw_samples = (len(raw) - raw.index(b"data") - 8) // 2  # int16 mono at 22050 Hz
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert pcm.shape[0] == math.ceil(raw_samples * SAMPLE_RATE / 22050)
    assert np.sqrt(np.mean(pcm ** 2)) > 0.01
    with pytest.raises(SpeechError, match="voice"):
        synthesize("hello", voice="zz")


@needs_espeak
def test_speech_corpus_builds_caches_and_holds_out(tmp_path, examples, monkeypatch):
    corpus = SpeechCorpus(tmp_path, examples, num_synth=10, seed=0)
    # 1. the held-out example: kitchen_grandmother at 16 kHz, length from the 24 kHz decode
    held = corpus.held_out_example()
    at_24k = load_audio(examples / HELD_OUT_EXAMPLE, 600, sample_rate=24000)
    assert held.dtype == np.float32 and held.shape[0] == math.ceil(at_24k.shape[0] * 2 / 3)
    # 2. splits: 2 other examples + 9 synthetic utterances train; the held-out + utterance 9 eval
    train, evals = corpus.train_clips(), corpus.eval_clips()
    assert len(train) == 2 + 9 and len(evals) == 1 + 1
    assert evals[0] is held and evals[1] is corpus.synth[9]
    assert not any(c.shape == held.shape and np.array_equal(c, held) for c in train)
    assert not any(c is corpus.synth[9] for c in train)
    # 3. synthetic clips: the recorded espeak-ng settings, level-normalised, 16 kHz length
    s0 = corpus.synth_settings[0]
    assert corpus.synth[0].shape[0] == synthesize(s0["text"], s0["voice"], s0["speed"], s0["pitch"]).shape[0]
    assert all(active_level_dbfs(c) <= TARGET_ACTIVE_DBFS + 0.01 for c in corpus.synth)
    assert len({s["voice"] for s in corpus.synth_settings}) > 3
    # 4. cached: a second construction never calls espeak-ng and loads identical arrays
    def boom(*args, **kwargs):
        raise AssertionError("synthesize called although the cache exists")

    monkeypatch.setattr(speech_mod, "synthesize", boom)
    again = SpeechCorpus(tmp_path, examples, num_synth=10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again.train_clips(), train))
    with pytest.raises(AssertionError, match="cache"):  # other settings -> another cache entry
        SpeechCorpus(tmp_path, examples, num_synth=10, seed=1)
    with pytest.raises(SpeechInputError, match="empty"):
        SpeechCorpus(tmp_path, None, num_synth=0)
