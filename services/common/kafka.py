"""Thin kafka-python helpers shared by the services and the local stack.

Broker behaviour we design around (Tansu, kafka-python 3.0.12):
- the first consumer-group join waits about half of ``session_timeout_ms``, so we use 6 s;
- consumers keep polling (``poll`` with a timeout) rather than sleeping between polls;
- ``api_version`` stays on auto-detect;
- a topic's partition count cannot be raised later, so topics are created once with their final count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.net.selector import NetworkSelector

from infra.topics import CLIENT_MAX_MESSAGE_BYTES, TopicSpec


@dataclass(frozen=True)
class KafkaConnection:
    """How to reach the brokers: bootstrap servers plus the security settings, for kafka-python clients.

    Built from the settings (``LiveAvatarSettings.kafka()``); a bare bootstrap string means PLAINTEXT
    (the local broker). The password never appears in ``repr``.
    """

    bootstrap: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None

    @classmethod
    def of(cls, kafka: KafkaConnection | str) -> KafkaConnection:
        return kafka if isinstance(kafka, KafkaConnection) else cls(kafka)

    def client_config(self) -> dict:
        """kafka-python keyword arguments shared by producers, consumers and admin clients."""
        cfg: dict = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.security_protocol.endswith("SSL"):
            cfg["ssl_check_hostname"] = True
            if self.ssl_cafile:
                cfg["ssl_cafile"] = self.ssl_cafile
        if self.security_protocol.startswith("SASL_"):
            cfg.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                       sasl_plain_password=self.sasl_password)
        return cfg


# kafka-python 3's network selector logs "Task ... is blocking the event loop" whenever one step of its
# own I/O tasks (reading and parsing a broker response) takes more than 0.1 s of wall time: a debugging
# aid like asyncio's slow-callback warning. Such a step takes 20-30 ms here, so the warning fires when
# the process waits for a core (a lane busy on the same CPUs), not because anything blocks; it reached
# the demo's output and the services' logs. The producer, consumer and admin constructors reject the
# selector's setting, so it is set as the selector's default, before any client exists: 0 turns it off.
NetworkSelector.DEFAULT_CONFIG["slow_task_threshold_secs"] = 0

#: Consumer-group session timeout: the first join costs about half of it on Tansu.
GROUP_SESSION_TIMEOUT_MS = 6000
GROUP_HEARTBEAT_MS = 1000


def new_topic(spec: TopicSpec) -> NewTopic:
    """The admin-client request that creates ``spec`` (one replica, its retention and message limit)."""
    return NewTopic(
        name=spec.name, num_partitions=spec.partitions, replication_factor=1,
        topic_configs={"retention.ms": str(spec.retention_ms), "max.message.bytes": str(spec.max_message_bytes)},
    )


def ensure_topics(kafka: KafkaConnection | str, specs: list[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; returns the names created.

    An existing topic with fewer partitions than asked is an error: the broker cannot add partitions.
    """
    admin = KafkaAdminClient(**KafkaConnection.of(kafka).client_config(), client_id="la-admin")
    try:
        existing = set(admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            try:
                admin.create_topics([new_topic(s) for s in missing])
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


def make_producer(kafka: KafkaConnection | str, **overrides) -> KafkaProducer:
    """A producer that waits for the broker's ack and keeps per-key order (one in-flight request)."""
    cfg = dict(
        **KafkaConnection.of(kafka).client_config(), acks="all", linger_ms=2,
        max_in_flight_requests_per_connection=1, retries=5, max_request_size=CLIENT_MAX_MESSAGE_BYTES,
    )
    cfg.update(overrides)
    return KafkaProducer(**cfg)


def make_consumer(kafka: KafkaConnection | str, group_id: str | None, topics: list[str] | None = None,
                  **overrides) -> KafkaConsumer:
    """A consumer with the session timeout the broker needs; offsets are committed by the caller."""
    cfg = dict(
        **KafkaConnection.of(kafka).client_config(), group_id=group_id, auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=GROUP_SESSION_TIMEOUT_MS, heartbeat_interval_ms=GROUP_HEARTBEAT_MS,
        max_partition_fetch_bytes=CLIENT_MAX_MESSAGE_BYTES, fetch_max_bytes=4 * CLIENT_MAX_MESSAGE_BYTES,
    )
    cfg.update(overrides)
    consumer = KafkaConsumer(**cfg)
    if topics:
        consumer.subscribe(topics)
    return consumer
