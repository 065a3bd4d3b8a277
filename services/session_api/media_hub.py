"""The session API's view of the ``media`` topic, and the one media stream both media routes serve.

:class:`MediaHub`: one background thread reads every partition of ``media`` (no consumer group: every
API replica sees every session) and keeps, per session, the init segment and the last ``buffer_blocks``
fragments. Duplicate fragments (a restarted packager) are dropped here by block index. Sessions whose
media ended (or that went quiet) are forgotten after a while, so memory stays flat. A hub that starts
(a replica that starts or restarts) reads the last ``lookback_s`` of ``media`` first, so the sessions
that are live then have their init segment and recent fragments here too: a client whose replica died
reconnects with ``from_block`` and misses nothing.

:class:`MediaStream`: one client connection's view of a session's media, used by both
``GET /v1/sessions/{id}/media.mp4`` and ``WS /v1/sessions/{id}/media``. It yields the init segment first,
then fragments in block order from a given block on, then the end (with the last audio); a client that
reconnects (resume) gets a fresh init segment and the fragments after the last block delivered on any
earlier connection, as long as they are still buffered. While it is open it counts as a media client of
the session (no idle timeout then), and every piece it delivers counts as activity.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kafka import TopicPartition

from infra import topics
from services.common.kafka import KafkaConnection, make_consumer
from services.common.logging import get_logger
from services.common.messages import Media, WireError, decode

if TYPE_CHECKING:
    from services.session_api.state import SessionRuntime

log = get_logger("session-api")


@dataclass
class SessionMedia:
    init: bytes = b""
    fragments: OrderedDict[int, bytes] = field(default_factory=OrderedDict)   # block -> bytes
    ended: bool = False
    tail: bytes = b""
    last_block: int = -1
    delivered: int = -1                    # last block written to any client connection (resume point)
    updated: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class MediaPiece:
    """One piece of a session's fMP4 stream: the init segment, a block's fragment, or the end (last audio)."""

    kind: Literal["init", "fragment", "end"]
    block: int                             # the fragment's block index; -1 for init and end
    data: bytes

    def header(self) -> dict:
        """The JSON text message that precedes the piece's bytes on the media WebSocket."""
        return {"type": self.kind, "block": self.block, "bytes": len(self.data)}


