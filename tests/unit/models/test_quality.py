"""The quality harness: metrics against independent computations, probes on held-out identities,
the streaming evaluator, the JSON report and ``liveavatar eval``.

The probe-dependent tests use the shipped probes (models/checkpoints/quality-probes) when present
and otherwise train a quick pair once per session, so nothing is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from models.mouth import FPS, SAMPLES_PER_FRAME, mouth_envelope
from models.quality import metrics as M
from models.quality.probes import (
    PROBES_DIR,
    IdentityEncoder,
    MouthProbe,
    ProbeConfig,
    ProbeError,
    Probes,
    load_probes,
    save_probes,
    to_probe_size,
    train_probes,
)
from models.quality.report import EvaluationError, Evaluator, QualityReport, evaluate, write_report
from models.training.synthetic import face_params, reference_image, sample_clip

pytestmark = pytest.mark.unit

HELD_OUT = 900                      # an identity the probes never trained on (train ids are 0..799)
CLIP_FRAMES = 300                   # 12 s


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Syllable-like amplitude-modulated noise at 16 kHz: 80-300 ms bursts at -40..-12 dBFS with
    pauses, so the envelope (and a synthetic mouth) moves like speech's."""
    rng = np.random.default_rng(seed)
    n = round(seconds * 16000)
    amp = np.zeros(n)
    pos = 0
    while pos < n:
        length = int(rng.uniform(0.08, 0.3) * 16000)
        if rng.uniform() < 0.75:
            amp[pos:pos + length] = 10 ** (rng.uniform(-40, -12) / 20)
        pos += length
    return (rng.standard_normal(n) * amp).astype(np.float32)


@pytest.fixture(scope="session")
def probes(tmp_path_factory) -> Probes:
    torch.set_num_threads(1)
    if (PROBES_DIR / "probes.safetensors").is_file():
        return load_probes(PROBES_DIR)
    cfg = dataclasses.replace(ProbeConfig(), mouth_steps=400, identity_steps=150)
    return train_probes(tmp_path_factory.mktemp("probes"), cfg, progress=False)


@pytest.fixture(scope="session")
def clips():
    """Two held-out identities, each speaking different audio."""
    a = sample_clip(HELD_OUT, speech_like(CLIP_FRAMES / FPS, seed=1), CLIP_FRAMES, seed=3)
    b = sample_clip(HELD_OUT + 1, speech_like(CLIP_FRAMES / FPS, seed=2), CLIP_FRAMES, seed=4)
    return a, b


def random_probes(seed: int = 0) -> Probes:
    """Untrained tiny probes: fast, for tests of plumbing that does not depend on what they say."""
    cfg = ProbeConfig.tiny()
    torch.manual_seed(seed)
    return Probes(cfg, MouthProbe(cfg).eval(), IdentityEncoder(cfg).eval())


# ---------------------------------------------------------------------------------------------
# metrics: lip sync
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3, -4, 7])
def test_sync_recovers_a_constructed_offset(k):
    rng = np.random.default_rng(0)
    env = np.convolve(rng.random(260), np.ones(4) / 4, mode="valid")       # smooth, speech-like
    # the video lags the audio by k frames: mouth[t] = env[t - k]
    full = np.concatenate([np.zeros(20), env, np.zeros(20)])
    mouth = np.roll(full, k)[20:-20]
    audio = full[20:-20]
    res = M.sync(mouth, audio, max_offset=15)
    assert res.offset_frames == k
    assert res.correlation > 0.99
    assert res.confidence > 0.3
    # the curve at offset 0 is the plain Pearson correlation of the two series (numpy's)
    assert res.curve[res.offsets.index(0)] == pytest.approx(np.corrcoef(mouth, audio)[0, 1], abs=1e-12)


def test_sync_offsets_are_limited_to_half_the_clip_and_constants_score_zero():
    res = M.sync(np.arange(9.0), np.ones(9), max_offset=15)
    assert res.offsets == tuple(range(-4, 5))
    assert res.curve == (0.0,) * 9 and res.offset_frames == 0 and res.confidence == 0.0


