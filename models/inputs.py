"""Input decoding at the platform's edge: user audio and reference images -> model-ready arrays.

Everything a user can send passes through here first, so every failure is an :class:`InputError`
(a ``ValueError``) whose message names the problem; services turn it into a 4xx.

Audio: any container / codec PyAV can decode (WAV int16 / int32 / float, FLAC, OGG Vorbis / Opus,
MP3, AAC, ...), any sample rate, any channel count -> float32 mono 16 kHz. Channels are averaged;
the rate is changed with a Kaiser-windowed sinc resampler (:class:`Resampler`), which also works
on a live stream chunk by chunk with output identical to resampling the whole signal at once.

Images: JPEG / PNG / WebP / BMP via Pillow -> uint8 RGB ``[H, W, 3]``. EXIF orientation is
applied; transparency is composited **on white**; CMYK, grayscale, palette and 16-bit images are
converted to RGB. The pixel count is checked from the header before any pixel is decoded.

Geometry: :func:`size_for_area` is the reference's area rule (H, W multiples of 64, aspect kept,
H * W <= area); :func:`prepare_reference` resizes to cover (H, W), center-crops, scales to [-1, 1].
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from math import gcd
from pathlib import Path

import numpy as np

Source = str | Path | bytes | bytearray | memoryview

TARGET_SAMPLE_RATE = 16000
MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 384000
MAX_CHANNELS = 64
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


class InputError(ValueError):
    """User input that cannot be used (corrupt, empty, too large, wrong kind). Maps to a 4xx."""


# ---------------------------------------------------------------------------------------------
# Resampling (Kaiser-windowed sinc, rational ratio, streamable)
# ---------------------------------------------------------------------------------------------


@dataclass
class ResamplerState:
    """Streaming state of a :class:`Resampler`.

    Attributes:
        buffer: input samples (float64) from absolute index ``buffer_start`` onward.
        buffer_start: absolute input index of ``buffer[0]`` (negative at start: implicit zeros).
        samples_in: input samples pushed so far.
        next_out: absolute index of the next output sample.
        finished: set by :meth:`Resampler.flush`.
    """

    buffer: np.ndarray
    buffer_start: int
    samples_in: int = 0
    next_out: int = 0
    finished: bool = False


class Resampler:
    """Band-limited rational resampler from ``rate_in`` to ``rate_out``.

    Output sample ``m`` sits at input position ``p = m * down / up`` (``up / down`` = the reduced
    rate ratio) and is ``sum_n x[n] * h(n - p)`` with ``h(d) = fc * sinc(fc * d) * kaiser(d / half)``,
    ``fc = rolloff * min(1, rate_out / rate_in)`` (cutoff as a fraction of the input Nyquist), and
    ``half = ceil(zero_crossings / fc)`` taps per side. Samples outside the signal are zeros.
    Filter taps are precomputed for each of the ``up`` phases. Output length is
    ``ceil(N * up / down)``. Stopband ~ -85 dB (Kaiser beta 8.6), passband to ~0.42 * rate_out.

    Streaming: :meth:`push` returns every output whose taps are all available; :meth:`flush`
    pads the end with zeros and returns the rest. Any chunking gives the same samples, bit for bit.
    """

    def __init__(self, rate_in: int, rate_out: int = TARGET_SAMPLE_RATE, zero_crossings: int = 32,
                 rolloff: float = 0.92, beta: float = 8.6) -> None:
        for name, rate in (("input", rate_in), ("output", rate_out)):
            if not isinstance(rate, (int, np.integer)) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                raise InputError(f"{name} sample rate must be an integer in [{MIN_SAMPLE_RATE}, "
                                 f"{MAX_SAMPLE_RATE}] Hz, got {rate!r}")
        self.rate_in, self.rate_out = int(rate_in), int(rate_out)
        g = gcd(self.rate_in, self.rate_out)
        self.up, self.down = self.rate_out // g, self.rate_in // g
        self.identity = self.up == self.down
        fc = rolloff * min(1.0, self.rate_out / self.rate_in)
        self.half = math.ceil(zero_crossings / fc)
        # taps[r, j]: weight of input index floor(p) - half + 1 + j for phase r = (m * down) mod up
        offsets = np.arange(-self.half + 1, self.half + 1, dtype=np.float64)  # [2 * half]
        dist = offsets[None, :] - np.arange(self.up, dtype=np.float64)[:, None] / self.up  # [up, 2 * half]
        # continuous Kaiser window evaluated at the fractional distances
        kaiser = np.i0(beta * np.sqrt(np.clip(1.0 - (dist / self.half) ** 2, 0.0, None))) / np.i0(beta)
        taps = fc * np.sinc(fc * dist) * kaiser  # [up, 2 * half]
        self.taps = taps / taps.sum(axis=1, keepdims=True)  # unit DC gain for every phase

    def new_state(self) -> ResamplerState:
        return ResamplerState(buffer=np.zeros(self.half, dtype=np.float64), buffer_start=-self.half)

    def output_length(self, num_in: int) -> int:
        return -(-num_in * self.up // self.down)

    def _compute(self, state: ResamplerState, end: int) -> np.ndarray:
        """Outputs ``state.next_out .. end - 1`` from the buffer; trims consumed input."""
        m = np.arange(state.next_out, end, dtype=np.int64)
        base = (m * self.down) // self.up  # floor of the input position
        phase = (m * self.down) % self.up
        first = base - self.half + 1 - state.buffer_start  # buffer index of tap 0
        out = np.zeros(m.shape[0], dtype=np.float64)
        for j in range(2 * self.half):
            out += self.taps[phase, j] * state.buffer[first + j]
        state.next_out = end
        keep_from = (end * self.down) // self.up - self.half + 1  # first input the next output needs
        drop = max(0, min(keep_from - state.buffer_start, state.buffer.shape[0]))
        state.buffer = state.buffer[drop:]
        state.buffer_start += drop
        return out

    def push(self, state: ResamplerState, x: np.ndarray) -> np.ndarray:
        """Feed mono samples ``[n]``; returns the float32 outputs that are now complete."""
        if state.finished:
            raise InputError("resampler already flushed")
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        state.samples_in += x.shape[0]
        if self.identity:
            return x.astype(np.float32)
        state.buffer = np.concatenate([state.buffer, x])
        last_input = state.samples_in - 1 - self.half  # outputs with base <= this have all taps
        end = ((last_input + 1) * self.up + self.down - 1) // self.down if last_input >= 0 else 0
        end = max(end, state.next_out)
        return self._compute(state, end).astype(np.float32)

    def flush(self, state: ResamplerState) -> np.ndarray:
        """End of input: zero-pad and return the remaining outputs (total ``ceil(N * up / down)``)."""
        if state.finished:
            raise InputError("resampler already flushed")
        state.finished = True
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        state.buffer = np.concatenate([state.buffer, np.zeros(2 * self.half + 1)])
        end = max(self.output_length(state.samples_in), state.next_out)
        return self._compute(state, end).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Resample a whole signal at once."""
        state = self.new_state()
        return np.concatenate([self.push(state, x), self.flush(state)])


