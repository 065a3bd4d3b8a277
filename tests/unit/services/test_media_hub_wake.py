"""A media connection waits for news of its session instead of polling the hub.

:meth:`MediaHub.pieces` sleeps on an event that the hub's reader thread sets when a message of that
session arrives, so a fragment reaches a waiting connection at once, while a connection with nothing to
send wakes only every ``recheck_s``. The hub's reader is left unstarted here: messages go in through
``_add`` from another thread, as the reader thread does.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.common.messages import Media, Tensor, encode
from services.session_api.media_hub import MediaHub

pytestmark = pytest.mark.unit

SID = "s-wake"


def _media(kind: str, seq: int, data: bytes) -> bytes:
    return encode(Media(session_id=SID, tenant_id="t", seq=seq, kind=kind),
                  {"data": Tensor("uint8", (len(data),), data)} if data else None)


def test_a_waiting_connection_gets_a_fragment_from_another_thread_at_once_and_leaves_no_waiter():
    hub = MediaHub("127.0.0.1:1")                 # never started: no broker needed
    hub._add(_media("init", -1, b"INIT"))

    async def client() -> list[tuple[str, int, bytes, float]]:
        got = []
        gen = hub.pieces(SID, from_block=0, recheck_s=30.0)    # a poll would take 30 s: only the wake-up is fast
        async for piece in gen:
            got.append((piece.kind, piece.block, piece.data, time.monotonic()))
            if piece.kind == "init":
                assert hub._waiters[SID], "the connection waits as a registered waiter"
                later = threading.Timer(0.3, lambda: hub._add(_media("fragment", 0, b"F0")))
                later.start()
            elif piece.kind == "fragment":
                hub._add(_media("end", -1, b"TAIL"))           # already there at the next look: no wait
        return got

    t0 = time.monotonic()
    got = asyncio.run(asyncio.wait_for(client(), 10))
    assert [(k, b, d) for k, b, d, _ in got] == [("init", -1, b"INIT"), ("fragment", 0, b"F0"), ("end", -1, b"TAIL")]
    assert got[1][3] - t0 < 2.0                   # woken by the reader's word, long before recheck_s
    assert SID not in hub._waiters                # the finished connection is no longer a waiter


def test_a_connection_with_nothing_to_send_looks_only_every_recheck_s(monkeypatch):
    hub = MediaHub("127.0.0.1:1")
    looks = []
    real_get = hub.sessions.get

    class Spy(dict):
        def get(self, key, default=None):
            looks.append(time.monotonic())
            return real_get(key, default)

    hub.sessions = Spy()

    async def client() -> None:
        gen = hub.pieces(SID, from_block=0, recheck_s=0.25)
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gen.aclose()

    asyncio.run(client())
    assert 3 <= len(looks) <= 6                   # about 1.0 / 0.25 looks, not the 20 a 50 ms poll made
    assert SID not in hub._waiters
