"""Stream packaging: frames + 16 kHz audio -> fragmented MP4 (H.264 + AAC) that decoders accept.

Every check decodes the produced bytes with an independent decoder (FFmpeg through PyAV, or the
ffprobe binary) or parses the boxes with the small reader below, and compares against the input
(analytic test pictures and an analytic chirp evaluated at the output sample rate).
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import struct
import subprocess

import av
import numpy as np
import pytest

from pipeline_stages.package_stage import PackageConfig, PackageInputError, PackageStage, PolyphaseUpsampler
from tests.numerics import assert_close_dtype

pytestmark = pytest.mark.unit

N_BLOCKS = 6
#: PSNR floor for decoded vs input pictures. At CRF 23 the smooth test pictures decode at >= 35 dB;
#: a one-frame timing slip gives <= 30 dB and a BT.601/BT.709 matrix mix-up <= 29 dB (measured
#: with these pictures), so 32 dB tells a correct stream from those faults.
PSNR_FLOOR_DB = 32.0
#: RMS error floor for decoded audio vs the ideal 32 kHz chirp (amplitude 0.3, RMS 0.21). 64 kbit/s
#: AAC stays well below it; a one-sample misalignment at 1-2 kHz already exceeds it.
AUDIO_RMS_TOL = 0.01

CONFIGS = {
    "64x64-crf": PackageConfig.tiny(),
    "128x96-abr": PackageConfig.tiny(width=128, height=96, crf=None, video_bitrate=400_000),
}
SMALL = CONFIGS["64x64-crf"]


# ---- synthetic input ---------------------------------------------------------------------------


def picture(frame: int, height: int, width: int) -> np.ndarray:
    """Smooth, colourful test picture moving with the absolute frame index. [H, W, 3] uint8."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 128 + 100 * np.sin(2 * np.pi * (xx + 3 * frame) / width)
    g = 128 + 100 * np.sin(2 * np.pi * (yy - 2 * frame) / height)
    b = 128 + 80 * np.cos(2 * np.pi * (xx + yy + 4 * frame) / (width + height))
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def chirp(start: int, count: int, rate: int) -> np.ndarray:
    """0.3 * sin of a 150 Hz + 300 Hz/s sweep, at absolute samples [start, start + count) of ``rate``."""
    t = np.arange(start, start + count, dtype=np.float64) / rate
    return 0.3 * np.sin(2 * np.pi * (150.0 * t + 150.0 * t * t))


def block_input(cfg: PackageConfig, block: int) -> tuple[np.ndarray, np.ndarray]:
    first, count = cfg.block_start_frame(block), cfg.frames_in_block(block)
    frames = np.stack([picture(first + i, cfg.height, cfg.width) for i in range(count)])
    audio = chirp(first * cfg.samples_in_per_frame, count * cfg.samples_in_per_frame, cfg.audio_rate_in)
    return frames, audio.astype(np.float32)


@functools.cache
def encode_stream(cfg: PackageConfig, start_block: int = 0, n_blocks: int = N_BLOCKS):
    """(init segment, [fragment per block], closing fragment) of one stream."""
    stage = PackageStage(cfg.width, cfg.height, config=cfg, start_block=start_block)
    init = stage.init_segment()
    fragments = [stage.push_block(*block_input(cfg, b)) for b in range(start_block, start_block + n_blocks)]
    return init, fragments, stage.close()


# ---- independent readers -----------------------------------------------------------------------


def decode(data: bytes):
    """Decode every video and audio frame: (list of (pts, rgb)), (first audio pts, pcm float64)."""
    with av.open(io.BytesIO(data)) as container:
        video = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    with av.open(io.BytesIO(data)) as container:
        audio = [(f.pts, f.to_ndarray()[0].astype(np.float64)) for f in container.decode(audio=0)]
    for (pts, pcm), (next_pts, _) in zip(audio, audio[1:], strict=False):
        assert next_pts == pts + len(pcm), "decoded audio is not contiguous"
    return video, audio[0][0], np.concatenate([pcm for _, pcm in audio])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, box end) of each box in data[start:end]."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        assert size >= 8, f"bad box size {size}"
        yield kind.decode(), pos + 8, pos + size
        pos += size


