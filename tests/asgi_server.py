"""An ASGI app served by a real uvicorn server in a daemon thread of the test process (tests that need
real sockets: WebSocket clients, dropped connections, a browser)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def serve_in_thread(app, start_timeout_s: float = 20.0, **config) -> Iterator[int]:
    """Serve ``app`` on a free 127.0.0.1 port until the block ends; yields the port. ``config``: more
    ``uvicorn.Config`` settings (``ws="websockets-sansio"``, ...)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
