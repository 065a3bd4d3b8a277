"""The Kafka topics of the platform, defined once: names, partitions, keys and retention.

| topic            | key        | producer        | consumer (group)                 | carries                            |
| ---------------- | ---------- | --------------- | -------------------------------- | ---------------------------------- |
| audio            | session id | session API     | audio-encoder (group)            | session start, PCM chunks, end     |
| audio-features   | session id | audio-encoder   | lane head k: partition k only    | per-block features + PCM, start/end|
| frames           | session id | lane decoder    | stream-packager (group)          | H.264 access units + PCM per block |
| media            | session id | stream-packager | session API (each replica)       | fMP4 init segment and fragments    |
| events           | session id | session API,    | webhooks dispatcher (group)      | product events (JSON) for signed   |
|                  |            | stream-packager |                                  | webhooks (docs/webhooks.md)        |

``audio-features`` is partitioned by lane: lane k owns partition k, so the encoder addresses a lane by
writing to its partition, and a lane's blocks stay in order. Its partition count is therefore the most
lanes one cluster can run (the broker cannot add partitions later; choose it generously).
Every other topic is keyed by session id: one session's messages stay in one partition, in order.

Message sizes. Each topic has an explicit ``max.message.bytes`` (:data:`MAX_MESSAGE_BYTES`): the largest
message it carries at the reference size (the area rule's largest frame, 448x640 pixels; 12 frames per
block; wav2vec2-large features), with
headroom; ``tests/unit/test_topic_sizes.py`` builds those messages with the real encoders and checks
that each fits, and that the clients' request and fetch limits (:data:`CLIENT_MAX_MESSAGE_BYTES`) hold
the largest topic limit.

``frames`` carries each block already H.264-encoded by the lane's decode rank (a block of raw RGB
frames would be 9.7 to 10.3 MB at the reference size). Its bound comes from the encoder settings the
services use (``pipeline_stages.package_stage.lane_stream_config``: x264 ``veryfast``, CRF 23, no VBV,
one IDR per block; CRF mode has no level bitrate cap, so the level gives no bound): the densest content
for H.264 is uniform RGB noise, which measures 1.21 MB per block at 448x640 (1.16 MB at 704x384;
realistic generated content is 30-60 kB). With a safety factor of 3 (:data:`FRAMES_SAFETY`) that is
3.7 MB, under the 4 MiB limit; ``tests/unit/test_topic_sizes.py`` encodes the noise blocks and checks
it. Not covered: a lower CRF than the services use (lossless x264 on noise needs 5.9 MB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

AUDIO = "audio"
AUDIO_FEATURES = "audio-features"
FRAMES = "frames"
MEDIA = "media"
EVENTS = "events"

#: Most lanes per cluster (= partitions of audio-features). Override with LIVEAVATAR_MAX_LANES.
DEFAULT_MAX_LANES = 16
DEFAULT_PARTITIONS = 8
HOUR_MS = 3_600_000
MiB = 1 << 20

#: ``max.message.bytes`` per topic (reference size; derivations in tests/unit/test_topic_sizes.py).
MAX_MESSAGE_BYTES = {
    AUDIO: 1 * MiB,            # 200 ms PCM chunks (12.8 kB) and session events
    AUDIO_FEATURES: 4 * MiB,   # one block's features [1, 25, 1024, 12] float32 (1.2 MB) + its PCM
    FRAMES: 4 * MiB,           # one block of H.264 (noise, the worst case: 1.21 MB) x FRAMES_SAFETY + PCM
    MEDIA: 8 * MiB,            # one fMP4 fragment: H.264 never needs more than raw YUV 4:2:0 (5.2 MB)
    EVENTS: 1 * MiB,           # one product event: small JSON (services.common.events caps it at 64 KiB)
}
#: How many times the largest measured ``frames`` message (a block of noise) its limit must hold.
FRAMES_SAFETY = 3
#: Producer ``max_request_size`` and consumer ``max_partition_fetch_bytes``: the largest topic limit.
CLIENT_MAX_MESSAGE_BYTES = max(MAX_MESSAGE_BYTES.values())


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its name, partition count, retention and largest message (created by
    ``services.common.kafka.ensure_topics``)."""

    name: str
    partitions: int
    retention_ms: int = HOUR_MS
    max_message_bytes: int = 1 * MiB


def topic_prefix() -> str:
    """Optional prefix (``LIVEAVATAR_TOPIC_PREFIX``) so several stacks can share one cluster."""
    return os.environ.get("LIVEAVATAR_TOPIC_PREFIX", "")


def name(topic: str) -> str:
    return topic_prefix() + topic


def all_topics(max_lanes: int | None = None, partitions: int | None = None) -> list[TopicSpec]:
    lanes = max_lanes or int(os.environ.get("LIVEAVATAR_MAX_LANES", DEFAULT_MAX_LANES))
    parts = partitions or int(os.environ.get("LIVEAVATAR_TOPIC_PARTITIONS", DEFAULT_PARTITIONS))
    return [
        TopicSpec(name(AUDIO), parts, retention_ms=HOUR_MS, max_message_bytes=MAX_MESSAGE_BYTES[AUDIO]),
        TopicSpec(name(AUDIO_FEATURES), lanes, retention_ms=HOUR_MS,
                  max_message_bytes=MAX_MESSAGE_BYTES[AUDIO_FEATURES]),
        TopicSpec(name(FRAMES), parts, retention_ms=HOUR_MS // 4,   # large values: keep for 15 min
                  max_message_bytes=MAX_MESSAGE_BYTES[FRAMES]),
        TopicSpec(name(MEDIA), parts, retention_ms=HOUR_MS, max_message_bytes=MAX_MESSAGE_BYTES[MEDIA]),
        TopicSpec(name(EVENTS), parts, retention_ms=7 * 24 * HOUR_MS,   # a receiver may be down for days
                  max_message_bytes=MAX_MESSAGE_BYTES[EVENTS]),
    ]
