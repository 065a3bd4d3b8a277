"""`liveavatar generate` as a real process: a playable MP4, latents that match, clear errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.checkpoints import SHIPPED_CHECKPOINT
from models.inputs import load_audio, load_image
from models.liveavatar import LiveAvatarConfig, build_models
from pipeline_stages.sequential import SessionSpec, generate_blocks

pytestmark = pytest.mark.integration


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "services.cli", "generate", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode", ["sequential", "tpp"])
def test_generate_writes_a_playable_mp4_and_the_latents_of_the_in_process_run(mode, examples, tmp_path):
    image, audio = examples / "music_producer.jpg", examples / "music_producer.wav"
    pcm = load_audio(str(audio), 60)[: 16000 * 3]          # 3 s keeps the test short
    clip = tmp_path / "clip.wav"
    with wave.open(str(clip), "wb") as w:                  # int16 16 kHz this time: another input format
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    out, lat = tmp_path / "out.mp4", tmp_path / "lat.safetensors"
    extra = ["--tpp"] if mode == "tpp" else []
    r = cli("--image", str(image), "--audio", str(clip), "--seed", "3", "--threads", "1", "--out", str(out),
            "--dump-latents", str(lat), *extra)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    # the default model is the shipped trained checkpoint
    assert summary["blocks"] == 7 and summary["frames"] == 84 and summary["random_weights"] is False
    assert summary["mode"] == mode
    assert "SEEDED RANDOM" not in r.stderr

    probe = json.loads(subprocess.run(
        [shutil.which("ffprobe") or "ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(out)],
        capture_output=True, text=True, check=True).stdout)
    streams = {s["codec_type"]: s for s in probe["streams"]}
    assert streams["video"]["codec_name"] == "h264" and streams["video"]["avg_frame_rate"] == "25/1"
    assert streams["audio"]["codec_name"] == "aac"
    assert abs(float(probe["format"]["duration"]) - 3.0) <= 0.48

    # the dumped latents equal an in-process sequential run on the same (resampled) inputs and seed
    torch.set_num_threads(1)
    models = build_models(LiveAvatarConfig.load(SHIPPED_CHECKPOINT), checkpoint=SHIPPED_CHECKPOINT)
    pcm16 = load_audio(str(clip), 60)
    blocks = generate_blocks(models, SessionSpec(load_image(str(image), 50_000_000), "", seed=3), pcm16)
    dumped = load_file(str(lat))
    assert sorted(dumped) == [f"block_{b:06d}" for b in range(7)]
    for res in blocks:
        assert torch.equal(dumped[f"block_{res.block_index:06d}"], res.latent)


def _write_wav(path, samples: np.ndarray, rate=16000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.mark.parametrize("case", ["not_an_image", "missing_audio", "garbage_audio", "empty_audio", "nan_audio",
                                  "too_long", "too_many_pixels"])
def test_bad_input_gets_one_clear_line_and_exit_code_2(case, examples, tmp_path):
    image, audio = str(examples / "cyclops_baker.jpg"), str(examples / "cyclops_baker.wav")
    extra: list[str] = []
    expect = ""
    if case == "not_an_image":
        image = str(tmp_path / "x.jpg")
        (tmp_path / "x.jpg").write_bytes(b"this is not a picture at all" * 10)
        expect = "image"
    elif case == "missing_audio":
        audio = str(tmp_path / "nowhere.wav")
        expect = "audio file not found"
    elif case == "garbage_audio":
        audio = str(tmp_path / "garbage.wav")
        (tmp_path / "garbage.wav").write_bytes(b"this is not a sound at all" * 10)
        expect = "not a recognised audio file"
    elif case == "empty_audio":
        audio = str(tmp_path / "empty.wav")
        _write_wav(audio, np.zeros(0))
        expect = "empty"
    elif case == "nan_audio":
        audio = str(tmp_path / "nan.wav")
        data = np.full(1600, np.nan, dtype="<f4")
        with wave.open(audio, "wb") as w:             # header says PCM16; overwrite as float below
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        _float_wav(audio, data)
        expect = "NaN"
    elif case == "too_long":
        extra = ["--max-audio-seconds", "2"]
        expect = "too long"
    elif case == "too_many_pixels":
        extra = ["--max-image-pixels", "1000"]
        expect = "pixels"
    r = cli("--image", image, "--audio", audio, "--out", str(tmp_path / "o.mp4"), *extra)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expect.lower() in lines[0].lower(), r.stderr
    assert "errno" not in r.stderr.lower(), r.stderr      # no internal error numbers
    assert not (tmp_path / "o.mp4").exists() or (tmp_path / "o.mp4").stat().st_size == 0


def _float_wav(path, data: np.ndarray, rate=16000):
    """A WAVE_FORMAT_IEEE_FLOAT file, written by hand (the wave module only writes PCM)."""
    import struct

    payload = data.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)
