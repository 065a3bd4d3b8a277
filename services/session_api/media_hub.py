"""The session API's view of the ``media`` topic: per-session init segment and a buffer of recent fragments.

One background thread reads every partition of ``media`` (no consumer group: every API replica sees
every session) and keeps, per session, the init segment and the last ``buffer_blocks`` fragments.
Clients read from it through :meth:`MediaHub.stream`, an async generator that yields the init segment
first and then fragments in block order, from a given block on; a client that reconnects (resume) gets
a fresh init segment and the fragments after the last block it was sent, as long as they are still
buffered. Duplicate fragments (a restarted packager) are dropped here by block index.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kafka import TopicPartition

from infra import topics
from services.common.kafka import make_consumer
from services.common.logging import get_logger
from services.common.messages import Media, WireError, decode

log = get_logger("session-api")


@dataclass
class SessionMedia:
    init: bytes = b""
    fragments: OrderedDict = field(default_factory=OrderedDict)   # block -> bytes
    ended: bool = False
    tail: bytes = b""
    last_block: int = -1
    delivered: int = -1                    # last block written to any client connection (resume point)
    updated: float = field(default_factory=time.monotonic)


class MediaHub:
    def __init__(self, bootstrap: str, buffer_blocks: int = 64):
        self.bootstrap, self.buffer_blocks = bootstrap, buffer_blocks
        self.sessions: dict[str, SessionMedia] = {}
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="media-hub", daemon=True)
        self.ready = threading.Event()

    def start(self) -> MediaHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        consumer = make_consumer(self.bootstrap, group_id=None)
        name = topics.name(topics.MEDIA)
        tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or [])]
        consumer.assign(tps)
        consumer.seek_to_end(*tps)       # sessions start after this replica does
        for tp in tps:
            consumer.position(tp)
        self.ready.set()
        try:
            while not self._stop.is_set():
                for recs in consumer.poll(timeout_ms=100).values():
                    for rec in recs:
                        self._add(rec.value)
        finally:
            consumer.close()

    def _add(self, raw: bytes) -> None:
        try:
            msg = decode(raw)
        except WireError as exc:
            log.warning("dropped undecodable media", error=str(exc))
            return
        h: Media = msg.header
        data = msg.tensors["data"].data if "data" in msg.tensors else b""
        with self.cond:
            sm = self.sessions.setdefault(h.session_id, SessionMedia())
            if h.kind == "init":
                sm.init = sm.init or data
            elif h.kind == "fragment" and h.seq > sm.last_block:   # duplicates and replays dropped
                sm.fragments[h.seq] = data
                sm.last_block = h.seq
                while len(sm.fragments) > self.buffer_blocks:
                    sm.fragments.popitem(last=False)
            elif h.kind == "end":
                sm.ended, sm.tail = True, data
            sm.updated = time.monotonic()
            self.cond.notify_all()

    def forget(self, session_id: str) -> None:
        with self.lock:
            self.sessions.pop(session_id, None)

    def delivered(self, session_id: str) -> int:
        with self.lock:
            sm = self.sessions.get(session_id)
            return -1 if sm is None else sm.delivered

    async def stream(self, session_id: str, from_block: int | None = None, poll_s: float = 0.05):
        """Yield (kind, block, bytes): the init segment, then fragments from ``from_block`` (default: the block
        after the last one delivered on an earlier connection of this session), then the tail at the end."""
        sent_init = False
        nxt = from_block
        while True:
            with self.lock:
                sm = self.sessions.get(session_id)
                init = sm.init if sm else b""
                if nxt is None and sm is not None and init:
                    nxt = sm.delivered + 1
                    if sm.fragments and nxt < next(iter(sm.fragments)):
                        nxt = next(iter(sm.fragments))    # older blocks are no longer buffered
                ready = [] if sm is None or nxt is None else [(b, d) for b, d in sm.fragments.items() if b >= nxt]
                ended, tail = (sm.ended, sm.tail) if sm else (False, b"")
            if init and not sent_init:
                sent_init = True
                yield "init", -1, init
            for b, d in ready:
                yield "fragment", b, d
                with self.lock:
                    sm = self.sessions.get(session_id)
                    if sm is not None:
                        sm.delivered = max(sm.delivered, b)
                nxt = b + 1
            if ended and not ready and sent_init:
                yield "end", -1, tail
                return
            await asyncio.sleep(poll_s)