def resample_audio(x: np.ndarray, rate_in: int, rate_out: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Whole-signal resampling, mono ``[N]`` -> float32 ``[ceil(N * rate_out / rate_in)]``."""
    return Resampler(rate_in, rate_out)(x)


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------

_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _frame_to_float(frame) -> np.ndarray:
    """PyAV AudioFrame -> float64 ``[channels, samples]`` in [-1, 1]."""
    fmt = frame.format.name.rstrip("p")
    channels = frame.layout.nb_channels
    arr = frame.to_ndarray()
    if not frame.format.is_planar:
        arr = arr.reshape(-1, channels).T  # interleaved [1, n * C] -> [C, n]
    arr = arr[:, : frame.samples].astype(np.float64)
    if fmt == "u8":
        return (arr - 128.0) / 128.0
    if fmt in _INT_SCALE:
        return arr / _INT_SCALE[fmt]
    if fmt in ("flt", "dbl"):
        return arr
    raise InputError(f"unsupported audio sample format {frame.format.name!r}")


def _as_stream(source: Source, what: str):
    """Path or bytes -> something ``av.open`` / ``Image.open`` can read."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InputError(f"{what} is empty (0 bytes)")
        return io.BytesIO(data)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{what} file not found: {path}")
        if path.stat().st_size == 0:
            raise InputError(f"{what} file is empty (0 bytes): {path}")
        return str(path)
    raise InputError(f"{what} must be a path or bytes, got {type(source).__name__}")


def _reason(exc: BaseException) -> str:
    """A decoder error as the user should read it: FFmpeg's message without its internal errno."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _check_max_seconds(max_seconds: float) -> None:
    if not (isinstance(max_seconds, (int, float)) and max_seconds > 0 and math.isfinite(max_seconds)):
        raise InputError(f"max_seconds must be a positive number, got {max_seconds!r}")


def load_audio(source: Source, max_seconds: float, sample_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Decode any common audio file to float32 mono at ``sample_rate`` (16 kHz).

    1. Open with PyAV; the first audio stream is used.
    2. Reject early from the header duration when it is clearly over ``max_seconds``.
    3. Decode frame by frame -> float, average channels, check finiteness, stream through the
       resampler; stop as soon as more than ``max_seconds`` of audio has been decoded.

    Raises:
        InputError: unreadable / corrupt / non-audio data, empty audio, NaN or inf samples, a
            sample rate outside [4 kHz, 384 kHz], or audio longer than ``max_seconds``.
    """
    import av

    _check_max_seconds(max_seconds)
    stream_src = _as_stream(source, "audio")
    try:
        container = av.open(stream_src, mode="r")
    except Exception as exc:  # noqa: BLE001 - any demuxer failure is bad input
        raise InputError(f"cannot read audio: not a recognised audio file ({_reason(exc)})") from exc
    with container:
        # 1. the first audio stream
        if not container.streams.audio:
            raise InputError("no audio stream found in the input")
        stream = container.streams.audio[0]
        rate_in = stream.codec_context.sample_rate or stream.rate
        if not rate_in or not MIN_SAMPLE_RATE <= rate_in <= MAX_SAMPLE_RATE:
            raise InputError(f"unsupported audio sample rate {rate_in!r} Hz")
        # 2. header duration, when known (tolerate 1 s of header slack; the decoded count decides)
        if stream.duration is not None and stream.time_base is not None:
            header_seconds = float(stream.duration * stream.time_base)
            if header_seconds > max_seconds + 1.0:
                raise InputError(f"audio too long: {header_seconds:.2f} s > limit {max_seconds} s")
        # 3. decode, downmix, resample
        limit = max_seconds * rate_in
        resampler = Resampler(rate_in, sample_rate)
        state = resampler.new_state()
        pieces, decoded = [], 0
        try:
            for frame in container.decode(stream):
                if frame.sample_rate != rate_in:
                    raise InputError(f"sample rate changes mid-stream ({rate_in} -> {frame.sample_rate} Hz)")
                mono = _frame_to_float(frame).mean(axis=0)  # [C, n] -> [n]
                if not np.isfinite(mono).all():
                    raise InputError("audio contains NaN or inf samples")
                decoded += mono.shape[0]
                if decoded > limit:
                    raise InputError(f"audio too long: more than {max_seconds} s")
                pieces.append(resampler.push(state, mono))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoder errors on corrupt data
            raise InputError(f"cannot decode audio: corrupt or truncated data ({_reason(exc)})") from exc
    if decoded == 0:
        raise InputError("audio is empty (no samples decoded)")
    pieces.append(resampler.flush(state))
    return np.concatenate(pieces).astype(np.float32)


def pcm_from_bytes(data: bytes, fmt: str, sample_rate: int, channels: int = 1,
                   max_seconds: float | None = None, target_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Raw little-endian interleaved PCM -> float32 mono at ``target_rate``.

    Args:
        data: the samples, ``channels`` interleaved, no header.
        fmt: ``'pcm16'`` (int16) or ``'f32'`` (float32).
        sample_rate: rate of ``data`` in Hz.
        channels: interleaved channel count (averaged to mono).
        max_seconds: optional duration limit.

    Each call resamples its data as a complete signal; for a live stream at another rate, keep a
    :class:`Resampler` state per session and push the decoded mono chunks instead.
    """
    widths = {"pcm16": 2, "f32": 4}
    if fmt not in widths:
        raise InputError(f"unknown PCM format {fmt!r}; expected one of {sorted(widths)}")
    if not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise InputError(f"channels must be an integer in [1, {MAX_CHANNELS}], got {channels!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"PCM data must be bytes, got {type(data).__name__}")
    frame_bytes = widths[fmt] * channels
    if len(data) == 0:
        raise InputError("PCM data is empty (0 bytes)")
    if len(data) % frame_bytes:
        raise InputError(f"PCM data length {len(data)} is not a multiple of {frame_bytes} bytes "
                         f"({fmt}, {channels} channel(s))")
    resampler = Resampler(sample_rate, target_rate)  # validates the rate
    if max_seconds is not None:
        _check_max_seconds(max_seconds)
        if len(data) // frame_bytes > max_seconds * sample_rate:
            raise InputError(f"audio too long: more than {max_seconds} s")
    if fmt == "pcm16":
        pcm = np.frombuffer(data, dtype="<i2").astype(np.float64) / 32768.0
    else:
        pcm = np.frombuffer(data, dtype="<f4").astype(np.float64)
        if not np.isfinite(pcm).all():
            raise InputError("PCM data contains NaN or inf samples")
    mono = pcm.reshape(-1, channels).mean(axis=1)
    return resampler(mono)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def load_image(source: Source, max_pixels: int) -> np.ndarray:
    """Decode a reference image to uint8 RGB ``[H, W, 3]``.

    1. Identify the format from the header only (JPEG / PNG / WebP / BMP).
    2. Reject images with more than ``max_pixels`` pixels **before** decoding (bomb guard).
    3. Decode fully (truncated data is an error), apply EXIF orientation.
    4. Convert to RGB: alpha composited on white; CMYK, grayscale, palette, 16-bit -> RGB.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise InputError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    src = _as_stream(source, "image")
    # 1. header only
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src, formats=list(IMAGE_FORMATS))
    except Image.DecompressionBombError as exc:
        raise InputError(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"not a supported image (expected one of {', '.join(IMAGE_FORMATS)})") from exc
    except Exception as exc:  # noqa: BLE001 - malformed headers
        raise InputError(f"cannot read image header: {exc}") from exc
    with img:
        # 2. size check from the header
        w, h = img.size
        if w < 1 or h < 1:
            raise InputError(f"image has an invalid size {w}x{h}")
        if w * h > max_pixels:
            raise InputError(f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
        # 3. decode (raises on truncated data), orientation
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
                img = ImageOps.exif_transpose(img)
        except Exception as exc:  # noqa: BLE001 - truncated / corrupt pixel data
            raise InputError(f"cannot decode image: corrupt or truncated data ({exc})") from exc
        # 4. to RGB
        return _to_rgb(img)


def _to_rgb(img) -> np.ndarray:
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
        gray = np.clip(np.round(arr / scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8).copy()
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def size_for_area(h: int, w: int, area: int = 720 * 400, multiple: int = 64) -> tuple[int, int]:
    """Output (H, W) for an ``h x w`` input: multiples of ``multiple``, aspect kept, ``H * W <= area``.

    The reference's rule (``get_size_less_than_area``): scale the image by the largest
    ``s <= min(1, sqrt(area / (h * w)))`` such that rounding each scaled side (floored to pixels)
    **up** to a multiple still fits in ``area``. Here that largest ``s`` is found exactly over the
    scales where a rounded side changes, instead of the reference's 100-step scan. Examples at
    area 720 * 400: 400x720 -> 384x704, 720x400 -> 704x384, square -> 512x512, 4:3 (h > w) -> 640x448.
    Images smaller than ``area`` are not upscaled beyond rounding up to the multiple.
    """
    for name, v in (("h", h), ("w", w), ("area", area), ("multiple", multiple)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    h, w, area, m = int(h), int(w), int(area), int(multiple)
    if m * m > area:
        raise InputError(f"area {area} is smaller than one {m}x{m} tile")

    def rounded(n: int) -> int:  # a floored scaled side rounded up to the multiple (>= one tile)
        return max(m, -(-n // m) * m)

    # 1. at s_max = min(1, sqrt(area / (h w))) the floored sides are exact integer square roots
    if h * w <= area:
        top_h, top_w = h, w
    else:
        top_h, top_w = math.isqrt(area * h // w), math.isqrt(area * w // h)
    if rounded(top_h) * rounded(top_w) <= area:
        return rounded(top_h), rounded(top_w)
    # 2. the rounded sides only change at s = (k m + 1) / side, where the floored side enters the
    #    next multiple; walk those scales downward (exact fractions), the first that fits wins
    breakpoints = {Fraction(n, side) for side in (h, w) for n in range(1, side + 1, m)}
    for s in sorted((b for b in breakpoints if b <= 1 and b * b * h * w <= area), reverse=True):
        out_h, out_w = rounded(math.floor(h * s)), rounded(math.floor(w * s))
        if out_h * out_w <= area:
            return out_h, out_w
    return m, m


def prepare_reference(image_rgb: np.ndarray, height: int, width: int) -> torch.Tensor:  # noqa: F821
    """uint8 RGB ``[h, w, 3]`` -> float32 ``[3, H, W]`` in [-1, 1] for the VAE.

    1. Resize (bilinear, antialiased) so the image covers ``H x W`` with its aspect kept: the
       scale is ``max(H / h, W / w)``; for matching aspect ratios this is "resize the shorter side".
    2. Center-crop to ``H x W`` (the reference crops after resizing the shorter side and would pad
       with black when the other side falls short; covering avoids those bars).
    3. ``x / 127.5 - 1``, channels first.
    """
    import torch  # imported here: the rest of this module is torch-free (the session API uses it)
    from PIL import Image

    if not (isinstance(image_rgb, np.ndarray) and image_rgb.dtype == np.uint8 and image_rgb.ndim == 3
            and image_rgb.shape[2] == 3 and image_rgb.shape[0] > 0 and image_rgb.shape[1] > 0):
        shape = getattr(image_rgb, "shape", None)
        raise InputError(f"reference image must be uint8 [H, W, 3], got {type(image_rgb).__name__} {shape}")
    if height < 1 or width < 1:
        raise InputError(f"target size must be positive, got {height}x{width}")
    h, w = image_rgb.shape[:2]
    # 1. cover-resize
    scale = max(height / h, width / w)
    new_h, new_w = max(height, math.ceil(h * scale - 1e-9)), max(width, math.ceil(w * scale - 1e-9))
    img = Image.fromarray(image_rgb)
    if (new_h, new_w) != (h, w):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    # 2. center crop
    top, left = (new_h - height) // 2, (new_w - width) // 2
    img = img.crop((left, top, left + width, top + height))
    # 3. [-1, 1], channels first  [H, W, 3] -> [3, H, W]
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)