def read_fragment(fragment: bytes) -> dict:
    """Sequence number and, per track id, tfdt and samples (duration, flags, bytes) of moof + mdat."""
    top = list(boxes(fragment))
    assert [kind for kind, _, _ in top] == ["moof", "mdat"]
    _, moof_start, moof_end = top[0]
    moof_offset = moof_start - 8
    out = {"tracks": {}}
    for kind, start, end in boxes(fragment, moof_start, moof_end):
        if kind == "mfhd":
            out["seq"] = struct.unpack_from(">I", fragment, start + 4)[0]
        if kind != "traf":
            continue
        track = {}
        for sub, s, _ in boxes(fragment, start, end):
            if sub == "tfhd":
                flags = struct.unpack_from(">I", fragment, s)[0] & 0xFFFFFF
                assert flags & 0x020000, "expected default-base-is-moof"
                track_id = struct.unpack_from(">I", fragment, s + 4)[0]
            elif sub == "tfdt":
                version = fragment[s]
                track["tfdt"] = struct.unpack_from(">Q" if version == 1 else ">I", fragment, s + 4)[0]
            elif sub == "trun":
                flags = struct.unpack_from(">I", fragment, s)[0] & 0xFFFFFF
                assert flags == 0x000701, "test reader expects offset + duration/size/flags per sample"
                count, offset = struct.unpack_from(">Ii", fragment, s + 4)
                pos, data_pos, samples = s + 12, moof_offset + offset, []
                for _ in range(count):
                    duration, size, sample_flags = struct.unpack_from(">III", fragment, pos)
                    samples.append((duration, sample_flags, fragment[data_pos : data_pos + size]))
                    pos, data_pos = pos + 12, data_pos + size
                track["samples"] = samples
        out["tracks"][track_id] = track
    return out


def nal_types(avcc_sample: bytes) -> list[int]:
    """NAL unit types of one AVCC (4-byte length-prefixed) access unit."""
    types, pos = [], 0
    while pos < len(avcc_sample):
        (length,) = struct.unpack_from(">I", avcc_sample, pos)
        assert length > 0 and pos + 4 + length <= len(avcc_sample), "bad NAL length prefix"
        types.append(avcc_sample[pos + 4] & 0x1F)
        pos += 4 + length
    return types


def assert_video_matches(cfg, video, first_frame: int, count: int):
    ticks = 90_000 // cfg.fps  # the decoded stream's time base is the track time scale, 1/90000
    assert len(video) == count
    assert [pts for pts, _ in video] == [(first_frame + i) * ticks for i in range(count)]
    for i, (_, rgb) in enumerate(video):
        quality = psnr(rgb, picture(first_frame + i, cfg.height, cfg.width))
        assert quality > PSNR_FLOOR_DB, f"frame {first_frame + i}: PSNR {quality:.1f} dB"


def audio_error(cfg, first_pts: int, pcm: np.ndarray, skip: int) -> float:
    """RMS error of decoded audio vs the ideal chirp at the decoded timestamps (ignoring ``skip`` samples)."""
    reference = chirp(first_pts, len(pcm), cfg.audio_rate_out)
    return float(np.sqrt(np.mean((pcm[skip:] - reference[skip:]) ** 2)))


# ---- tests -------------------------------------------------------------------------------------


def test_upsampler_is_band_limited_and_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    n = 4000
    t16 = np.arange(n) / 16_000
    x = 0.4 * np.sin(2 * np.pi * 440 * t16 + 0.3) + 0.3 * np.sin(2 * np.pi * 3000 * t16 + 1.1)

    one_shot = PolyphaseUpsampler(2, 16, 8.0)
    full = np.concatenate([one_shot.push(x), one_shot.flush()])
    streaming = PolyphaseUpsampler(2, 16, 8.0)
    cuts = np.sort(rng.choice(np.arange(1, n), size=7, replace=False))
    chunks = [streaming.push(part) for part in np.split(x, cuts)] + [streaming.flush()]
    assert len(full) == 2 * n
    # The chunks multiply windows of other row counts by the taps, so the BLAS may sum each 32-tap dot
    # product in another order: equal up to rounding (tests/numerics.py, scale = the largest sum of
    # |x[n + j] * h_r[j]|).
    taps = one_shot.taps  # [2 * half, L]
    assert_close_dtype(np.concatenate(chunks), full, ops=taps.shape[0],
                       scale=float(np.abs(x).max() * np.abs(taps).sum(axis=0).max()))

    # The even outputs are the inputs, exactly: the phase-0 taps are one 1.0 and zeros, so any
    # summation order gives x[n]. The odd ones are the band-limited signal between them
    # (the float64 analytic tones at 32 kHz), away from the silent edges before and after.
    np.testing.assert_array_equal(full[0::2], x)
    t32 = np.arange(2 * n) / 32_000
    ideal = 0.4 * np.sin(2 * np.pi * 440 * t32 + 0.3) + 0.3 * np.sin(2 * np.pi * 3000 * t32 + 1.1)
    assert np.max(np.abs(full[64:-64] - ideal[64:-64])) < 2e-3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_whole_stream_decodes_to_input_frames_and_synced_audio(name):
    cfg = CONFIGS[name]
    init, fragments, tail = encode_stream(cfg)
    video, audio_start, pcm = decode(init + b"".join(fragments) + tail)

    n_frames = cfg.block_start_frame(N_BLOCKS)  # 9 + 5 * 12
    assert_video_matches(cfg, video, 0, n_frames)

    # Audio starts at presentation time 0 and lasts as long as the input, within one AAC frame.
    input_samples = n_frames * cfg.samples_out_per_frame
    assert audio_start == 0
    assert abs(len(pcm) - input_samples) < 1024
    # In sync: the decoded chirp matches the ideal one at its own timestamps, and the
    # cross-correlation with the input peaks at lag 0 (the chirp has a single sharp peak).
    assert audio_error(cfg, 0, pcm[:input_samples], skip=0) < AUDIO_RMS_TOL
    reference = chirp(0, input_samples, cfg.audio_rate_out)
    window, max_lag = reference[4096:-4096], 2048
    correlation = np.correlate(pcm[4096 - max_lag : input_samples - 4096 + max_lag], window, mode="valid")
    assert int(np.argmax(correlation)) - max_lag == 0