class MediaHub:
    def __init__(self, kafka: KafkaConnection | str, buffer_blocks: int = 64, forget_ended_after_s: float = 300.0,
                 forget_quiet_after_s: float = 3600.0, lookback_s: float = 600.0):
        self.kafka, self.buffer_blocks, self.lookback_s = kafka, buffer_blocks, lookback_s
        self.forget_ended_after_s, self.forget_quiet_after_s = forget_ended_after_s, forget_quiet_after_s
        self.sessions: dict[str, SessionMedia] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="media-hub", daemon=True)
        self.ready = threading.Event()
        # connections waiting for news of a session: (their loop, their event), woken from the reader thread
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def start(self) -> MediaHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _run(self) -> None:
        consumer = make_consumer(self.kafka, group_id=None)
        name = topics.name(topics.MEDIA)
        tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or [])]
        consumer.assign(tps)
        self._seek_back(consumer, tps)
        for tp in tps:
            consumer.position(tp)
        self.ready.set()
        next_sweep = time.monotonic()
        try:
            while not self._stop.is_set():
                for recs in consumer.poll(timeout_ms=100).values():
                    for rec in recs:
                        self._add(rec.value)
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + 10
        finally:
            consumer.close()

    def _seek_back(self, consumer, tps: list[TopicPartition]) -> None:
        """Start ``lookback_s`` back in time (the sessions live now began at most about that long ago, or
        sent their init segment again since); at the end where nothing is that recent."""
        since = int((time.time() - self.lookback_s) * 1000)
        found = consumer.offsets_for_times({tp: since for tp in tps}) if self.lookback_s > 0 and tps else {}
        for tp in tps:
            hit = found.get(tp)
            if hit is None or hit.timestamp < 0:   # nothing that recent (Tansu answers offset 0, timestamp -1)
                consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, hit.offset)

    def has(self, session_id: str) -> bool:
        """Whether any media of the session is here (init segment, fragments or its end)."""
        with self.lock:
            sm = self.sessions.get(session_id)
            return sm is not None and bool(sm.init or sm.fragments or sm.ended)

    def _add(self, raw: bytes) -> None:
        try:
            msg = decode(raw)
        except WireError as exc:
            log.warning("dropped undecodable media", error=str(exc))
            return
        h: Media = msg.header
        data = msg.tensors["data"].data if "data" in msg.tensors else b""
        with self.lock:
            sm = self.sessions.setdefault(h.session_id, SessionMedia())
            if h.kind == "init":
                sm.init = sm.init or data
            elif h.kind == "fragment" and h.seq > sm.last_block:   # duplicates and replays dropped
                sm.fragments[h.seq] = data
                sm.last_block = h.seq
                while len(sm.fragments) > self.buffer_blocks:
                    sm.fragments.popitem(last=False)
            elif h.kind == "end" and not sm.ended:                   # a replayed end carries no tail
                sm.ended, sm.tail = True, data
            sm.updated = time.monotonic()
            for loop, event in self._waiters.get(h.session_id, ()):
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:                                 # that connection's loop is closed
                    pass

    def _sweep(self) -> None:
        """Forget sessions whose media ended a while ago, or that sent nothing for a long time."""
        now = time.monotonic()
        with self.lock:
            gone = [sid for sid, sm in self.sessions.items()
                    if now - sm.updated > (self.forget_ended_after_s if sm.ended else self.forget_quiet_after_s)]
            for sid in gone:
                del self.sessions[sid]

    def forget(self, session_id: str) -> None:
        with self.lock:
            self.sessions.pop(session_id, None)

    def delivered(self, session_id: str) -> int:
        with self.lock:
            sm = self.sessions.get(session_id)
            return -1 if sm is None else sm.delivered

    async def pieces(self, session_id: str, from_block: int | None = None,
                     recheck_s: float = 1.0) -> AsyncIterator[MediaPiece]:
        """The init segment, then fragments from ``from_block`` (default: the block after the last one
        delivered on an earlier connection of this session), then the end with the last audio.

        Between looks it waits for the reader thread's word that the session has news (and looks anyway
        after ``recheck_s``) rather than polling, so a connection costs no wake-ups while nothing comes."""
        sent_init = False
        nxt = from_block
        news = asyncio.Event()
        me = (asyncio.get_running_loop(), news)
        with self.lock:
            self._waiters.setdefault(session_id, set()).add(me)
        try:
            while True:
                news.clear()                  # before looking: news that comes after the look ends the wait
                with self.lock:
                    sm = self.sessions.get(session_id)
                    init = sm.init if sm else b""
                    if nxt is None and sm is not None and init:
                        nxt = sm.delivered + 1
                        if sm.fragments and nxt < next(iter(sm.fragments)):
                            nxt = next(iter(sm.fragments))    # older blocks are no longer buffered
                    ready = [] if sm is None or nxt is None else [(b, d) for b, d in sm.fragments.items()
                                                                  if b >= nxt]
                    ended, tail = (sm.ended, sm.tail) if sm else (False, b"")
                if init and not sent_init:
                    sent_init = True
                    yield MediaPiece("init", -1, init)
                for b, d in ready:
                    yield MediaPiece("fragment", b, d)
                    with self.lock:
                        sm = self.sessions.get(session_id)
                        if sm is not None:
                            sm.delivered = max(sm.delivered, b)
                    nxt = b + 1
                if ended and not ready and sent_init:
                    yield MediaPiece("end", -1, tail)
                    return
                try:
                    await asyncio.wait_for(news.wait(), recheck_s)
                except TimeoutError:
                    pass
        finally:
            with self.lock:
                waiting = self._waiters.get(session_id)
                if waiting is not None:
                    waiting.discard(me)
                    if not waiting:
                        del self._waiters[session_id]


class MediaStream:
    """One client's connection to a session's media: the same pieces for HTTP and WebSocket clients.

    Use as ``async with MediaStream(...) as stream: async for piece in stream: ...``. While open, the
    session (if this replica runs its ticker) has one more media client, so it does not time out idle;
    each delivered piece is activity. Leaving the ``async with`` (end of stream, client gone, error)
    always releases the client count.
    """

    def __init__(self, hub: MediaHub, session_id: str, from_block: int | None = None,
                 runtime: SessionRuntime | None = None):
        self.hub, self.session_id, self.from_block, self.runtime = hub, session_id, from_block, runtime

    async def __aenter__(self) -> MediaStream:
        if self.runtime is not None:
            self.runtime.media_clients += 1
        return self

    async def __aexit__(self, *exc) -> None:
        if self.runtime is not None:
            self.runtime.media_clients -= 1

    async def __aiter__(self) -> AsyncIterator[MediaPiece]:
        async for piece in self.hub.pieces(self.session_id, self.from_block):
            if self.runtime is not None:
                self.runtime.last_activity = time.monotonic()
            yield piece
