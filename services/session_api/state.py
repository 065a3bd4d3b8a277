"""The app's typed state: what the lifespan opens (Redis, the Kafka producer, the media hub, the I/O
threads) and what this replica tracks per session. One :class:`AppState` is held on ``app.state.la``.

Blocking calls never run on the event loop: every Redis command and every Kafka producer call goes
through :meth:`AppState.io`, which runs it on the API's own bounded thread pool (``LIVEAVATAR_IO_THREADS``).
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kafka import KafkaProducer

from services.common.kafka import make_producer
from services.common.redis_state import StateStore
from services.session_api.media_hub import MediaHub
from services.session_api.settings import ApiSettings
from services.session_api.timers import Leases, replica_id

T = TypeVar("T")


@dataclass(eq=False)
class SessionRuntime:
    """What this replica knows of a session by itself: its media clients here, when this replica last saw
    activity, and the lock that orders the input events it sends. (The session's timers live in Redis
    and run wherever its lease is: :mod:`services.session_api.timers`.)"""

    sid: str
    media_clients: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)   # orders this session's input events
    reported: float = 0.0                  # monotonic time of the last media-presence report to Redis


@dataclass(eq=False)
class AppState:
    settings: ApiSettings
    store: StateStore
    producer: KafkaProducer
    hub: MediaHub
    executor: ThreadPoolExecutor
    runtimes: dict[str, SessionRuntime] = field(default_factory=dict)     # sessions with media clients here
    tickers: dict[str, asyncio.Task] = field(default_factory=dict)        # sessions whose timer lease we hold
    replica: str = field(default_factory=replica_id)
    leases: Leases | None = None
    background: list[asyncio.Task] = field(default_factory=list)
    # Locks of sessions, alive only while someone holds them.
    _locks: weakref.WeakValueDictionary[str, asyncio.Lock] = field(default_factory=weakref.WeakValueDictionary)

    def __post_init__(self) -> None:
        if self.leases is None:
            self.leases = Leases(self.store, self.replica, self.settings.timer_lease_s)

    @classmethod
    def connect(cls, settings: ApiSettings) -> AppState:
        """Open the clients (nothing is sent yet) and start the media hub's reader thread."""
        return cls(settings=settings,
                   store=StateStore.from_settings(settings),
                   producer=make_producer(settings.kafka()),
                   hub=MediaHub(settings.kafka(), buffer_blocks=settings.media_buffer_blocks).start(),
                   executor=ThreadPoolExecutor(settings.io_threads, thread_name_prefix="session-api-io"))

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call (Redis, Kafka) on the I/O threads and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def session_lock(self, sid: str) -> asyncio.Lock:
        """The lock that keeps one session's input sequence numbers in the order they are sent."""
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        return lock

    def runtime(self, sid: str) -> SessionRuntime:
        """This replica's view of a session (created on first use; dropped when no client is left)."""
        rt = self.runtimes.get(sid)
        if rt is None:
            rt = self.runtimes[sid] = SessionRuntime(sid)
        return rt

    async def close(self) -> None:
        """Stop the background tasks and the tickers, hand the timer leases back (another replica takes
        them over at once), stop the hub, deliver what the producer still holds, close everything."""
        tasks = [*self.background, *self.tickers.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sid in list(self.tickers):
            try:
                await self.io(self.leases.release, sid, False)
            except Exception:  # noqa: BLE001 - Redis gone: the lease simply runs out
                pass
        self.tickers.clear()
        await self.io(self.hub.stop)
        await self.io(self.producer.flush)
        await self.io(self.producer.close)
        await self.io(self.store.r.close)
        self.executor.shutdown(wait=True)