@pytest.mark.parametrize("bad", [dict(mouth_pred=np.zeros(5), envelope=np.zeros(6)),
                                 dict(mouth_pred=np.array([0.0, np.nan, 1.0]), envelope=np.zeros(3)),
                                 dict(mouth_pred=np.zeros(2), envelope=np.zeros(2)),
                                 dict(mouth_pred=np.zeros((3, 2)), envelope=np.zeros(3))])
def test_sync_rejects_bad_input(bad):
    with pytest.raises(M.MetricError):
        M.sync(**bad)


def test_windowed_sync_matches_sync_on_each_window():
    rng = np.random.default_rng(1)
    a, b = rng.random(600), rng.random(600)
    ws = M.windowed_sync(a, b, fps=25, window_s=10.0, max_offset=5)
    assert ws.start_s == (0.0, 10.0) and ws.end_s == (10.0, 20.0)   # 600 frames = 2 full + 100 (< half) dropped
    assert ws.correlation[1] == M.sync(a[250:500], b[250:500], 5).correlation


# ---------------------------------------------------------------------------------------------
# metrics: windows, trends, identity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames,expected", [(600, [(0, 250), (250, 500)]),
                                             (625, [(0, 250), (250, 500), (500, 625)]),
                                             (40, [(0, 40)]), (0, [])])
def test_window_bounds(frames, expected):
    assert M.window_bounds(frames, 25, 10.0) == expected


def test_drift_slope_of_a_linear_series_is_recovered():
    fps, minutes = 25, 3.0
    t_min = np.arange(int(minutes * 60 * fps)) / fps / 60
    y = 0.9 - 0.004 * t_min                                     # exact line
    res = M.identity(y, fps)
    assert res.slope_per_minute == pytest.approx(-0.004, rel=1e-9)
    assert res.intercept == pytest.approx(0.9, abs=1e-12)
    noisy = y + np.random.default_rng(0).normal(0, 0.01, y.shape)
    slope, intercept = np.polyfit(t_min, noisy, 1)              # independent least squares
    assert M.linear_trend(noisy, fps)[0] == pytest.approx(slope, rel=1e-9)
    assert M.linear_trend(noisy, fps)[1] == pytest.approx(intercept, rel=1e-9)


def test_summary_at_times_and_windows():
    fps = 25
    y = np.arange(2 * 60 * fps, dtype=np.float64)               # 2 minutes
    s = M.summarize(y, fps, window_s=10.0, at_seconds=(60.0, 3600.0))
    assert s.at["60"] == y[50 * fps:60 * fps].mean()
    assert s.at["3600"] is None                                 # past the end
    assert s.first_window == y[:250].mean() and s.last_window == y[-250:].mean()
    assert len(s.windows.values) == 12 and s.windows.values[3] == y[750:1000].mean()
    assert s.mean == y.mean()


def test_identity_rejects_similarities_out_of_range():
    with pytest.raises(M.MetricError, match="similarity"):
        M.identity(np.array([0.5, 1.5, 0.2]), 25)


# ---------------------------------------------------------------------------------------------
# metrics: motion and frame quality
# ---------------------------------------------------------------------------------------------


def test_motion_variance_ratios():
    rng = np.random.default_rng(0)
    gt_mouth, gt_head = rng.random(200), rng.normal(0, 2, (200, 2))
    pred = np.stack([0.5 * gt_mouth, 3 * gt_head[:, 0], 3 * gt_head[:, 1], np.ones(200)], axis=1)
    res = M.motion(pred, gt_mouth, gt_head)
    assert res.mouth_var_ratio == pytest.approx(0.25)
    assert res.head_var_ratio == pytest.approx(9.0)
    assert res.mouth_speed_ratio == pytest.approx(0.5)
    frozen = M.motion(np.zeros((200, 4)), gt_mouth, gt_head)
    assert frozen.mouth_var_ratio == 0.0 and frozen.head_var_ratio == 0.0
    assert M.motion(pred, np.full(200, 0.3), gt_head).mouth_var_ratio is None   # still ground truth


