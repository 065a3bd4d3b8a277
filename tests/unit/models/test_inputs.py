"""Edge decoding of user audio / images, the area rule and reference preprocessing."""

import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.inputs import (
    InputError,
    Resampler,
    load_audio,
    load_image,
    pcm_from_bytes,
    prepare_reference,
    size_for_area,
)
from services.common.examples import examples_dir

pytestmark = pytest.mark.unit

EXAMPLES = examples_dir()


# ---------------------------------------------------------------------------------------------
# helpers that build test media
# ---------------------------------------------------------------------------------------------


def _wav_bytes(samples: np.ndarray, rate: int, kind: str = "int16") -> bytes:
    """Minimal RIFF/WAVE writer. samples: [N, C] float in [-1, 1] (or raw values for float32)."""
    samples = np.asarray(samples)
    if samples.ndim == 1:
        samples = samples[:, None]
    channels = samples.shape[1]
    if kind == "int16":
        data = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
        fmt_tag, bits = 1, 16
    else:
        data = samples.astype("<f4").tobytes()
        fmt_tag, bits = 3, 32
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _read_float_wav(path: Path) -> tuple[np.ndarray, int]:
    """Parse a float32 mono WAV with plain struct/numpy (independent of PyAV)."""
    raw = path.read_bytes()
    pos, rate, data = 12, None, None
    while pos < len(raw):
        cid, size = raw[pos:pos + 4], struct.unpack("<I", raw[pos + 4:pos + 8])[0]
        if cid == b"fmt ":
            tag, ch, rate = struct.unpack("<HHI", raw[pos + 8:pos + 16])
            assert ch == 1
        elif cid == b"data":
            data = np.frombuffer(raw[pos + 8:pos + 8 + size], dtype="<f4")
        pos += 8 + size + (size & 1)
    return data.astype(np.float64), rate


def _encode_with_pyav(fmt: str, codec: str, rate: int, seconds: float, freq: float = 440.0) -> bytes:
    import av

    t = np.arange(int(rate * seconds)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.stack([x, x])), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _dominant_freq(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


def _png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but holds almost no pixel data (valid CRCs)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(
        b"IEND", b"")


def _image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# resampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 22050, 24000, 44100, 48000])
def test_resampler_reproduces_analytic_sine(rate):
    """A 1 kHz tone sampled at `rate` -> the same tone sampled at 16 kHz (computed analytically)."""
    n = rate  # 1 s
    x = np.sin(2 * np.pi * 1000 * np.arange(n) / rate + 0.3)
    y = Resampler(rate)(x)
    assert len(y) == math.ceil(n * 16000 / rate) and y.dtype == np.float32
    ref = np.sin(2 * np.pi * 1000 * np.arange(len(y)) / 16000 + 0.3)
    edge = 400  # the signal starts/ends abruptly; compare away from the ends
    assert np.abs(y[edge:-edge] - ref[edge:-edge]).max() < 1e-4


@pytest.mark.parametrize("rate", [24000, 44100, 48000])
def test_resampler_removes_content_above_new_nyquist(rate):
    x = np.sin(2 * np.pi * 9500 * np.arange(rate) / rate)  # would alias to 6.5 kHz at 16 kHz
    y = Resampler(rate)(x)
    assert np.sqrt(np.mean(y[400:-400] ** 2)) < 1e-3


def test_resampler_streaming_equals_whole_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(44100 + 123)
    for rate in (44100, 48000, 24000):
        r = Resampler(rate)
        whole = r(x)
        state = r.new_state()
        parts, pos = [], 0
        while pos < len(x):
            size = int(rng.integers(0, 5000))
            parts.append(r.push(state, x[pos:pos + size]))
            pos += size
        parts.append(r.flush(state))
        # exact: every output sample is accumulated tap by tap in the same fixed order, element-wise
        # (no reduction whose order depends on the chunk), from the same buffered input samples
        assert np.array_equal(np.concatenate(parts), whole)


# ---------------------------------------------------------------------------------------------
# load_audio
# ---------------------------------------------------------------------------------------------


def test_example_wav_decodes_like_plain_parser():
    path = EXAMPLES / "cyclops_baker.wav"
    raw, rate = _read_float_wav(path)
    assert rate == 24000
    got = load_audio(path, max_seconds=60)
    assert got.dtype == np.float32 and got.ndim == 1
    assert len(got) == math.ceil(len(raw) * 16000 / 24000)
    np.testing.assert_array_equal(got, Resampler(24000)(raw))
    assert np.array_equal(load_audio(path.read_bytes(), max_seconds=60), got)  # bytes == path


def test_int16_stereo_wav_downmix_and_resample():
    rate = 44100
    t = np.arange(rate) / rate
    left, right = 0.6 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 440 * t)
    got = load_audio(_wav_bytes(np.stack([left, right], 1), rate), max_seconds=5)
    ref = 0.4 * np.sin(2 * np.pi * 440 * np.arange(len(got)) / 16000)
    assert len(got) == 16000
    assert np.abs(got[400:-400] - ref[400:-400]).max() < 2e-4  # int16 quantisation


