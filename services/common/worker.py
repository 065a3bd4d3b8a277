"""What every worker service shares: its settings base, graceful stop, consumer lag, model loading."""

from __future__ import annotations

import signal
import threading
import time

from pydantic import Field

from services.common.health import QUEUE_LAG
from services.common.settings import LiveAvatarSettings


class WorkerSettings(LiveAvatarSettings):
    """Settings common to the Kafka/Redis worker services."""

    health_host: str = Field("127.0.0.1", description="address of /healthz, /readyz, /metrics (0.0.0.0 in a pod)")
    health_port: int = Field(8080, description="port of /healthz, /readyz, /metrics (0: any free port)")
    model: str = Field("tiny-trained", validation_alias="LIVEAVATAR_MODEL_CONFIG",
                       description="'tiny-trained' (the shipped trained checkpoint), 'tiny' (seeded random), "
                                   "'reference' or a checkpoint directory")
    checkpoint: str | None = Field(None, description="checkpoint directory; unset: the shipped checkpoint for "
                                                     "'tiny-trained', the directory itself when the config is a trained "
                                                     "bundle, seeded random weights otherwise")
    weights_seed: int = Field(0, description="seed of the random weights when no checkpoint is given")
    redis_namespace: str = Field("la", description="prefix of every Redis key")
    poll_ms: int = Field(200, description="Kafka poll timeout")
    threads: int = Field(1, description="torch CPU threads (results are bit-reproducible for a fixed count)")


class GracefulStop:
    """SIGTERM / SIGINT set a flag; the worker loop drains in-flight work and exits."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> GracefulStop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.event.set())
        return self

    @property
    def stopping(self) -> bool:
        return self.event.is_set()


#: How often a worker loop exports its consumer lag: each export asks the broker for the end offsets (a
#: request per call), so once a second rather than on every poll (5 a second when idle).
LAG_EXPORT_S = 1.0


def update_lag(consumer, service: str) -> dict[str, int]:
    """Export end offset minus position per topic (the lag of this consumer)."""
    assigned = consumer.assignment()
    if not assigned:
        return {}
    ends = consumer.end_offsets(list(assigned))
    lag: dict[str, int] = {}
    for tp in assigned:
        pos = consumer.position(tp)
        lag[tp.topic] = lag.get(tp.topic, 0) + max(0, ends.get(tp, 0) - (pos or 0))
    for topic, value in lag.items():
        QUEUE_LAG.labels(service, topic).set(value)
    return lag


def commit_durable(consumer, held=None) -> None:
    """Commit every assigned partition at its position, except where ``held`` names an earlier offset.

    ``held`` (a dict, or a function returning one) is ``{TopicPartition: offset}``: the first record of a
    partition whose effect lives only in this process's memory (e.g. events of a session waiting for a
    lane). Committing past it would lose it on a crash; committing at it makes a restarted worker re-read
    it (and drop what it already handled as duplicates)."""
    hold = held() if callable(held) else (held or {})
    if not hold:
        consumer.commit()
        return
    from kafka import OffsetAndMetadata

    offsets = {}
    for tp in consumer.assignment():
        pos = consumer.position(tp)
        if pos is not None:
            offsets[tp] = OffsetAndMetadata(min(pos, hold[tp]) if tp in hold else pos, None, -1)
    if offsets:
        consumer.commit(offsets)


def run_consume_loop(name: str, settings: WorkerSettings, consumer, producer, handle, stop: GracefulStop,
                     is_ready, set_ready, after_poll=None, active_sessions=None, held=None,
                     pass_record: bool = False) -> None:
    """The loop of a Kafka worker: poll, handle each record in order, flush what was produced, then commit
    (so a crash re-reads only records whose output may be missing: consumers are idempotent), export lag.
    ``held``: offsets not to commit past (:func:`commit_durable`); ``pass_record``: ``handle`` gets the
    record (topic, partition, offset, value) rather than its value.
    On SIGTERM: drain (flush + commit) and close. Serves /healthz, /readyz, /metrics meanwhile."""
    from services.common.health import ACTIVE_SESSIONS, HealthServer
    from services.common.logging import get_logger

    log = get_logger(name)
    stop.install()
    health = HealthServer(settings.health_host, settings.health_port, is_ready, name).start()
    log.info("started", health_port=health.port)
    last_hold: dict = {}
    next_lag = 0.0
    try:
        while not stop.stopping:
            batch = consumer.poll(timeout_ms=settings.poll_ms)
            set_ready()
            for records in batch.values():
                for rec in records:
                    handle(rec if pass_record else rec.value)
            if after_poll is not None:
                after_poll()
            hold = held() if held is not None else {}
            if batch or hold != last_hold:          # a released hold is committed without waiting for records
                producer.flush()
                commit_durable(consumer, hold)
                last_hold = hold
            if time.monotonic() >= next_lag:
                next_lag = time.monotonic() + LAG_EXPORT_S
                update_lag(consumer, name)
                if active_sessions is not None:
                    ACTIVE_SESSIONS.labels(name).set(active_sessions())
    finally:
        log.info("stopping: draining")
        producer.flush()
        try:
            commit_durable(consumer, held)
        finally:
            consumer.close()
            producer.close()
            health.stop()
