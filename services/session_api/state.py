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
from services.session_api.schemas import SessionOptions
from services.session_api.settings import ApiSettings

T = TypeVar("T")


@dataclass(eq=False)
class SessionRuntime:
    """What this replica tracks for a session it created: its ticker (idle motion, idle timeout, maximum
    duration), its media clients and the time of its last audio and activity."""

    sid: str
    tenant: str
    opts: SessionOptions
    created: float = field(default_factory=time.monotonic)
    last_audio: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    media_clients: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)   # orders this session's input events
    ended: bool = False
    end_reason: str = ""
    task: asyncio.Task | None = None


@dataclass(eq=False)
class AppState:
    settings: ApiSettings
    store: StateStore
    producer: KafkaProducer
    hub: MediaHub
    executor: ThreadPoolExecutor
    runtimes: dict[str, SessionRuntime] = field(default_factory=dict)
    # Locks of sessions this replica did not create, alive only while someone holds them.
    _locks: weakref.WeakValueDictionary[str, asyncio.Lock] = field(default_factory=weakref.WeakValueDictionary)

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
        rt = self.runtimes.get(sid)
        if rt is not None:
            return rt.lock
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        return lock

    async def close(self) -> None:
        """Stop the tickers and the hub, deliver what the producer still holds, close everything."""
        for rt in list(self.runtimes.values()):
            if rt.task:
                rt.task.cancel()
        await asyncio.gather(*(rt.task for rt in self.runtimes.values() if rt.task), return_exceptions=True)
        await self.io(self.hub.stop)
        await self.io(self.producer.flush)
        await self.io(self.producer.close)
        await self.io(self.store.r.close)
        self.executor.shutdown(wait=True)
