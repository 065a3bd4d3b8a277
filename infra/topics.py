"""The Kafka topics of the platform, defined once: names, partitions, keys and retention.

| topic            | key        | producer        | consumer (group)                 | carries                            |
| ---------------- | ---------- | --------------- | -------------------------------- | ---------------------------------- |
| audio            | session id | session API     | audio-encoder (group)            | session start, PCM chunks, end     |
| audio-features   | session id | audio-encoder   | lane head k: partition k only    | per-block features + PCM, start/end|
| frames           | session id | lane decoder    | stream-packager (group)          | decoded frames + PCM per block     |
| media            | session id | stream-packager | session API (each replica)       | fMP4 init segment and fragments    |

``audio-features`` is partitioned by lane: lane k owns partition k, so the encoder addresses a lane by
writing to its partition, and a lane's blocks stay in order. Its partition count is therefore the most
lanes one cluster can run (the broker cannot add partitions later; choose it generously).
Every other topic is keyed by session id: one session's messages stay in one partition, in order.
"""

from __future__ import annotations

import os

from services.common.kafka import TopicSpec

AUDIO = "audio"
AUDIO_FEATURES = "audio-features"
FRAMES = "frames"
MEDIA = "media"

#: Most lanes per cluster (= partitions of audio-features). Override with LIVEAVATAR_MAX_LANES.
DEFAULT_MAX_LANES = 16
DEFAULT_PARTITIONS = 8
HOUR_MS = 3_600_000


def topic_prefix() -> str:
    """Optional prefix (``LIVEAVATAR_TOPIC_PREFIX``) so several stacks can share one cluster."""
    return os.environ.get("LIVEAVATAR_TOPIC_PREFIX", "")


def name(topic: str) -> str:
    return topic_prefix() + topic


def all_topics(max_lanes: int | None = None, partitions: int | None = None) -> list[TopicSpec]:
    lanes = max_lanes or int(os.environ.get("LIVEAVATAR_MAX_LANES", DEFAULT_MAX_LANES))
    parts = partitions or int(os.environ.get("LIVEAVATAR_TOPIC_PARTITIONS", DEFAULT_PARTITIONS))
    return [
        TopicSpec(name(AUDIO), parts, retention_ms=HOUR_MS),
        TopicSpec(name(AUDIO_FEATURES), lanes, retention_ms=HOUR_MS),
        TopicSpec(name(FRAMES), parts, retention_ms=HOUR_MS // 4),   # large values: keep for 15 min
        TopicSpec(name(MEDIA), parts, retention_ms=HOUR_MS),
    ]
