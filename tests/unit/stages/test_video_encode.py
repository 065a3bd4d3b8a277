"""Block video encoding split from packaging: the decode rank encodes, the packager muxes without re-encoding.

- the packager's output from encoded access units is byte for byte what the packager produced before
  the split (sha256 recorded with the pre-split ``PackageStage`` at commit dc69306, same PyAV build);
- the fragments decode to the same pixels as the access units decoded directly (FFmpeg through PyAV);
- an encoder restarted mid-session has the same codec configuration, and the continued stream decodes
  under the first init segment; a codec configuration that differs goes in-band and still decodes;
- the SPS parser reads the size an independent decoder reports; bad access units and codec
  configurations are rejected clearly; the wire tensors round-trip.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from fractions import Fraction

import av
import numpy as np
import pytest

from pipeline_stages import fmp4
from pipeline_stages.package_stage import PackageInputError, PackageStage, lane_stream_config
from pipeline_stages.video_encode import BlockVideoEncoder
from services.common.messages import WireError, h264_from_tensors, h264_tensors
from tests.unit.stages.test_package_stage import (
    CONFIGS,
    SMALL,
    assert_video_matches,
    block_input,
    decode,
    read_fragment,
)

pytestmark = pytest.mark.unit

#: sha256 of init + 3 fragments + close() of the pre-split PackageStage.push_block (commit dc69306) on
#: ``block_input`` blocks, per (config, start block), and the PyAV build they were recorded with.
PRE_SPLIT_BUILD = ("18.1.0", (62, 28, 102))
PRE_SPLIT_SHA256 = {
    ("64x64-crf", 0): "b638746384049f2907e1e5d0348901127101f94cf92f5899a07dfda25abe1449",
    ("64x64-crf", 2): "d51fe0d66ae394f395eda95093c7e36530304ba472746d90c766d4b2bb902eaa",
    ("128x96-abr", 0): "9b301df90fda84e03365a7ad67ee99b44fda618e1c0a3f3ab9b2b778b5856edf",
    ("128x96-abr", 2): "6e47889bf81a073ef8a9a767b35a80f8b80283479b9250eaaa8149e421ddd4cd",
}


def encoded_stream(cfg, start: int, n_blocks: int, close: bool = True):
    """(init, fragments [+ close()], stage, encoder): blocks encoded by a BlockVideoEncoder, muxed by a
    PackageStage built from its codec configuration alone."""
    enc = BlockVideoEncoder(cfg, start_frame=cfg.block_start_frame(start))
    stage = PackageStage(cfg.width, cfg.height, config=cfg, start_block=start, video_config=enc.codec_config)
    parts = []
    for b in range(start, start + n_blocks):
        frames, audio = block_input(cfg, b)
        parts.append(stage.push_encoded(enc.encode_block(frames).access_units, audio, enc.codec_config))
    if close:
        parts.append(stage.close())
    return stage.init_segment(), parts, stage, enc


def decode_video(data: bytes) -> list[tuple[int, np.ndarray]]:
    """(pts, rgb) of every video frame of an fMP4 byte stream."""
    with av.open(io.BytesIO(data)) as container:
        return [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


def decode_access_units(avcc: bytes, units) -> list[np.ndarray]:
    """Decode AVCC access units with FFmpeg's H.264 decoder directly (no container)."""
    codec = av.CodecContext.create("h264", "r")
    codec.extradata = avcc
    out = []
    for i, unit in enumerate(units):
        packet = av.Packet(unit)
        packet.pts, packet.time_base = i, Fraction(1, 25)
        out += [f.to_ndarray(format="rgb24") for f in codec.decode(packet)]
    out += [f.to_ndarray(format="rgb24") for f in codec.decode(None)]
    return out


