"""Thin kafka-python helpers shared by the services and the local stack.

Broker behaviour we design around (Tansu, kafka-python 3.0.12):
- the first consumer-group join waits about half of ``session_timeout_ms``, so we use 6 s;
- consumers keep polling (``poll`` with a timeout) rather than sleeping between polls;
- ``api_version`` stays on auto-detect;
- a topic's partition count cannot be raised later, so topics are created once with their final count.
"""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

#: Consumer-group session timeout: the first join costs about half of it on Tansu.
GROUP_SESSION_TIMEOUT_MS = 6000
GROUP_HEARTBEAT_MS = 1000


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its name, partition count and retention."""

    name: str
    partitions: int
    retention_ms: int = 3_600_000

    def new_topic(self) -> NewTopic:
        return NewTopic(
            name=self.name, num_partitions=self.partitions, replication_factor=1,
            topic_configs={"retention.ms": str(self.retention_ms)},
        )


def ensure_topics(bootstrap: str, specs: list[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; returns the names created.

    An existing topic with fewer partitions than asked is an error: the broker cannot add partitions.
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="la-admin")
    try:
        existing = set(admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            try:
                admin.create_topics([s.new_topic() for s in missing])
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process
        described = {
            (d.get("name") or d.get("topic")): len(d["partitions"]) for d in admin.describe_topics([s.name for s in specs])
        }
        for s in specs:
            have = described.get(s.name, 0)
            if have < s.partitions:
                raise RuntimeError(
                    f"topic {s.name!r} has {have} partitions but {s.partitions} are required; "
                    "the broker cannot add partitions, so delete and recreate the topic"
                )
        return [s.name for s in missing]
    finally:
        admin.close()


def make_producer(bootstrap: str, **overrides) -> KafkaProducer:
    """A producer that waits for the broker's ack and keeps per-key order (one in-flight request)."""
    cfg = dict(
        bootstrap_servers=bootstrap, acks="all", linger_ms=2, max_in_flight_requests_per_connection=1,
        retries=5, max_request_size=16 * 1024 * 1024,
    )
    cfg.update(overrides)
    return KafkaProducer(**cfg)


def make_consumer(bootstrap: str, group_id: str | None, topics: list[str] | None = None, **overrides) -> KafkaConsumer:
    """A consumer with the session timeout the broker needs; offsets are committed by the caller."""
    cfg = dict(
        bootstrap_servers=bootstrap, group_id=group_id, auto_offset_reset="earliest", enable_auto_commit=False,
        session_timeout_ms=GROUP_SESSION_TIMEOUT_MS, heartbeat_interval_ms=GROUP_HEARTBEAT_MS,
        max_partition_fetch_bytes=16 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
    )
    cfg.update(overrides)
    consumer = KafkaConsumer(**cfg)
    if topics:
        consumer.subscribe(topics)
    return consumer
