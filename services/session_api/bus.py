"""What the API puts on the ``audio`` topic for a session: start, PCM, end of utterance, interrupt, end;
and the per-session ticker (idle motion, idle timeout, maximum duration).

Ordering. Every input event of a session carries a sequence number reserved in Redis (shared by all
replicas), and the audio encoder drops any event whose number is not above the last one it handled. So
reserving numbers and handing the events to the producer happen together under the session's lock; the
producer keys by session (one partition), keeps one request in flight and retries, so the broker gets
them in that order.

Durability. PCM chunks are handed to the producer and not flushed: kafka-python sends them in the
background (``linger_ms`` batches), with ``acks=all``. Chunks the producer still holds when this process
dies are lost, and that is the right trade for live audio: the client's audio WebSocket dies with the
process and a re-sent stretch of old speech would only add latency. The producer is flushed where a
client is told that something happened and relies on it: after ``start`` (201), ``end_utterance`` (202 or
``utterance_end``: the utterance's audio and its end are on the broker), ``interrupt`` (202), ``end``
(204), and at shutdown. Every blocking call runs on the API's I/O threads (:meth:`AppState.io`).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from kafka import KafkaProducer

from services.common.logging import get_logger
from services.common.messages import AudioIn
from services.common.redis_state import StateStore
from services.common.session_io import publish_pcm, publish_start, queued_seconds, send
from services.session_api.errors import api_error
from services.session_api.metrics import AUDIO_SECONDS
from services.session_api.schemas import SessionOptions
from services.session_api.state import AppState, SessionRuntime
from services.session_api.tenants import ACTIVE_STATES

log = get_logger("session-api")

RATE = 16000               # the platform's audio rate
BLOCK_SAMPLES = 7680       # one block of video (0.48 s) takes this much audio
CHUNK_SAMPLES = 3200       # PCM goes on the bus in 200 ms messages
TICK_S = 0.1


class QueueFull(Exception):
    """The session already has more audio queued than allowed; nothing was sent."""

    def __init__(self, queued_s: float, limit_s: float):
        super().__init__(f"{queued_s:.1f} s of audio already queued (limit {limit_s:g} s): send audio no faster "
                         "than real time")


def _next_seqs(store: StateStore, sid: str, n: int) -> int:
    """Reserve n consecutive input sequence numbers for the session (shared by every replica)."""
    last = store.r.hincrby(store.k("cursor", sid), "in_seq", n)
    return last - n + 1


def _send_pcm(store: StateStore, producer: KafkaProducer, sid: str, tenant: str, pcm: np.ndarray,
              max_queued_s: float) -> None:
    """Blocking: refuse when too much is queued, else reserve sequence numbers and hand the chunks over."""
    queued = queued_seconds(store, sid)
    if queued > max_queued_s:
        raise QueueFull(queued, max_queued_s)
    n = -(-len(pcm) // CHUNK_SAMPLES)
    publish_pcm(producer, sid, tenant, pcm, _next_seqs(store, sid, n), chunk=CHUNK_SAMPLES, store=store)


def _send_event(store: StateStore, producer: KafkaProducer, sid: str, tenant: str, kind: str) -> None:
    send(producer, AudioIn(session_id=sid, tenant_id=tenant, seq=_next_seqs(store, sid, 1), kind=kind))


def _start(store: StateStore, producer: KafkaProducer, sid: str, tenant: str, image: bytes, options: dict) -> None:
    publish_start(store, producer, sid, tenant, image, options)
    producer.flush()
    store.set_cursor(sid, in_seq=0)


async def start_session(st: AppState, sid: str, tenant: str, image: bytes, opts: SessionOptions) -> None:
    """Record the session and its image, put ``start`` on the bus (flushed), and start its ticker here."""
    await st.io(_start, st.store, st.producer, sid, tenant, image, opts.model_dump())
    rt = SessionRuntime(sid, tenant, opts)
    st.runtimes[sid] = rt
    rt.task = asyncio.create_task(ticker(st, rt), name=f"ticker-{sid}")


async def push_pcm(st: AppState, sid: str, tenant: str, pcm: np.ndarray, *, activity: bool = True) -> None:
    """Put 16 kHz float32 PCM on the bus (not flushed; see the module doc). 429 when too much is queued."""
    if len(pcm) == 0:
        return
    async with st.session_lock(sid):
        try:
            await st.io(_send_pcm, st.store, st.producer, sid, tenant, pcm, st.settings.max_queued_audio_s)
        except QueueFull as exc:
            raise api_error(429, str(exc), {"Retry-After": "1"}) from exc
    AUDIO_SECONDS.labels(tenant).inc(len(pcm) / RATE)
    rt = st.runtimes.get(sid)
    if rt is not None:
        rt.last_audio = time.monotonic()
        if activity:
            rt.last_activity = rt.last_audio


async def send_event(st: AppState, sid: str, tenant: str, kind: str) -> None:
    """``end_utterance``, ``interrupt`` or ``end``: in order after the session's audio, then flushed."""
    async with st.session_lock(sid):
        await st.io(_send_event, st.store, st.producer, sid, tenant, kind)
    await st.io(st.producer.flush)


async def end_session(st: AppState, sid: str, tenant: str, reason: str) -> None:
    """Put ``end`` on the bus and mark the session ``ending`` (once per session on this replica)."""
    rt = st.runtimes.get(sid)
    if rt is not None:
        if rt.ended:
            return
        rt.ended, rt.end_reason = True, reason
    await send_event(st, sid, tenant, "end")
    await st.io(st.store.update_session, sid, state="ending", error=reason if reason != "deleted" else "")
    st.runtimes.pop(sid, None)
    log.info("session ending", session_id=sid, tenant_id=tenant, reason=reason)


def _probe(store: StateStore, sid: str) -> tuple[str | None, float]:
    rec = store.get_session(sid)
    return (None if rec is None else rec.state), queued_seconds(store, sid)


async def ticker(st: AppState, rt: SessionRuntime) -> None:
    """Idle motion at real time, idle timeout, maximum duration."""
    silence = np.zeros(BLOCK_SAMPLES, np.float32)
    try:
        while not rt.ended:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if now - rt.created > rt.opts.max_duration_s:
                await end_session(st, rt.sid, rt.tenant, "max_duration")
                return
            idle_for = 0.0 if rt.media_clients else now - rt.last_activity
            if idle_for > rt.opts.idle_timeout_s:
                await end_session(st, rt.sid, rt.tenant, "idle_timeout")
                return
            state, queued = await st.io(_probe, st.store, rt.sid)
            if state is None or state not in ACTIVE_STATES:
                st.runtimes.pop(rt.sid, None)
                return
            if rt.ended:
                return
            if rt.opts.idle == "silence" and state == "active" and now - rt.last_audio >= 0.48 and queued < 0.5:
                try:                                       # keeps the avatar alive, at real time;
                    await push_pcm(st, rt.sid, rt.tenant, silence, activity=False)   # not activity
                except Exception as exc:  # noqa: BLE001 - a failed idle block is retried on the next tick
                    log.warning("idle motion not sent", session_id=rt.sid, error=str(exc))
                rt.last_audio = now
    except asyncio.CancelledError:
        return
    except Exception as exc:  # noqa: BLE001 - Redis or Kafka down: the session is no longer watched here
        log.error("session ticker stopped", session_id=rt.sid, error=repr(exc))

