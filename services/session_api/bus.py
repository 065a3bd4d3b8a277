"""What the API puts on the ``audio`` topic for a session: start, PCM, end of utterance, interrupt, end;
the per-session ticker (idle motion, idle timeout, maximum duration, lifecycle events), which runs on
whichever replica holds the session's timer lease (:mod:`services.session_api.timers`); and the
replica's background tasks (lease takeover, media-client presence, the event-loop lag probe).

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

from services.common import events
from services.common.logging import get_logger
from services.common.messages import AudioIn
from services.common.redis_state import SessionRecord, StateStore
from services.common.session_io import (
    Backpressure,
    InputClosed,
    admit_audio,
    publish_pcm,
    publish_start,
    queued_from,
    send,
)
from services.session_api.errors import api_error
from services.session_api.metrics import AUDIO_SECONDS, EVENT_LOOP_LAG, EVENT_LOOP_LAG_MAX
from services.session_api.schemas import SessionOptions
from services.session_api.state import AppState
from services.session_api.tenants import ACTIVE_STATES
from services.session_api.timers import ENDING_GRACE_S, FINISHED, Leases

log = get_logger("session-api")

RATE = 16000               # the platform's audio rate
BLOCK_SAMPLES = 7680       # one block of video (0.48 s) takes this much audio
CHUNK_SAMPLES = 3200       # PCM goes on the bus in 200 ms messages
TICK_S = 0.1
RENEW_S = 1.0             # the owner renews its timer lease this often
SCAN_S = 1.0              # every replica looks for sessions whose lease ran out this often
PRESENCE_S = 1.0          # media clients are reported to Redis this often


class QueueFull(Exception):
    """The session already has more audio queued than allowed; nothing was sent."""

    def __init__(self, queued_s: float, limit_s: float):
        super().__init__(f"{queued_s:.1f} s of audio already queued (limit {limit_s:g} s): send audio no faster "
                         "than real time")


def _next_seqs(store: StateStore, sid: str, n: int) -> int:
    """Reserve n consecutive input sequence numbers for the session (shared by every replica)."""
    last = store.r.hincrby(store.k("cursor", sid), "in_seq", n)
    return last - n + 1


def _send_pcm(store: StateStore, leases: Leases, producer: KafkaProducer, sid: str, tenant: str, pcm: np.ndarray,
              max_queued_s: float, activity: bool, max_backlog_s: float | None = None) -> None:
    """Blocking: refuse when too much is queued, else reserve sequence numbers and hand the chunks over;
    then note the audio (and activity) for the session's timers."""
    admit_audio(store, sid, len(pcm), max_queued_s, max_backlog_s)     # no faster than real time (Backpressure)
    n = -(-len(pcm) // CHUNK_SAMPLES)
    publish_pcm(producer, sid, tenant, pcm, _next_seqs(store, sid, n), chunk=CHUNK_SAMPLES, store=store)
    now = time.time()
    leases.mark(sid, **({"last_audio": now, "last_activity": now} if activity else {"last_audio": now}))


def _send_event(store: StateStore, producer: KafkaProducer, sid: str, tenant: str, kind: str) -> None:
    """``end`` closes the session's input first: audio and events after it are refused (409) here, and
    whatever races past (another replica) is dropped by the audio encoder."""
    if kind == "end":
        store.set_cursor(sid, input_closed=1)
    elif store.r.hget(store.k("cursor", sid), "input_closed") is not None:
        raise InputClosed(sid)
    send(producer, AudioIn(session_id=sid, tenant_id=tenant, seq=_next_seqs(store, sid, 1), kind=kind))


def _start(store: StateStore, leases: Leases, producer: KafkaProducer, sid: str, tenant: str, image: bytes,
           options: dict) -> bool:
    publish_start(store, producer, sid, tenant, image, options)
    producer.flush()
    store.set_cursor(sid, in_seq=0)
    return leases.create(sid)


async def start_session(st: AppState, sid: str, tenant: str, image: bytes, opts: SessionOptions) -> None:
    """Record the session and its image, put ``start`` on the bus (flushed), and run its ticker here."""
    if await st.io(_start, st.store, st.leases, st.producer, sid, tenant, image, opts.model_dump()):
        _run_ticker(st, sid)


async def push_pcm(st: AppState, sid: str, tenant: str, pcm: np.ndarray, *, activity: bool = True) -> None:
    """Put 16 kHz float32 PCM on the bus (not flushed; see the module doc). 429 when too much is queued."""
    if len(pcm) == 0:
        return
    async with st.session_lock(sid):
        try:
            await st.io(_send_pcm, st.store, st.leases, st.producer, sid, tenant, pcm,
                        st.settings.max_queued_audio_s, activity, st.settings.max_backlog_audio_s)
        except (QueueFull, Backpressure) as exc:
            raise api_error(429, str(exc), {"Retry-After": "1"}) from exc
        except InputClosed as exc:
            raise api_error(409, str(exc)) from exc
    AUDIO_SECONDS.labels(tenant).inc(len(pcm) / RATE)


async def send_event(st: AppState, sid: str, tenant: str, kind: str) -> None:
    """``end_utterance``, ``interrupt`` or ``end``: in order after the session's audio, then flushed."""
    async with st.session_lock(sid):
        try:
            await st.io(_send_event, st.store, st.producer, sid, tenant, kind)
        except InputClosed as exc:
            raise api_error(409, str(exc)) from exc
    await st.io(st.producer.flush)


async def keep_alive(st: AppState, sid: str) -> None:
    await st.io(st.leases.mark, sid, last_activity=time.time())


async def end_session(st: AppState, sid: str, tenant: str, reason: str) -> None:
    """Put ``end`` on the bus and mark the session ``ending``: once per session, whichever replica asks."""
    if not await st.io(st.leases.claim_end, sid, reason):
        return
    await _send_end(st, sid, tenant, reason)


async def _send_end(st: AppState, sid: str, tenant: str, reason: str) -> None:
    await send_event(st, sid, tenant, "end")
    await st.io(st.store.update_session, sid, state="ending", error=reason if reason != "deleted" else "")
    log.info("session ending", session_id=sid, tenant_id=tenant, reason=reason)


# ---- the ticker (on the replica holding the session's timer lease) -------------------------------------

def _probe(store: StateStore, leases: Leases, sid: str):
    """The session record, its timer state, its queued audio and last generated block: one round trip (the
    ticker asks ten times a second)."""
    p = store.r.pipeline(transaction=False)
    p.hgetall(store.k("session", sid))
    p.hgetall(leases.timer_key(sid))
    p.hmget(store.k("cursor", sid), "accepted_samples", "lane_block")
    raw, timer, (accepted, lane_block) = p.execute()
    if not raw:
        return None, {}, 0.0, -1
    return (SessionRecord.from_redis(raw), {k.decode(): v.decode() for k, v in timer.items()},
            queued_from(accepted, lane_block), -1 if lane_block is None else int(lane_block))


def _publish(store: StateStore, leases: Leases, producer: KafkaProducer, tenant: str, event: events.Event,
             flag: str) -> None:
    """Publish a lifecycle event (flushed), then remember it was sent: at least once, same id."""
    events.publish(producer, tenant, event)
    producer.flush()
    leases.mark(event.session_id, **{flag: 1})


async def _lifecycle(st: AppState, rec, timer: dict, lane_block: int) -> bool:
    """Publish the lifecycle events this state calls for; True when the session is over (stop ticking)."""
    sid, tenant = rec.session_id, rec.tenant_id
    pub = lambda ev, flag: st.io(_publish, st.store, st.leases, st.producer, tenant, ev, flag)   # noqa: E731
    if rec.state == "active" and "ready_sent" not in timer:
        await pub(events.make_event("session.ready", sid, {"lane": rec.lane, "width": rec.width,
                                                           "height": rec.height}), "ready_sent")
    if rec.state == "failed" and "failed_sent" not in timer:
        await pub(events.make_event("session.failed", sid, {"error": rec.error}), "failed_sent")
    end_at = float(timer.get("end_at", 0) or 0)
    overdue = rec.state == "ending" and end_at and time.time() - end_at > ENDING_GRACE_S
    if rec.state in FINISHED or overdue:
        if "ended_sent" not in timer:
            reason = "failed" if rec.state == "failed" else timer.get("end_reason") or "ended"
            blocks = lane_block + 1
            data = {"reason": reason, "duration_s": round(time.time() - rec.created, 3), "blocks": blocks,
                    "generated_s": round(blocks * BLOCK_SAMPLES / RATE, 3)}
            if rec.error and reason not in ("deleted",):
                data["error"] = rec.error
            await pub(events.make_event("session.ended", sid, data), "ended_sent")
        return True
    return False


def _run_ticker(st: AppState, sid: str) -> None:
    if sid not in st.tickers:
        st.tickers[sid] = asyncio.create_task(ticker(st, sid), name=f"ticker-{sid}")


async def ticker(st: AppState, sid: str) -> None:
    """Idle motion at real time, idle timeout, maximum duration, lifecycle events; renews the lease."""
    silence = np.zeros(BLOCK_SAMPLES, np.float32)
    renewed, finished = time.monotonic(), False
    try:
        while True:
            await asyncio.sleep(TICK_S)
            if time.monotonic() - renewed >= RENEW_S:
                if not await st.io(st.leases.renew, sid):
                    log.warning("timer lease lost to another replica", session_id=sid)
                    return
                renewed = time.monotonic()
            rec, timer, queued, lane_block = await st.io(_probe, st.store, st.leases, sid)
            if rec is None:                                   # expired or deleted from Redis
                finished = True
                await st.io(st.leases.forget, sid)
                return
            if await _lifecycle(st, rec, timer, lane_block):
                finished = True
                return
            if rec.state not in ACTIVE_STATES:               # ending: wait for the lane to finish it
                continue
            opts = SessionOptions.model_validate(rec.options)
            now = time.time()
            if "end_reason" in timer:                         # claimed but not sent (its replica died)
                if now - float(timer.get("end_at", now)) > 10:
                    await _send_end(st, sid, rec.tenant_id, timer["end_reason"])
                continue
            if now - rec.created > opts.max_duration_s:
                await end_session(st, sid, rec.tenant_id, "max_duration")
                continue
            local = st.runtimes.get(sid)
            present = (local is not None and local.media_clients > 0) or now < float(timer.get("media_until", 0))
            idle_for = 0.0 if present else now - float(timer.get("last_activity", rec.created))
            if idle_for > opts.idle_timeout_s:
                await end_session(st, sid, rec.tenant_id, "idle_timeout")
                continue
            last_audio = float(timer.get("last_audio", rec.created))
            if opts.idle == "silence" and rec.state == "active" and now - last_audio >= 0.48 and queued < 0.5:
                try:                                       # keeps the avatar alive, at real time; not activity
                    await push_pcm(st, sid, rec.tenant_id, silence, activity=False)
                except Exception as exc:  # noqa: BLE001 - a failed idle block is retried on the next tick
                    log.warning("idle motion not sent", session_id=sid, error=str(exc))
    except asyncio.CancelledError:
        return
    except Exception as exc:  # noqa: BLE001 - Redis or Kafka down: let the lease run out; a replica takes over
        log.error("session ticker stopped", session_id=sid, error=repr(exc))
    finally:
        st.tickers.pop(sid, None)
        if finished:
            try:
                await st.io(st.leases.release, sid, True)
            except Exception:  # noqa: BLE001 - the lease runs out by itself
                pass


# ---- replica-wide background tasks ------------------------------------------------------------------

async def takeover_loop(st: AppState) -> None:
    """Take over the timers of sessions whose lease ran out (their replica died or stopped)."""
    while True:
        try:
            for sid in await st.io(st.leases.expired):
                if sid not in st.tickers and await st.io(st.leases.acquire, sid):
                    log.info("took over session timers", session_id=sid, replica=st.replica)
                    _run_ticker(st, sid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis down: try again
            log.warning("lease scan failed", error=repr(exc))
        await asyncio.sleep(SCAN_S)


async def presence_loop(st: AppState) -> None:
    """Report this replica's media clients to Redis (at once for a new one, then every second), and drop
    the local view of sessions without clients."""
    while True:
        await asyncio.sleep(TICK_S)
        now = time.monotonic()
        due = [rt.sid for rt in st.runtimes.values() if rt.media_clients > 0 and now - rt.reported >= PRESENCE_S]
        for sid in [sid for sid, rt in st.runtimes.items() if rt.media_clients <= 0 and now - rt.last_activity > 60]:
            del st.runtimes[sid]
        if due:
            try:
                await st.io(st.leases.media_present, due)
                for sid in due:
                    if sid in st.runtimes:
                        st.runtimes[sid].reported = now
            except Exception as exc:  # noqa: BLE001 - Redis down: try again
                log.warning("media presence not reported", error=repr(exc))


async def loop_lag_probe(period_s: float) -> None:
    """How late the event loop wakes a task: sleep ``period_s``, measure the overshoot."""
    loop, worst = asyncio.get_running_loop(), 0.0
    while True:
        t0 = loop.time()
        await asyncio.sleep(period_s)
        lag = max(0.0, loop.time() - t0 - period_s)
        EVENT_LOOP_LAG.observe(lag)
        if lag > worst:
            worst = lag
            EVENT_LOOP_LAG_MAX.set(lag)


def start_background(st: AppState) -> None:
    st.background += [asyncio.create_task(takeover_loop(st), name="timer-takeover"),
                      asyncio.create_task(presence_loop(st), name="media-presence"),
                      asyncio.create_task(loop_lag_probe(st.settings.event_loop_probe_s), name="loop-lag")]