def test_fragments_have_increasing_sequence_continuous_times_and_idr_starts():
    cfg = SMALL
    init, fragments, tail = encode_stream(cfg)
    parsed = [read_fragment(f) for f in fragments]
    assert [p["seq"] for p in parsed] == list(range(1, N_BLOCKS + 1))
    assert read_fragment(tail)["seq"] == N_BLOCKS + 1
    assert list(read_fragment(tail)["tracks"]) == [2]  # audio only: the flushed encoder tail

    video_time, audio_time = 0, None
    for block, p in enumerate(parsed):
        video, audio = p["tracks"][1], p["tracks"][2]
        # Video tfdt = absolute time of the block's first frame; durations fill the block.
        assert video["tfdt"] == video_time == cfg.block_start_frame(block) * 3600
        assert len(video["samples"]) == cfg.frames_in_block(block)
        video_time += sum(duration for duration, _, _ in video["samples"])
        # Each block opens with an IDR access unit and has no other; no in-band SPS/PPS.
        types = [nal_types(data) for _, _, data in video["samples"]]
        assert 5 in types[0] and all(5 not in t for t in types[1:])
        assert all(7 not in t and 8 not in t for t in types)
        assert [flags == 0x02000000 for _, flags, _ in video["samples"]] == [True] + [False] * (len(types) - 1)
        # Audio decode times continue from the previous fragment; after block 0 the AAC grid is
        # aligned with the block grid, so each 0.48 s block carries exactly 15 frames of 1024.
        if audio_time is not None:
            assert audio["tfdt"] == audio_time
        audio_time = audio["tfdt"] + sum(duration for duration, _, _ in audio["samples"])
        if block > 0:
            assert len(audio["samples"]) == 15
    assert read_fragment(tail)["tracks"][2]["tfdt"] == audio_time


def test_one_middle_fragment_plays_on_its_own():
    cfg = SMALL
    init, fragments, _ = encode_stream(cfg)
    block = 3
    video, audio_start, pcm = decode(init + fragments[block])
    assert_video_matches(cfg, video, cfg.block_start_frame(block), cfg.block_frames)
    # Its audio decodes at the right absolute time (the decoder's first frame lacks the previous
    # frame's overlap, so the first 1024 samples are not compared).
    block_start = cfg.block_start_frame(block) * cfg.samples_out_per_frame
    assert abs(audio_start - block_start) < 2 * 1024
    assert audio_error(cfg, audio_start, pcm, skip=1024) < AUDIO_RMS_TOL


def test_restart_at_block_k_keeps_absolute_timestamps():
    cfg = SMALL
    k = 2
    init, fragments, _ = encode_stream(cfg)
    init_k, fragments_k, tail_k = encode_stream(cfg, start_block=k, n_blocks=N_BLOCKS - k)
    # Same session -> same init segment; the restarted fragments carry the same numbers and video
    # times. Both streams use the same AAC frame grid, so every restarted audio run ends where the
    # original's does; only the first one starts later (a fresh encoder has no earlier audio).
    assert init_k == init
    for i, (original, restarted) in enumerate(zip(fragments[k:], fragments_k, strict=True)):
        a, b = read_fragment(original), read_fragment(restarted)
        assert a["seq"] == b["seq"] == k + i + 1
        assert a["tracks"][1]["tfdt"] == b["tracks"][1]["tfdt"]
        audio_a, audio_b = a["tracks"][2], b["tracks"][2]
        end = [run["tfdt"] + sum(d for d, _, _ in run["samples"]) for run in (audio_a, audio_b)]
        assert end[0] == end[1]
        if i > 0:
            assert audio_a["tfdt"] == audio_b["tfdt"]

    video, audio_start, pcm = decode(init_k + b"".join(fragments_k) + tail_k)
    first = cfg.block_start_frame(k)
    assert_video_matches(cfg, video, first, cfg.block_start_frame(N_BLOCKS) - first)
    start = first * cfg.samples_out_per_frame
    assert abs(audio_start - start) < 1024
    end = cfg.block_start_frame(N_BLOCKS) * cfg.samples_out_per_frame
    assert abs(audio_start + len(pcm) - end) < 1024
    assert audio_error(cfg, audio_start, pcm[: end - audio_start], skip=1024) < AUDIO_RMS_TOL