@pytest.mark.parametrize("fmt,codec,rate", [("flac", "flac", 44100), ("ogg", "libopus", 48000),
                                             ("mp3", "libmp3lame", 44100), ("adts", "aac", 22050)])
def test_compressed_formats(fmt, codec, rate):
    data = _encode_with_pyav(fmt, codec, rate, seconds=1.0, freq=440.0)
    got = load_audio(data, max_seconds=5)
    assert abs(len(got) / 16000 - 1.0) < 0.1  # encoder delay / padding
    assert abs(_dominant_freq(got, 16000) - 440.0) < 3.0
    assert 0.3 < np.abs(got).max() < 0.7  # stereo 0.5 sine averaged to mono stays 0.5
    if fmt == "flac":  # lossless: sample-exact to the analytic tone (up to 16-bit quantisation)
        ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(got)) / 16000)
        assert np.abs(got[400:-400] - ref[400:-400]).max() < 2e-4


def test_audio_errors(tmp_path):
    with pytest.raises(InputError, match="empty"):
        load_audio(b"", max_seconds=10)
    with pytest.raises(InputError, match="not found"):
        load_audio(tmp_path / "missing.wav", max_seconds=10)
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_audio(tmp_path / "zero.wav", max_seconds=10)
    with pytest.raises(InputError, match="cannot (read|decode) audio"):
        load_audio(np.random.default_rng(0).bytes(5000), max_seconds=10)
    good = _wav_bytes(np.zeros(1000), 16000)
    with pytest.raises(InputError, match="cannot (read|decode) audio"):
        load_audio(good[:20], max_seconds=10)  # header cut inside the fmt chunk
    corrupt = b"RIFF" + struct.pack("<I", 4000) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + b"\xff" * 16 + b"\x00" * 64
    with pytest.raises(InputError, match="cannot|unsupported"):
        load_audio(corrupt, max_seconds=10)
    with pytest.raises(InputError, match="empty"):
        load_audio(_wav_bytes(np.zeros((0, 1)), 16000), max_seconds=10)
    nan = np.zeros(4000, dtype=np.float32)
    nan[1234] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        load_audio(_wav_bytes(nan, 16000, kind="float32"), max_seconds=10)
    inf = np.zeros(4000, dtype=np.float32)
    inf[10] = np.inf
    with pytest.raises(InputError, match="NaN or inf"):
        load_audio(_wav_bytes(inf, 16000, kind="float32"), max_seconds=10)
    with pytest.raises(InputError, match="too long"):
        load_audio(_wav_bytes(np.zeros(3 * 16000), 16000), max_seconds=1.0)
    with pytest.raises(InputError, match="too long"):  # decoded count decides within header slack
        load_audio(_wav_bytes(np.zeros(int(1.5 * 16000)), 16000), max_seconds=1.0)
    assert len(load_audio(_wav_bytes(np.zeros(16000), 16000), max_seconds=1.0)) == 16000
    with pytest.raises(InputError, match="no audio stream|cannot"):
        load_audio(EXAMPLES / "cyclops_baker.jpg", max_seconds=10)
    with pytest.raises(InputError, match="max_seconds"):
        load_audio(good, max_seconds=0)
    with pytest.raises(InputError, match="path or bytes"):
        load_audio(12345, max_seconds=10)


