"""The real session API app served by uvicorn in this process, on the stand-ins of test_session_api."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn

from services.session_api.app import create_app
from services.session_api.tenants import create_tenant
from tests.unit.services.test_session_api import Harness


@pytest.fixture()
def live():
    h = Harness(max_queued_audio_s=1000.0)
    server = uvicorn.Server(uvicorn.Config(create_app(h.settings, connect=h.connect), host="127.0.0.1", port=0,
                                           log_level="warning", ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    _, h.key = create_tenant(h.store, "client", max_sessions=3)
    h.base = f"http://127.0.0.1:{port}"
    yield h
    server.should_exit = True
    thread.join(10)