def test_laplacian_variance_of_a_checkerboard():
    board = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
    frame = np.repeat(board[:, :, None], 3, axis=2)
    # every interior pixel has four neighbours of the other colour: L = +-4 * 255 (luma weights sum to 1)
    assert M.laplacian_variance(frame)[0] == pytest.approx((4 * 255) ** 2)
    assert M.laplacian_variance(np.full((1, 8, 8, 3), 77, np.uint8))[0] == 0.0


def test_colour_drift_of_a_tinted_copy(clips):
    clip = clips[0]
    ref = clip.reference
    assert M.colour_drift(ref, ref)[0] == 0.0
    tinted = ref.astype(np.int32)
    tinted[..., 2] += 30                                      # a blue cast
    expected = np.abs(np.clip(tinted, 0, 255).mean(axis=(0, 1)) - ref.mean(axis=(0, 1))).mean()
    assert M.colour_drift(np.clip(tinted, 0, 255).astype(np.uint8), ref)[0] == pytest.approx(expected)
    # a tint that grows over the clip: drift grows, the slope is positive
    ramp = np.linspace(0, 40, clip.frames.shape[0])[:, None, None, None]
    drifting = np.clip(clip.frames + ramp * np.array([1, 0, 0]), 0, 255).astype(np.uint8)
    base = M.summarize(M.colour_drift(clip.frames, ref), FPS, 4.0)
    tint = M.summarize(M.colour_drift(drifting, ref), FPS, 4.0)
    assert tint.slope_per_minute > base.slope_per_minute + 20      # 40 / 3 levels over 12 s ~ 67 per minute
    assert tint.last_window > tint.first_window + 8


def test_sharpness_drops_for_a_blurred_copy(clips):
    from PIL import Image, ImageFilter

    clip = clips[0]
    frames = clip.frames[:10]
    blurred = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(1.5))) for f in frames])
    sharp, soft = M.sharpness(frames, clip.reference), M.sharpness(blurred, clip.reference)
    assert np.all(sharp > 0.5) and np.all(soft < 0.5 * sharp)


# ---------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------


def test_probes_read_held_out_identities(probes, clips):
    clip = clips[0]
    pred = probes.motion(clip.frames)
    m = clip.motion
    assert M.pearson(pred[:, M.MOUTH], m.mouth) > 0.85
    assert M.pearson(pred[:, M.HEAD_DX], m.head_dx) > 0.7
    # identity: each clip is closer to its own reference than to the other clip's or to 5 more
    refs = np.stack([reference_image(face_params(i)) for i in range(HELD_OUT, HELD_OUT + 7)])
    emb_refs = probes.embed(refs)
    for j, c in enumerate(clips):
        sims = probes.embed(c.frames) @ emb_refs.T            # [T, 7]
        own = sims[:, j].mean()
        others = np.delete(sims, j, axis=1).mean(axis=0)
        assert own > 0.7 and np.all(own > others + 0.3), (own, others)


def test_probe_training_resumes_exactly_and_saves(tmp_path, monkeypatch):
    import models.quality.probes as probes_mod

    torch.set_num_threads(1)
    cfg = ProbeConfig.tiny()
    fresh = train_probes(tmp_path / "b", cfg, progress=False, save_every=2)
    # an interrupted run: the 4th rendered batch (mouth step 3) fails after the step-2 checkpoint
    real, calls = probes_mod.render_batch, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(probes_mod, "render_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        train_probes(tmp_path / "a", cfg, progress=False, save_every=2)
    resumed = train_probes(tmp_path / "a", cfg, progress=False, save_every=2)     # resumes at step 2
    assert len(calls) == 4 + 2 + cfg.identity_steps
    # exact: the checkpoint restores the probes bit for bit and every step runs the same ops on the
    # same batch shapes in this process
    for x, y in zip(resumed.mouth.state_dict().values(), fresh.mouth.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(resumed.identity.state_dict().values(), fresh.identity.state_dict().values()):
        assert torch.equal(x, y)
    # save -> load gives the same outputs
    save_probes(fresh, tmp_path / "ship", scores={"mouth_r2": 0.5})
    loaded = load_probes(tmp_path / "ship")
    frames = np.stack([reference_image(face_params(i)) for i in range(3)])
    np.testing.assert_array_equal(loaded.motion(frames), fresh.motion(frames))
    np.testing.assert_array_equal(loaded.embed(frames), fresh.embed(frames))


def test_load_probes_fails_loudly(tmp_path):
    with pytest.raises(ProbeError, match="not found"):
        load_probes(tmp_path)
    save_probes(random_probes(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "depth": 3}))
    with pytest.raises(ProbeError, match="unknown keys"):
        load_probes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "embed_dim": cfg["embed_dim"] * 2}))
    with pytest.raises(ProbeError, match="shape"):
        load_probes(tmp_path)


