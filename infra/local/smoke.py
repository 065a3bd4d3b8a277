"""A quick end-to-end check of a running local stack: one Kafka round trip and one Redis round trip."""

from __future__ import annotations

import os
import time
import uuid

from services.common.kafka import TopicSpec, ensure_topics, make_consumer, make_producer


def kafka_round_trip(bootstrap: str, partitions: int = 4, messages: int = 16, timeout_s: float = 30.0) -> dict:
    """Produce keyed messages to a fresh topic, consume them back through a consumer group."""
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [TopicSpec(topic, partitions, retention_ms=60_000)])
    sent = {f"k{i}".encode(): os.urandom(64) for i in range(messages)}
    producer = make_producer(bootstrap)
    for key, value in sent.items():
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()
    t0 = time.monotonic()
    consumer = make_consumer(bootstrap, group_id=f"smoke-{uuid.uuid4().hex[:6]}", topics=[topic])
    got: dict[bytes, bytes] = {}
    parts: set[int] = set()
    try:
        while len(got) < len(sent) and time.monotonic() - t0 < timeout_s:
            for tp, records in consumer.poll(timeout_ms=500).items():
                parts.add(tp.partition)
                for r in records:
                    got[r.key] = r.value
        consumer.commit()
    finally:
        consumer.close()
    if got != sent:
        raise RuntimeError(f"kafka round trip lost messages: sent {len(sent)}, got {len(got)} back")
    return {"topic": topic, "messages": len(got), "partitions_seen": len(parts), "seconds": round(time.monotonic() - t0, 2)}


def redis_round_trip(redis_url: str, nbytes: int = 4 * 1024 * 1024) -> dict:
    """SET then GET a random binary value of a few MB, with an expiry, then delete it."""
    import redis

    client = redis.Redis.from_url(redis_url)
    key = f"liveavatar:smoke:{uuid.uuid4().hex}"
    value = os.urandom(nbytes)
    t0 = time.monotonic()
    client.set(key, value, ex=60)
    back = client.get(key)
    client.delete(key)
    if back != value:
        raise RuntimeError("redis round trip returned different bytes")
    return {"bytes": nbytes, "seconds": round(time.monotonic() - t0, 3)}
