"""Every topic's largest message at the reference size fits its ``max.message.bytes``, and the clients fit it.

The messages are built with the real wire encoder (``services.common.messages.encode``) at the
reference configuration (704x384 video, 12 frames and 7,680 samples per block, 25 x 1,024 wav2vec2
features); the ``frames`` message (a block already H.264-encoded by the decode rank's encoder) and the
fMP4 fragment are encoded from uniform noise frames, the worst case for H.264, with the services'
encoder settings. Each must fit the topic's limit with room for Kafka's record and batch overhead, the chart must
declare the same limits, and the producer's request limit and the consumer's fetch limit must hold the
largest one.
"""

from __future__ import annotations

import numpy as np
import pytest

from infra import topics
from services.common import kafka as kafka_mod
from services.common.messages import AudioIn, Features, Frames, Media, Tensor, encode, h264_tensors
from services.session_api.bus import CHUNK_SAMPLES
from services.session_api.schemas import SessionOptions

pytestmark = pytest.mark.unit

#: Kafka's per-record and per-batch overhead is under 100 bytes; keys are session ids (<= 64 bytes).
RECORD_OVERHEAD = 1024
SID, TENANT = "s" * 64, "t" * 64


@pytest.fixture(scope="module")
def reference():
    """The reference configuration and its largest frame: of all sizes the area rule allows (H, W
    multiples of 64, H*W <= area), the one with the most pixels (448x640, more than the default 384x704)."""
    from models.liveavatar import LiveAvatarConfig

    cfg = LiveAvatarConfig.reference()
    m = cfg.size_multiple
    sizes = [(h, w) for h in range(m, cfg.area // m + 1, m) for w in range(m, cfg.area // h + 1, m)]
    height, width = max(sizes, key=lambda hw: (hw[0] * hw[1], hw))
    return cfg, height, width


def largest_audio() -> int:
    chunk = encode(AudioIn(session_id=SID, tenant_id=TENANT, seq=2**40, kind="pcm"),
                   {"pcm": Tensor.from_numpy(np.zeros(CHUNK_SAMPLES, np.float32))})
    options = SessionOptions(prompt="x" * SessionOptions.model_fields["prompt"].metadata[0].max_length).model_dump()
    start = encode(AudioIn(session_id=SID, tenant_id=TENANT, seq=0, kind="start", options=options))
    return max(len(chunk), len(start))


def largest_features(cfg) -> int:
    feats = np.zeros((1, cfg.audio.num_states, cfg.audio.hidden_size, cfg.audio.block_frames), np.float32)
    pcm = np.zeros(cfg.audio.block_frames * cfg.audio.sample_rate // cfg.fps, np.float32)
    return len(encode(Features(session_id=SID, tenant_id=TENANT, seq=2**40, kind="block", lane_id="l" * 64),
                      {"features": Tensor.from_numpy(feats), "pcm": Tensor.from_numpy(pcm)}))


def frames_messages(cfg, height: int, width: int) -> tuple[int, int]:
    """(largest encoded ``frames`` message of noise, the raw-frames message of the same block): the lane's
    encoder (:func:`lane_stream_config`) on uniform RGB noise, the first block (IDR + x264's SEI) and
    the second."""
    from pipeline_stages.package_stage import lane_stream_config
    from pipeline_stages.video_encode import BlockVideoEncoder

    t = cfg.audio.block_frames
    enc = BlockVideoEncoder(lane_stream_config(width, height, cfg.fps, t))
    rng = np.random.default_rng(0)
    pcm = Tensor.from_numpy(np.zeros(t * cfg.audio.sample_rate // cfg.fps, np.float32))
    header = Frames(session_id=SID, tenant_id=TENANT, seq=2**40, kind="block", lane_id="l" * 64)
    sizes = []
    for _ in range(2):
        frames = rng.integers(0, 256, (t, height, width, 3), dtype=np.uint8)
        block = enc.encode_block(frames)
        sizes.append(len(encode(header, {**h264_tensors(block.access_units, enc.codec_config), "pcm": pcm})))
    raw = len(encode(header, {"frames": Tensor.from_numpy(frames), "pcm": pcm}))
    return max(sizes), raw


def noise_fragment(cfg, height: int, width: int) -> int:
    from pipeline_stages.package_stage import make_package_stage

    stage = make_package_stage(width, height, cfg.fps, cfg.audio.block_frames)
    rng = np.random.default_rng(0)
    stage.init_segment()
    sizes = []
    for _ in range(2):   # the first block is an IDR; the second shows P frames of noise
        frames = rng.integers(0, 256, (cfg.audio.block_frames, height, width, 3), dtype=np.uint8)
        audio = rng.uniform(-1, 1, cfg.audio.block_frames * cfg.audio.sample_rate // cfg.fps).astype(np.float32)
        data = stage.push_block(frames, audio)
        sizes.append(len(encode(Media(session_id=SID, tenant_id=TENANT, seq=2**40, kind="fragment"),
                                {"data": Tensor("uint8", (len(data),), data)})))
    return max(sizes)


def test_reference_size_is_the_one_the_limits_were_derived_for(reference):
    cfg, height, width = reference
    assert height * width == 286_720 and height * width >= 384 * 704
    assert (cfg.audio.num_states, cfg.audio.hidden_size, cfg.audio.block_frames) == (25, 1024, 12)


def test_audio_and_features_fit(reference):
    cfg, _, _ = reference
    assert largest_audio() + RECORD_OVERHEAD <= topics.MAX_MESSAGE_BYTES[topics.AUDIO]
    assert largest_features(cfg) + RECORD_OVERHEAD <= topics.MAX_MESSAGE_BYTES[topics.AUDIO_FEATURES]


def test_encoded_frames_of_noise_fit_with_the_safety_factor_and_raw_frames_would_not(reference):
    cfg, height, width = reference
    size, raw = frames_messages(cfg, height, width)
    limit = topics.MAX_MESSAGE_BYTES[topics.FRAMES]
    assert 500_000 < size < 2_000_000  # noise at CRF 23: ~1.2 MB (docstring of infra/topics.py)
    assert size * topics.FRAMES_SAFETY + RECORD_OVERHEAD <= limit
    assert raw > 9_700_000 > limit     # 12 x 448 x 640 x 3 bytes of raw frames would not fit


def test_a_fragment_of_noise_fits_and_stays_under_raw_yuv(reference):
    cfg, height, width = reference
    raw_yuv420 = cfg.audio.block_frames * height * width * 3 // 2
    size = noise_fragment(cfg, height, width)
    assert size <= raw_yuv420 + 64 * 1024     # H.264 never needs more than raw 4:2:0 (I_PCM), plus AAC + boxes
    assert raw_yuv420 + 64 * 1024 + RECORD_OVERHEAD <= topics.MAX_MESSAGE_BYTES[topics.MEDIA]


def test_the_local_topics_and_the_clients_carry_the_limits(monkeypatch):
    specs = {s.name: s for s in topics.all_topics()}
    for topic, limit in topics.MAX_MESSAGE_BYTES.items():
        spec = specs[topics.name(topic)]
        assert spec.max_message_bytes == limit
        assert kafka_mod.new_topic(spec).topic_configs["max.message.bytes"] == str(limit)
    seen = {}
    monkeypatch.setattr(kafka_mod, "KafkaProducer", lambda **cfg: seen.setdefault("producer", cfg))
    monkeypatch.setattr(kafka_mod, "KafkaConsumer", lambda **cfg: seen.setdefault("consumer", cfg))
    kafka_mod.make_producer("127.0.0.1:1")
    kafka_mod.make_consumer("127.0.0.1:1", None)
    largest = max(topics.MAX_MESSAGE_BYTES.values())
    assert seen["producer"]["max_request_size"] >= largest
    assert seen["consumer"]["max_partition_fetch_bytes"] >= largest
    assert seen["consumer"]["fetch_max_bytes"] >= largest


def test_the_chart_declares_the_same_topics_and_limits():
    pytest.importorskip("yaml")
    from tests.unit.chart import chartlib as cl

    items = cl.merged_values("default")["kafka"]["topics"]["items"]
    chart = {t["name"]: t["maxMessageBytes"] for t in items.values()}
    assert chart == dict(topics.MAX_MESSAGE_BYTES)