def test_default_probes_are_small():
    cfg = ProbeConfig()
    n = sum(p.numel() for p in MouthProbe(cfg).parameters())
    n += sum(p.numel() for name, p in IdentityEncoder(cfg).named_parameters() if name != "classifier")
    assert n * 4 < 2 * 2 ** 20
    if (PROBES_DIR / "probes.safetensors").is_file():
        assert (PROBES_DIR / "probes.safetensors").stat().st_size < 2 * 2 ** 20


def test_to_probe_size_covers_and_crops():
    img = np.zeros((1, 40, 80, 3), np.uint8)
    img[:, :, 16:64] = 255                                   # a 2:1 image, white but for 16 px at each end
    out = to_probe_size(img, 16)
    assert out.shape == (1, 16, 16, 3)
    assert out.min() == 255                                  # cover + centre crop keeps only the middle
                                                             # 40 px; squashing would keep the black ends
    same = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert to_probe_size(same, 16) is same


# ---------------------------------------------------------------------------------------------
# evaluator and report
# ---------------------------------------------------------------------------------------------


def test_ground_truth_beats_shuffled_audio(probes, clips):
    a, b = clips
    own = evaluate(a.frames, a.pcm, a.reference, probes, gt_motion=a.motion, window_s=4.0)
    shuffled = evaluate(a.frames, b.pcm, a.reference, probes, gt_motion=a.motion, window_s=4.0)
    assert own.sync.correlation > 0.8 and abs(own.sync.offset_frames) <= 1
    assert own.sync.correlation > shuffled.sync.correlation + 0.4
    assert own.sync.confidence > shuffled.sync.confidence + 0.3
    # motion: the ground truth moves like itself; a frozen video (the reference repeated) does not.
    # An MSE regressor shrinks toward the mean where it is unsure (held-out per-face slope of the
    # mouth read-out: median ~0.95, 10th percentile ~0.84 -> variance ratio ~0.7), hence the wide band.
    assert 0.6 < own.motion.mouth_var_ratio < 1.4 and 0.6 < own.motion.head_var_ratio < 1.6
    frozen = evaluate(np.repeat(a.reference[None], 50, 0), a.pcm[:50 * SAMPLES_PER_FRAME], a.reference, probes,
                      gt_motion=a.motion)
    assert frozen.motion.mouth_var_ratio < 0.05 and frozen.motion.head_var_ratio < 0.05
    # identity: own reference vs another identity's
    other_ref = evaluate(a.frames, a.pcm, b.reference, probes, window_s=4.0)
    assert own.identity.mean > 0.7 and own.identity.mean > other_ref.identity.mean + 0.3


def test_streaming_envelope_and_report_do_not_depend_on_chunking():
    probes = random_probes()
    rng = np.random.default_rng(0)
    clip = sample_clip(5, speech_like(3.0, seed=5), 70, seed=0)
    pcm = np.concatenate([clip.pcm, speech_like(0.5, seed=6)])    # audio runs past the video's end
    whole = evaluate(clip.frames, pcm, clip.reference, probes, window_s=1.0)
    ev = Evaluator(probes, clip.reference, window_s=1.0)
    f_cuts = np.sort(rng.choice(np.arange(1, 70), 6, replace=False))
    a_cuts = np.sort(rng.choice(np.arange(1, pcm.shape[0]), 9, replace=False))
    a_parts = np.split(pcm, a_cuts)
    for i, frames in enumerate(np.split(clip.frames, f_cuts)):
        ev.add_frames(frames, a_parts[i])
    for part in a_parts[len(f_cuts) + 1:]:
        ev.add_audio(part)
    streamed = ev.finish()
    expected = mouth_envelope(pcm, 70)                            # what the video's frames heard
    # exact: a frame's value depends only on its own 640 samples (a row-wise mean of fixed length)
    # and its neighbours, so the streamed pieces run the same ops on the same samples
    np.testing.assert_array_equal(streamed.per_frame.envelope, expected.astype(np.float64))
    np.testing.assert_array_equal(whole.per_frame.envelope, expected.astype(np.float64))
    for key in ("identity", "sharpness", "colour_drift"):
        np.testing.assert_allclose(getattr(streamed.per_frame, key), getattr(whole.per_frame, key), atol=1e-6)
    # the motion ground truth from audio: the envelope for the mouth
    assert streamed.gt_source == "audio"
    assert streamed.motion.gt_mouth_var == pytest.approx(float(np.var(expected.astype(np.float64))))


