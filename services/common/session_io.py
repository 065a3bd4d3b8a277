"""Putting a session's inputs on the bus and reading its media back: used by the session API and the tests.

No torch here (the session API imports it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from kafka import KafkaProducer, TopicPartition

from infra import topics
from services.common.kafka import make_consumer
from services.common.messages import AudioIn, Media, Message, Tensor, decode, encode
from services.common.redis_state import SessionRecord, StateStore


def publish_start(store: StateStore, producer: KafkaProducer, session_id: str, tenant_id: str, image: bytes,
                  options: dict) -> None:
    """Record the session and its image in Redis, then put its ``start`` event (seq 0) on ``audio``."""
    store.put_session(SessionRecord(session_id=session_id, tenant_id=tenant_id, state="preparing", options=options))
    store.put_image(session_id, image)
    send(producer, AudioIn(session_id=session_id, tenant_id=tenant_id, seq=0, kind="start", options=options))


def send(producer: KafkaProducer, header: AudioIn, pcm: np.ndarray | None = None) -> None:
    tensors = None if pcm is None else {"pcm": Tensor.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32))}
    producer.send(topics.name(topics.AUDIO), key=header.session_id.encode(), value=encode(header, tensors))


class Backpressure(RuntimeError):
    """The session already has more queued audio than allowed: the chunk was refused, nothing was sent."""


class InputClosed(RuntimeError):
    """The session's end was put on the bus: it takes no more audio (``input_closed`` in its cursor)."""

    def __init__(self, session_id: str):
        super().__init__(f"session {session_id} is ending: it takes no more audio")


def queued_seconds(store: StateStore, session_id: str, block_samples: int = 7680, rate: int = 16000) -> float:
    """Audio accepted but not yet turned into video (accepted samples minus generated blocks)."""
    accepted, lane_block = store.r.hmget(store.k("cursor", session_id), "accepted_samples", "lane_block")
    return queued_from(accepted, lane_block, block_samples, rate)


def queued_from(accepted: bytes | None, lane_block: bytes | None, block_samples: int = 7680,
                rate: int = 16000) -> float:
    """:func:`queued_seconds` from the cursor's raw ``accepted_samples`` and ``lane_block`` (None: unset)."""
    generated = ((-1 if lane_block is None else int(lane_block)) + 1) * block_samples
    return max(0, (0 if accepted is None else int(accepted)) - generated) / rate


def admit_audio(store: StateStore, session_id: str, samples: int, max_ahead_s: float,
                max_backlog_s: float | None = None, rate: int = 16000, now: float | None = None) -> None:
    """Accept ``samples`` of a session's audio, or refuse them with :class:`Backpressure` (count nothing);
    :class:`InputClosed` once the session's end is on the bus.

    The rule a client must follow is *no faster than real time*, so that is what is measured: a token
    bucket of ``max_ahead_s`` seconds that refills at one second per second (``pace_credit`` and
    ``pace_t`` in the session's cursor). Audio is refused while the client is already more than
    ``max_ahead_s`` ahead of real time; a burst of at most that much (plus the chunk in hand) is fine.
    A stall of the pipeline (a service restarting) does not count against a client that keeps real
    time: its audio waits on Kafka and is generated when the stage is back. ``max_backlog_s`` bounds
    that wait (audio accepted but not yet generated, :func:`queued_seconds`) as a safety limit.
    """
    key = store.k("cursor", session_id)
    accepted, lane_block, credit_raw, t_raw, closed = store.r.hmget(
        key, "accepted_samples", "lane_block", "pace_credit", "pace_t", "input_closed")   # one round trip
    if closed is not None:
        raise InputClosed(session_id)
    if max_backlog_s is not None:
        q = queued_from(accepted, lane_block, rate=rate)
        if q > max_backlog_s:
            raise Backpressure(f"session {session_id} has {q:.1f} s of audio queued and not yet generated "
                               f"(limit {max_backlog_s:g} s); retry later")
    now = time.time() if now is None else now
    credit = max_ahead_s if credit_raw is None else float(credit_raw)
    credit = min(max_ahead_s, credit + max(0.0, now - (now if t_raw is None else float(t_raw))))
    if credit < 0:
        raise Backpressure(f"audio of session {session_id} is queued {max_ahead_s - credit:.1f} s ahead of real "
                           f"time (limit {max_ahead_s:g} s): send audio no faster than real time")
    store.set_cursor(session_id, pace_credit=repr(credit - samples / rate), pace_t=repr(now))


def publish_pcm(producer: KafkaProducer, session_id: str, tenant_id: str, pcm: np.ndarray, first_seq: int,
                chunk: int = 3200, store: StateStore | None = None, max_queued_s: float | None = None) -> int:
    """Send 16 kHz float32 PCM in chunks with consecutive sequence numbers; returns the next seq.

    With ``store`` and ``max_queued_s``: refuse (:class:`Backpressure`, nothing sent) when the session
    already has more than ``max_queued_s`` of audio waiting to be generated.
    """
    if store is not None:
        if max_queued_s is not None:
            q = queued_seconds(store, session_id)
            if q > max_queued_s:
                raise Backpressure(f"session {session_id} has {q:.1f} s of audio queued (limit {max_queued_s} s); "
                                   "send audio no faster than real time")
        store.r.hincrby(store.k("cursor", session_id), "accepted_samples", len(pcm))
    seq = first_seq
    for i in range(0, len(pcm), chunk):
        send(producer, AudioIn(session_id=session_id, tenant_id=tenant_id, seq=seq, kind="pcm"), pcm[i:i + chunk])
        seq += 1
    return seq


class MediaCollector:
    """Reads ``media`` (all partitions, no consumer group) and keeps each session's messages in order."""

    def __init__(self, bootstrap: str, from_beginning: bool = True):
        self.consumer = make_consumer(bootstrap, group_id=None, topics=None)
        parts = self.consumer.partitions_for_topic(topics.name(topics.MEDIA)) or set()
        tps = [TopicPartition(topics.name(topics.MEDIA), p) for p in sorted(parts)]
        self.consumer.assign(tps)
        if from_beginning:
            self.consumer.seek_to_beginning(*tps)
        else:
            self.consumer.seek_to_end(*tps)
        self.messages: dict[str, list[Message]] = {}

    def poll(self, timeout_ms: int = 200) -> None:
        for recs in self.consumer.poll(timeout_ms=timeout_ms).values():
            for rec in recs:
                msg = decode(rec.value)
                self.messages.setdefault(msg.header.session_id, []).append(msg)

    def wait_end(self, session_ids: Iterable[str], timeout_s: float) -> None:
        ids = set(session_ids)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if all(any(m.header.kind == "end" for m in self.messages.get(s, [])) for s in ids):
                return
        raise TimeoutError(f"media of {sorted(ids)} did not end within {timeout_s:.0f} s")

    def close(self) -> None:
        self.consumer.close()


def assemble(messages: list[Message]) -> tuple[bytes, list[int]]:
    """A client's view: one init segment, then fragments in block order, duplicates dropped.

    Returns the MP4 bytes and the block indices of the fragments kept (in arrival order)."""
    init, body, blocks, seen = b"", [], [], set()
    for m in messages:
        h: Media = m.header
        data = m.tensors["data"].data if "data" in m.tensors else b""
        if h.kind == "init" and not init:
            init = data
        elif h.kind == "fragment" and h.seq not in seen:
            seen.add(h.seq)
            blocks.append(h.seq)
            body.append(data)
        elif h.kind == "end":
            body.append(data)
    return init + b"".join(body), blocks