@pytest.mark.parametrize("name,start", sorted(PRE_SPLIT_SHA256))
def test_muxed_access_units_equal_the_pre_split_packager_byte_for_byte(name, start):
    if (av.__version__, av.library_versions["libavcodec"]) != PRE_SPLIT_BUILD:
        pytest.skip(f"golden recorded with PyAV {PRE_SPLIT_BUILD}; x264 of another build encodes differently")
    cfg = CONFIGS[name]
    init, parts, stage, _ = encoded_stream(cfg, start, 3)
    assert stage._encoder is None                   # the packager opened no video encoder
    assert hashlib.sha256(init + b"".join(parts)).hexdigest() == PRE_SPLIT_SHA256[name, start]
    # the raw-frames path (the stage's own encoder) gives the same bytes
    raw = PackageStage(cfg.width, cfg.height, config=cfg, start_block=start)
    raw_parts = [raw.push_block(*block_input(cfg, b)) for b in range(start, start + 3)] + [raw.close()]
    assert raw.init_segment() == init and raw_parts == parts


def test_fragments_decode_to_the_pixels_of_the_access_units():
    cfg = SMALL
    enc = BlockVideoEncoder(cfg)
    blocks = [enc.encode_block(block_input(cfg, b)[0]) for b in range(3)]
    direct = decode_access_units(enc.codec_config, [au for blk in blocks for au in blk.access_units])
    stage = PackageStage(cfg.width, cfg.height, config=cfg, video_config=enc.codec_config)
    body = b"".join(stage.push_encoded(blk.access_units, block_input(cfg, b)[1]) for b, blk in enumerate(blocks))
    video, _, _ = decode(stage.init_segment() + body)
    assert len(video) == len(direct) == cfg.block_start_frame(3)
    for (_, muxed), raw in zip(video, direct, strict=True):
        assert np.array_equal(muxed, raw)
    assert [blk.keyframes for blk in blocks] == [(True,) + (False,) * (len(blk.access_units) - 1) for blk in blocks]
    assert [blk.first_frame for blk in blocks] == [cfg.block_start_frame(b) for b in range(3)]


def test_codec_configuration_depends_only_on_the_stream_configuration():
    cfg = lane_stream_config(704, 384, 25, 12)
    configs = {BlockVideoEncoder(replace(cfg, threads=t), start_frame=s).codec_config
               for t in (0, 1, 4) for s in (0, 99)}
    assert len(configs) == 1
    assert BlockVideoEncoder(lane_stream_config(640, 448, 25, 12)).codec_config not in configs


def test_encoder_restart_mid_session_continues_under_the_same_init_segment():
    """Blocks 0-2 from one encoder, 3-5 from a fresh one (a restarted decode rank), muxed by one stage;
    and a packager restarted at block 3 with the new encoder's configuration gives the same init."""
    cfg, k, n = SMALL, 3, 6
    first = BlockVideoEncoder(cfg)
    stage = PackageStage(cfg.width, cfg.height, config=cfg, video_config=first.codec_config)
    fragments = []
    for b in range(n):
        if b == k:
            first = BlockVideoEncoder(cfg, start_frame=cfg.block_start_frame(k))
        frames, audio = block_input(cfg, b)
        fragments.append(stage.push_encoded(first.encode_block(frames).access_units, audio, first.codec_config))
    assert stage.state.inband_parameter_sets == 0   # same configuration: nothing in-band
    video, _, _ = decode(stage.init_segment() + b"".join(fragments))
    assert_video_matches(cfg, video, 0, cfg.block_start_frame(n))

    # the packager restarts too (its audio restarts: video only is compared across the switch)
    restarted_init, restarted, _, _ = encoded_stream(cfg, k, n - k)
    assert restarted_init == stage.init_segment()
    assert_video_matches(cfg, decode_video(stage.init_segment() + b"".join(fragments[:k]) + b"".join(restarted)),
                         0, cfg.block_start_frame(n))