def test_pcm_from_bytes():
    rng = np.random.default_rng(1)
    ints = rng.integers(-32768, 32767, size=(1600, 2)).astype("<i2")
    got = pcm_from_bytes(ints.tobytes(), "pcm16", 16000, channels=2)
    np.testing.assert_array_equal(got, (ints.astype(np.float64) / 32768.0).mean(1).astype(np.float32))

    x = np.sin(2 * np.pi * 700 * np.arange(48000) / 48000).astype("<f4")
    got = pcm_from_bytes(x.tobytes(), "f32", 48000)
    ref = np.sin(2 * np.pi * 700 * np.arange(len(got)) / 16000)
    assert len(got) == 16000 and np.abs(got[400:-400] - ref[400:-400]).max() < 1e-4

    with pytest.raises(InputError, match="unknown PCM format"):
        pcm_from_bytes(b"\x00\x00", "s24", 16000)
    with pytest.raises(InputError, match="not a multiple"):
        pcm_from_bytes(b"\x00\x00\x00", "pcm16", 16000)
    with pytest.raises(InputError, match="not a multiple"):
        pcm_from_bytes(b"\x00" * 4, "pcm16", 16000, channels=3)
    with pytest.raises(InputError, match="empty"):
        pcm_from_bytes(b"", "f32", 16000)
    with pytest.raises(InputError, match="NaN or inf"):
        pcm_from_bytes(np.array([0.0, np.nan], dtype="<f4").tobytes(), "f32", 16000)
    with pytest.raises(InputError, match="sample rate"):
        pcm_from_bytes(b"\x00\x00", "pcm16", 100)
    with pytest.raises(InputError, match="too long"):
        pcm_from_bytes(b"\x00\x00" * 16001, "pcm16", 16000, max_seconds=1.0)


# ---------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape", [("cyclops_baker", (400, 720, 3)), ("kitchen_grandmother", (720, 400, 3)),
                                        ("music_producer", (400, 720, 3))])
def test_example_jpegs(name, shape):
    path = EXAMPLES / f"{name}.jpg"
    img = load_image(path, max_pixels=4096 * 4096)
    assert img.shape == shape and img.dtype == np.uint8
    with Image.open(path) as ref:
        np.testing.assert_array_equal(img, np.asarray(ref.convert("RGB")))


def test_alpha_is_composited_on_white():
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 40, 10
    rgba[:, :2, 3] = 0
    rgba[:, 2:4, 3] = 255
    rgba[:, 4:, 3] = 100
    got = load_image(_image_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=100)
    a = rgba[..., 3:4].astype(np.float64) / 255
    expected = rgba[..., :3] * a + 255 * (1 - a)
    assert np.abs(got.astype(np.float64) - expected).max() <= 1.0
    assert (got[:, :2] == 255).all() and (got[:, 2:4] == [200, 40, 10]).all()

    la = Image.fromarray(np.stack([np.full((3, 3), 50, np.uint8), np.zeros((3, 3), np.uint8)], -1), "LA")
    assert (load_image(_image_bytes(la, "PNG"), max_pixels=100) == 255).all()
    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    assert (load_image(_image_bytes(pal, "PNG", transparency=0), max_pixels=100) == 255).all()


def test_cmyk_grayscale_and_16bit():
    rng = np.random.default_rng(2)
    rgb = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # smooth blocks
    cmyk = Image.fromarray(rgb).convert("CMYK")
    got = load_image(_image_bytes(cmyk, "JPEG", quality=95), max_pixels=10_000)
    assert got.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - rgb.astype(int)).mean() < 6  # JPEG loss only

    gray = Image.fromarray(rng.integers(0, 256, (5, 7)).astype(np.uint8), "L")
    got = load_image(_image_bytes(gray, "PNG"), max_pixels=100)
    assert got.shape == (5, 7, 3) and (got == np.asarray(gray)[..., None]).all()

    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    img16 = Image.fromarray(deep)  # mode I;16
    got = load_image(_image_bytes(img16, "PNG"), max_pixels=100)
    np.testing.assert_array_equal(got[..., 0], np.round(deep / 257).astype(np.uint8))


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:10, :20] = [255, 0, 0]  # red top-left quadrant
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    got = load_image(_image_bytes(Image.fromarray(arr), "PNG", exif=exif.tobytes()), max_pixels=10_000)
    np.testing.assert_array_equal(got, np.rot90(arr, k=-1))  # clockwise