def test_ffprobe_sees_h264_25fps_and_aac(tmp_path):
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        pytest.skip("ffprobe is not installed (Debian package ffmpeg); the PyAV decode tests still run")
    cfg = SMALL
    init, fragments, tail = encode_stream(cfg)
    path = tmp_path / "stream.mp4"
    path.write_bytes(init + b"".join(fragments) + tail)
    result = subprocess.run(
        [ffprobe, "-v", "error", "-count_frames", "-print_format", "json", "-show_streams", "-show_format", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    info = json.loads(result.stdout)
    video, audio = info["streams"]
    assert (video["codec_name"], video["pix_fmt"], video["width"], video["height"]) == ("h264", "yuv420p", 64, 64)
    assert video["r_frame_rate"] == "25/1" and video["avg_frame_rate"] == "25/1"
    n_frames = cfg.block_start_frame(N_BLOCKS)
    assert int(video["nb_read_frames"]) == n_frames
    assert (audio["codec_name"], int(audio["sample_rate"]), audio["channels"]) == ("aac", 32_000, 1)
    assert abs(float(info["format"]["duration"]) - n_frames / cfg.fps) < cfg.block_frames / cfg.fps


def _stage(**kwargs) -> PackageStage:
    return PackageStage(64, 64, config=PackageConfig.tiny(), **kwargs)


def _closed_stage() -> PackageStage:
    stage = _stage()
    stage.close()
    return stage


GOOD_FRAMES, GOOD_AUDIO = block_input(SMALL, 0)
BAD_BLOCKS = {
    "float frames": (GOOD_FRAMES.astype(np.float32), GOOD_AUDIO, "uint8"),
    "no batch axis": (GOOD_FRAMES[0], GOOD_AUDIO, r"shape \[T, 64, 64, 3\]"),
    "channels first": (GOOD_FRAMES.transpose(0, 3, 1, 2), GOOD_AUDIO, r"shape \[T, 64, 64, 3\]"),
    "rgba": (np.concatenate([GOOD_FRAMES, GOOD_FRAMES[..., :1]], axis=-1), GOOD_AUDIO, r"shape \[T, 64, 64, 3\]"),
    "12 frames in block 0": (np.concatenate([GOOD_FRAMES, GOOD_FRAMES[:3]]), GOOD_AUDIO, "must have 9 frames"),
    "float64 audio": (GOOD_FRAMES, GOOD_AUDIO.astype(np.float64), "float32"),
    "short audio": (GOOD_FRAMES, GOOD_AUDIO[:-1], r"audio must have shape \[5760\]"),
    "stereo audio": (GOOD_FRAMES, np.stack([GOOD_AUDIO, GOOD_AUDIO]), r"audio must have shape \[5760\]"),
    "nan audio": (GOOD_FRAMES, np.where(np.arange(5760) == 7, np.nan, GOOD_AUDIO).astype(np.float32), "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_BLOCKS))
def test_bad_block_is_rejected_clearly(case):
    frames, audio, message = BAD_BLOCKS[case]
    stage = _stage()
    with pytest.raises(PackageInputError, match=message):
        stage.push_block(frames, audio)
    # The stage is untouched and still takes the correct block 0.
    assert read_fragment(stage.push_block(GOOD_FRAMES, GOOD_AUDIO))["seq"] == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PackageStage(63, 64), "even"),
        (lambda: PackageStage(64, 0), "height must be a positive integer"),
        (lambda: PackageStage(64, 64, fps=7), "fps must divide"),
        (lambda: PackageStage(64, 64, audio_rate_in=44_100), "audio"),
        (lambda: PackageStage(64, 64, crf=None), "crf or video_bitrate"),
        (lambda: PackageStage(64, 64, preset="warp"), "preset must be one of"),
        (lambda: PackageStage(128, 64, config=PackageConfig.tiny()), "differs from the config"),
        (lambda: _stage(start_block=-1), "start_block"),
        (lambda: _closed_stage().push_block(GOOD_FRAMES, GOOD_AUDIO), "after close"),
    ],
)
def test_bad_configuration_or_call_order_is_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()