def test_a_different_codec_configuration_goes_in_band_and_still_decodes():
    cfg = SMALL                                     # ultrafast: Baseline profile
    other = BlockVideoEncoder(replace(cfg, preset="veryfast"), start_frame=cfg.block_start_frame(2))  # High
    assert other.codec_config != BlockVideoEncoder(cfg).codec_config
    init, parts, stage, _ = encoded_stream(cfg, 0, 2, close=False)
    for b in (2, 3):
        frames, audio = block_input(cfg, b)
        parts.append(stage.push_encoded(other.encode_block(frames).access_units, audio, other.codec_config))
    parts.append(stage.close())
    assert stage.state.inband_parameter_sets == 2 and stage.init_segment() == init
    types = [fmp4.nal_type(nal) for nal in fmp4.avcc_nal_units(read_fragment(parts[2])["tracks"][1]["samples"][0][2])]
    assert types[:2] == [fmp4.NAL_SPS, fmp4.NAL_PPS] and fmp4.NAL_IDR in types
    video, _, _ = decode(init + b"".join(parts))
    assert_video_matches(cfg, video, 0, cfg.block_start_frame(4))


@pytest.mark.parametrize("width,height,preset", [(64, 64, "ultrafast"), (100, 50, "ultrafast"), (66, 30, "veryfast"),
                                                 (704, 384, "veryfast"), (640, 448, "veryfast")])
def test_sps_dimensions_match_the_decoder(width, height, preset):
    enc = BlockVideoEncoder(replace(lane_stream_config(width, height, 25, 12), preset=preset))
    assert fmp4.sps_dimensions(enc.sps) == (width, height)
    frames = np.full((1, height, width, 3), 128, np.uint8)
    (decoded,) = decode_access_units(enc.codec_config, enc.encode_block(frames).access_units)
    assert decoded.shape == (height, width, 3)


def _block(cfg, b=0):
    enc = BlockVideoEncoder(cfg, start_frame=cfg.block_start_frame(b))
    frames, audio = block_input(cfg, b)
    return enc, list(enc.encode_block(frames).access_units), audio


@pytest.mark.parametrize("mutate,message", [
    (lambda u: u[:-1], "access units"),                                  # a frame missing
    (lambda u: u[1:] + u[:1], "IDR"),                                    # does not start with the IDR
    (lambda u: [u[0][:-3]] + u[1:], "bad H.264 data"),                   # truncated NAL unit
    (lambda u: [b""] + u[1:], "bad H.264 data"),                         # empty access unit
])
def test_bad_access_units_are_rejected(mutate, message):
    cfg = SMALL
    enc, units, audio = _block(cfg)
    stage = PackageStage(cfg.width, cfg.height, config=cfg, video_config=enc.codec_config)
    with pytest.raises(PackageInputError, match=message):
        stage.push_encoded(mutate(units), audio, enc.codec_config)
    assert stage.state.next_block == 0              # nothing consumed: the good block still goes in
    assert stage.push_encoded(units, audio, enc.codec_config)


@pytest.mark.parametrize("config,message", [
    (lambda c: c[:9], "codec configuration"),
    (lambda c: b"", "codec configuration"),
    (lambda c: BlockVideoEncoder(SMALL.tiny(width=128, height=96)).codec_config, "128x96"),
])
def test_bad_codec_configuration_is_rejected(config, message):
    cfg = SMALL
    with pytest.raises(PackageInputError, match=message):
        PackageStage(cfg.width, cfg.height, config=cfg, video_config=config(BlockVideoEncoder(cfg).codec_config))


def test_wire_tensors_round_trip_and_reject_inconsistent_sizes():
    enc, units, _ = _block(SMALL)
    tensors = h264_tensors(units, enc.codec_config)
    assert h264_from_tensors(tensors) == (units, enc.codec_config)
    bad = dict(tensors, h264_sizes=h264_tensors(units[:-1], enc.codec_config)["h264_sizes"])
    with pytest.raises(WireError, match="do not split"):
        h264_from_tensors(bad)
    with pytest.raises(WireError, match="without tensor"):
        h264_from_tensors({"h264": tensors["h264"]})