def test_image_errors(tmp_path):
    with pytest.raises(InputError, match="empty"):
        load_image(b"", max_pixels=100)
    with pytest.raises(InputError, match="not a supported image"):
        load_image(b"this is not an image at all" * 10, max_pixels=100)
    with pytest.raises(InputError, match="not a supported image"):
        load_image((EXAMPLES / "cyclops_baker.wav").read_bytes()[:4096], max_pixels=100)
    jpeg = (EXAMPLES / "cyclops_baker.jpg").read_bytes()
    with pytest.raises(InputError, match="truncated|corrupt"):
        load_image(jpeg[: len(jpeg) // 2], max_pixels=10**7)
    with pytest.raises(InputError, match="too large: 720x400"):
        load_image(jpeg, max_pixels=720 * 400 - 1)
    # headers that claim a huge image: rejected from the header, before any decoding
    with pytest.raises(InputError, match="too large: 5000x5000"):
        load_image(_png_with_header_size(5000, 5000), max_pixels=10**6)
    with pytest.raises(InputError, match="too large"):
        load_image(_png_with_header_size(60000, 60000), max_pixels=10**12)  # Pillow's own bomb guard
    gif = _image_bytes(Image.new("RGB", (4, 4)), "GIF")
    with pytest.raises(InputError, match="not a supported image"):
        load_image(gif, max_pixels=100)
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png", max_pixels=100)


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------


def test_size_for_area_published_examples():
    assert size_for_area(400, 720) == (384, 704)
    assert size_for_area(720, 400) == (704, 384)
    assert size_for_area(400, 720, area=704 * 384) == (384, 704)
    assert size_for_area(1000, 1000) == (512, 512)
    assert size_for_area(1024, 768) == (640, 448)
    assert size_for_area(1024, 768, area=704 * 384) == (576, 448)


def _brute_force_size(h, w, area, m, steps=20000):
    """The definition, by a dense float scan of scales from s_max downward."""
    s_max = min(1.0, math.sqrt(area / (h * w)))
    for i in range(steps + 1):
        s = s_max * (1 - i / steps)
        hh = max(m, math.ceil(math.floor(h * s) / m) * m)
        ww = max(m, math.ceil(math.floor(w * s) / m) * m)
        if hh * ww <= area:
            return hh, ww
    return m, m


def test_size_for_area_matches_dense_scan():
    rng = np.random.default_rng(3)
    cases = [(int(rng.integers(100, 3000)), int(rng.integers(100, 3000))) for _ in range(25)]
    for h, w in cases + [(400, 720), (1080, 1920), (1920, 1080), (333, 1000)]:
        for area, m in ((720 * 400, 64), (704 * 384, 64), (128 * 96, 16)):
            got = size_for_area(h, w, area, m)
            assert got == _brute_force_size(h, w, area, m), (h, w, area, m)
            assert got[0] % m == 0 and got[1] % m == 0 and got[0] * got[1] <= area


def test_size_for_area_errors():
    with pytest.raises(InputError, match="positive integer"):
        size_for_area(0, 10)
    with pytest.raises(InputError, match="smaller than one"):
        size_for_area(100, 100, area=100, multiple=64)


def test_prepare_reference_center_crop_and_range():
    img = np.zeros((100, 300, 3), dtype=np.uint8)
    img[:, :] = [255, 0, 0]
    img[:, 100:200] = [0, 255, 0]  # middle third green
    out = prepare_reference(img, 64, 64)  # cover-resize to 64x192, keep the middle 64 columns
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    inner = out[:, :, 2:-2]
    assert torch.equal(inner[1], torch.ones_like(inner[1])) and torch.equal(inner[0], -torch.ones_like(inner[0]))

    flat = np.full((50, 80, 3), 51, dtype=np.uint8)
    out = prepare_reference(flat, 48, 64)  # aspect differs: crop rows
    assert torch.allclose(out, torch.full_like(out, 51 / 127.5 - 1))
    assert out.min() >= -1 and out.max() <= 1

    portrait = load_image(EXAMPLES / "kitchen_grandmother.jpg", max_pixels=10**7)
    h, w = size_for_area(*portrait.shape[:2])
    out = prepare_reference(portrait, h, w)
    assert out.shape == (3, 704, 384) and out.min() >= -1 and out.max() <= 1


def test_prepare_reference_errors():
    with pytest.raises(InputError, match="uint8"):
        prepare_reference(np.zeros((4, 4, 3), dtype=np.float32), 4, 4)
    with pytest.raises(InputError, match="uint8"):
        prepare_reference(np.zeros((4, 4), dtype=np.uint8), 4, 4)
    with pytest.raises(InputError, match="positive"):
        prepare_reference(np.zeros((4, 4, 3), dtype=np.uint8), 0, 4)
