"""Session timers that survive the replica: idle motion, idle timeout, maximum duration, and the session's
lifecycle events (``session.ready``, ``session.failed``, ``session.ended``).

Ownership is a lease in Redis. One replica at a time runs a session's ticker: the one holding
``la:timerlease:{sid}`` (value: the replica id, ``PX`` = ``LIVEAVATAR_TIMER_LEASE_S``), renewed by its
ticker. Every replica scans ``la:timersessions`` (session id -> when its lease ends, in ms) once a second
and takes over the sessions whose lease ran out (``SET NX``): a replica that dies (SIGKILL included)
loses its sessions' leases within the lease time, and another replica carries on their timers. A
replica that stops gracefully hands its leases back at once.

Everything a ticker needs is in Redis, not in the replica that created the session::

    la:timer:{sid}      hash  last_activity, last_audio, media_until (unix seconds), end_reason, end_at,
                              ready_sent, failed_sent, ended_sent                               TTL session
    la:timerlease:{sid} str   the owning replica's id                                           PX lease
    la:timersessions    zset  session id -> lease end (ms); removed when the session is over

Activity is written by whichever replica sees it: audio (``last_audio``, and ``last_activity`` unless it
is idle motion), keep-alive, and media clients, which each replica reports for its own connections
(``media_until``: a media client is connected at least until then; no idle timeout meanwhile).
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from services.common.redis_state import StateStore

FINISHED = ("ended", "failed")
#: How long after ``end`` a session may stay ``ending`` before ``session.ended`` is sent anyway.
ENDING_GRACE_S = 120.0
#: How long a replica's report of a connected media client counts (it re-reports every second).
MEDIA_PRESENCE_S = 3.0


def replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Leases:
    """Timer leases and timer state in Redis. Every method blocks (run them on the API's I/O threads)."""

    def __init__(self, store: StateStore, replica: str, lease_s: float):
        self.store, self.me, self.ttl_ms = store, replica, int(lease_s * 1000)
        self.registry = store.k("timersessions")

    def lease_key(self, sid: str) -> str:
        return self.store.k("timerlease", sid)

    def timer_key(self, sid: str) -> str:
        return self.store.k("timer", sid)

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    def create(self, sid: str, now: float | None = None) -> bool:
        """A new session: its timer state, registered, leased to this replica."""
        now = time.time() if now is None else now
        p = self.store.r.pipeline()
        p.hset(self.timer_key(sid), mapping={"last_activity": now, "last_audio": now})
        p.expire(self.timer_key(sid), self.store.ttl)
        p.execute()
        return self.acquire(sid)

    def acquire(self, sid: str) -> bool:
        if not self.store.r.set(self.lease_key(sid), self.me, nx=True, px=self.ttl_ms):
            return False
        self.store.r.zadd(self.registry, {sid: self._now_ms() + self.ttl_ms})
        return True

    def renew(self, sid: str) -> bool:
        """Extend this replica's lease; False when another replica holds it now (stop the ticker)."""
        key, me, owned = self.lease_key(sid), self.me.encode(), []

        def extend(pipe) -> None:
            cur = pipe.get(key)
            if cur is not None and cur != me:
                return
            pipe.multi()
            pipe.set(key, me, px=self.ttl_ms)
            pipe.zadd(self.registry, {sid: self._now_ms() + self.ttl_ms})
            owned.append(True)

        self.store.r.transaction(extend, key)
        return bool(owned)

    def release(self, sid: str, finished: bool) -> None:
        """Give the lease back: the session is over (forget it) or this replica stops (anyone may take it)."""
        key, me = self.lease_key(sid), self.me.encode()

        def give(pipe) -> None:
            if pipe.get(key) != me:
                return
            pipe.multi()
            pipe.delete(key)
            if finished:
                pipe.zrem(self.registry, sid)
            else:
                pipe.zadd(self.registry, {sid: 0})

        self.store.r.transaction(give, key)

    def forget(self, sid: str) -> None:
        self.store.r.zrem(self.registry, sid)

    def expired(self, limit: int = 100) -> list[str]:
        """Sessions whose lease has run out (candidates; :meth:`acquire` decides)."""
        rows = self.store.r.zrangebyscore(self.registry, "-inf", self._now_ms(), start=0, num=limit)
        return [r.decode() if isinstance(r, bytes) else r for r in rows]

    # ---- timer state -------------------------------------------------------------------------------
    def timer(self, sid: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.store.r.hgetall(self.timer_key(sid)).items()}

    def mark(self, sid: str, **fields) -> None:
        self.store.r.hset(self.timer_key(sid), mapping=fields)

    def claim_end(self, sid: str, reason: str) -> bool:
        """The first caller (any replica) to end the session gets True; later ones False."""
        first = self.store.r.hsetnx(self.timer_key(sid), "end_reason", reason)
        if first:
            self.store.r.hset(self.timer_key(sid), "end_at", time.time())
        return bool(first)

    def media_present(self, sids: list[str], now: float | None = None) -> None:
        """This replica has media clients on ``sids``: they count as active until a little later."""
        if not sids:
            return
        now = time.time() if now is None else now
        p = self.store.r.pipeline()
        for sid in sids:
            p.hset(self.timer_key(sid), mapping={"last_activity": now, "media_until": now + MEDIA_PRESENCE_S})
        p.execute()