def test_missing_audio_is_silence_and_no_audio_is_an_error():
    probes = random_probes()
    clip = sample_clip(5, speech_like(2.0, seed=5), 50, seed=0)
    rep = evaluate(clip.frames, clip.pcm[:20 * SAMPLES_PER_FRAME], clip.reference, probes)
    expected = mouth_envelope(clip.pcm[:20 * SAMPLES_PER_FRAME], 50)
    np.testing.assert_array_equal(rep.per_frame.envelope, expected.astype(np.float64))
    assert np.all(rep.per_frame.envelope[21:] == 0.0)
    ev = Evaluator(probes, clip.reference)
    ev.add_frames(clip.frames)
    with pytest.raises(EvaluationError, match="no audio"):
        ev.finish()
    with pytest.raises(EvaluationError, match="uint8"):
        ev.add_frames(clip.frames.astype(np.float32))


def test_report_json_round_trips_and_files_are_written(probes, clips, tmp_path):
    a = clips[0]
    frames = a.frames[:150]
    big = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)      # 128x128: resized to the probe size
    rep = evaluate(big, a.pcm, a.reference, probes, gt_motion=a.motion, window_s=2.0)
    text = rep.to_json()
    back = QualityReport.from_json(text)
    assert back.to_json() == text
    d = json.loads(text)
    assert d["frames"] == 150 and d["seconds"] == 6.0 and d["identity"]["at"]["60"] is None
    assert len(d["sync_windows"]["correlation"]) == 3 and d["gt_source"] == "given"
    path = write_report(rep, tmp_path)
    assert json.loads(path.read_text()) == d
    for name in ("identity.png", "sync.png", "mouth.png", "motion.png", "quality.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    series = np.load(tmp_path / "series.npz")
    np.testing.assert_array_equal(series["identity"], rep.per_frame.identity)
    with pytest.raises(EvaluationError, match="format"):
        QualityReport.from_dict({**d, "format": "other/9"})


# ---------------------------------------------------------------------------------------------
# liveavatar eval
# ---------------------------------------------------------------------------------------------


def write_mp4(path: Path, frames: np.ndarray, pcm: np.ndarray | None, fps: int = FPS) -> None:
    """H.264 (+ AAC at 16 kHz) with PyAV."""
    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.options = {"crf": "12"}
        streams = [vs]
        if pcm is not None:
            aus = c.add_stream("aac", rate=16000, layout="mono")
            streams.append(aus)
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        if pcm is not None:
            step = 1024
            for i in range(0, len(pcm), step):
                af = av.AudioFrame.from_ndarray(pcm[None, i:i + step].astype(np.float32), format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = 16000, i, Fraction(1, 16000)
                for p in aus.encode(af):
                    c.mux(p)
        for s in streams:
            for p in s.encode(None):
                c.mux(p)


def write_wav(path: Path, pcm: np.ndarray) -> None:
    """16-bit mono 16 kHz WAV (stdlib)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.round(np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())


def eval_args(*argv: str) -> argparse.Namespace:
    from services.cli import eval_cmd

    p = argparse.ArgumentParser()
    eval_cmd.add_arguments(p)
    return p.parse_args([*argv, "--no-progress"])


def test_eval_cmd_scores_an_mp4(probes, clips, tmp_path, capsys):
    from PIL import Image

    from services.cli import eval_cmd

    a = clips[0]
    write_mp4(tmp_path / "clip.mp4", a.frames[:100], a.pcm[:100 * SAMPLES_PER_FRAME])
    Image.fromarray(a.reference).save(tmp_path / "ref.png")
    probes_dir = save_probes(probes, tmp_path / "probes")
    code = eval_cmd.run(eval_args(str(tmp_path / "clip.mp4"), "--reference", str(tmp_path / "ref.png"),
                                  "--probes", str(probes_dir), "--out", str(tmp_path / "out"), "--window", "2"))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "report:" in out and "sync corr" in out
    d = json.loads((tmp_path / "out" / "report.json").read_text())
    assert d["frames"] == 100
    assert d["sync"]["correlation"] > 0.7 and abs(d["sync"]["offset_frames"]) <= 2
    assert (tmp_path / "out" / "sync.png").is_file()
    # a video without an audio track: an error without --audio, scored with it
    write_mp4(tmp_path / "mute.mp4", a.frames[:60], None)
    code = eval_cmd.run(eval_args(str(tmp_path / "mute.mp4"), "--reference", str(tmp_path / "ref.png"),
                                  "--probes", str(probes_dir), "--out", str(tmp_path / "out2"), "--no-plots"))
    assert code == 2 and "no audio track" in capsys.readouterr().err
    write_wav(tmp_path / "speech.wav", a.pcm[:60 * SAMPLES_PER_FRAME])
    code = eval_cmd.run(eval_args(str(tmp_path / "mute.mp4"), "--reference", str(tmp_path / "ref.png"),
                                  "--audio", str(tmp_path / "speech.wav"), "--probes", str(probes_dir),
                                  "--out", str(tmp_path / "out2"), "--no-plots"))
    assert code == 0, capsys.readouterr().err
    d = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert d["frames"] == 60 and d["sync"]["correlation"] > 0.7
    assert not (tmp_path / "out2" / "sync.png").exists()


def test_eval_cmd_bad_input_exits_2(tmp_path, capsys):
    from PIL import Image

    from services.cli import eval_cmd

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ref.png")
    cases = [
        (str(tmp_path / "missing.mp4"), "--reference", str(tmp_path / "ref.png")),
        (str(tmp_path / "ref.png"), "--reference", str(tmp_path / "missing.png")),
        ("--generate", "--image", str(tmp_path / "ref.png")),                     # no --audio
        (str(tmp_path / "ref.png"),),                                             # no --reference
    ]
    for argv in cases:
        assert eval_cmd.run(eval_args(*argv, "--out", str(tmp_path / "o"))) == 2, argv
        assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    code = eval_cmd.run(eval_args(str(tmp_path / "junk.mp4"), "--reference", str(tmp_path / "ref.png"),
                                  "--probes", str(save_probes(random_probes(), tmp_path / "p")), "--out",
                                  str(tmp_path / "o")))
    assert code == 2 and "cannot read video" in capsys.readouterr().err


def test_eval_cmd_generates_then_scores(tmp_path, capsys):
    from PIL import Image

    from services.cli import eval_cmd

    clip = sample_clip(7, speech_like(1.0, seed=9), 25, seed=0)
    Image.fromarray(clip.reference).save(tmp_path / "face.png")
    write_wav(tmp_path / "speech.wav", clip.pcm)
    probes_dir = save_probes(random_probes(), tmp_path / "p")
    code = eval_cmd.run(eval_args("--generate", "--image", str(tmp_path / "face.png"), "--audio",
                                  str(tmp_path / "speech.wav"), "--seconds", "0.5", "--probes", str(probes_dir),
                                  "--out", str(tmp_path / "gen"), "--no-plots", "--threads", "1"))
    assert code == 0, capsys.readouterr().err
    d = json.loads((tmp_path / "gen" / "report.json").read_text())
    assert d["frames"] == 24                                 # 0.5 s of audio = 2 blocks of 12 frames
    assert d["gt_source"] == "audio"
    assert (tmp_path / "gen" / "generated.mp4").stat().st_size > 0
